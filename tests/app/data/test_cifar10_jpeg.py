"""The cifar10_jpeg preset: its archive extracted once and atomically, the error without one, and (slow) the real
60,000-image archive."""
import io
import tarfile

import pytest
import torch
from PIL import Image

import lrlightning.app.data.cifar10_jpeg as cifar10_jpeg
from lrlightning.app.data import DATAMODULES, CIFAR10JPEGDataModule, DataNotFoundError
from lrlightning.app.data.archives import extract_tar
from lrlightning.app.data.cifar10_jpeg import CIFAR10_CLASSES, SHARED_ARCHIVE


def jpeg_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))


def tiny_archive(path, top: str = "", train: int = 2, test: int = 1):
    """A CIFAR-10-shaped .tar.gz: `train` and `test` grey 32×32 JPEGs per class (class i has value 20·i)."""
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train), ("test", test)):
            for label, name in enumerate(CIFAR10_CLASSES):
                for i in range(count):
                    add(tar, f"{top}{split}/{name}/{i:04d}.jpg", jpeg_bytes(20 * label))
    return path


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Every default location in tmp_path: no environment archive, no shared archive."""
    monkeypatch.setenv("LRLIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LRL_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("LRL_CIFAR10_JPEG", raising=False)
    monkeypatch.setattr(cifar10_jpeg, "SHARED_ARCHIVE", tmp_path / "no_shared" / "cifar10-jpeg.tar.gz")
    return tmp_path


def test_preset_extracts_the_archive_once_and_reads_it(places, monkeypatch):
    archive = tiny_archive(places / "cifar10-jpeg.tar.gz")
    monkeypatch.setenv("LRL_CIFAR10_JPEG", str(archive))
    datamodule = DATAMODULES["cifar10_jpeg"](val_size=10, batch_size=8)
    target = places / "data" / "cifar10_jpeg"
    assert datamodule.num_classes == 10 and datamodule.class_names == list(CIFAR10_CLASSES)
    assert not target.exists()  # classes are known before extraction
    datamodule.prepare_data()
    assert sorted(p.name for p in target.iterdir()) == ["test", "train"]
    assert sorted(p.name for p in (target / "train").iterdir()) == sorted(CIFAR10_CLASSES)
    assert [p.name for p in places.joinpath("data").iterdir()] == ["cifar10_jpeg"]  # no temporary folder left
    datamodule.setup()
    assert (len(datamodule.train_data[1]), len(datamodule.val_data[1]), len(datamodule.test_data[1])) == (10, 10, 10)
    assert (datamodule.crop_padding, datamodule.flip, datamodule.image_size, datamodule.in_channels) == (4, True, 32, 3)
    assert datamodule.test_data[0][3].float().mean().sub(60).abs() < 3  # class 3 (cat) is grey 60
    x, _ = next(iter(datamodule.train_dataloader()))
    assert x.shape == (8, 3, 32, 32)

    archive.unlink()
    again = CIFAR10JPEGDataModule(val_size=10)
    again.setup()  # the extracted folder is used: no archive needed
    assert torch.equal(again.test_data[0], datamodule.test_data[0])


def test_preset_takes_an_archive_with_one_top_folder_into_root(places):
    archive = tiny_archive(places / "wrapped.tar.gz", top="cifar10/")
    root = places / "mine"
    datamodule = CIFAR10JPEGDataModule(root=str(root), archive=str(archive), val_size=5)
    datamodule.setup("test")
    assert (root / "train" / "truck" / "0001.jpg").is_file() and len(datamodule.test_data[1]) == 10


def test_a_bad_archive_leaves_no_folder_behind(places):
    broken = places / "broken.tar.gz"
    blob = tiny_archive(places / "good.tar.gz").read_bytes()
    broken.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=rf"cannot extract {broken}"):
        CIFAR10JPEGDataModule(archive=str(broken)).setup()
    assert not (places / "data").exists() or list((places / "data").iterdir()) == []

    hostile = places / "hostile.tar.gz"
    with tarfile.open(hostile, "w:gz") as tar:
        add(tar, "train/cat/0000.jpg", jpeg_bytes(1))
        add(tar, "../escaped.jpg", jpeg_bytes(2))
    with pytest.raises(ValueError, match=rf"cannot extract {hostile}: OutsideDestinationError"):
        extract_tar(hostile, places / "data" / "x", required=("train", "test"))
    assert not (places / "data" / "escaped.jpg").exists() and list((places / "data").iterdir()) == []

    other = places / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        add(tar, "images/cat/0000.jpg", jpeg_bytes(1))
        add(tar, "labels.csv", b"cat\n")
    expected = r"must hold \['train', 'test'\] at its top .* found \['images', 'labels.csv'\]"
    with pytest.raises(ValueError, match=expected):
        CIFAR10JPEGDataModule(archive=str(other)).setup()
    assert list((places / "data").iterdir()) == []


def test_without_an_archive_the_error_says_how_to_get_one(places, monkeypatch):
    with pytest.raises(DataNotFoundError) as error:
        CIFAR10JPEGDataModule().setup()
    message = str(error.value)
    assert f"{places / 'data' / 'cifar10_jpeg'} holds no train/ and test/ folders" in message
    assert "JPEG copy of CIFAR-10 in class folders" in message and "LRL_CIFAR10_JPEG=" in message
    assert "root=" in message and "archive=" in message
    monkeypatch.setenv("LRL_CIFAR10_JPEG", str(places / "missing.tar.gz"))
    with pytest.raises(DataNotFoundError, match=rf"\$LRL_CIFAR10_JPEG={places / 'missing.tar.gz'} is not a file"):
        CIFAR10JPEGDataModule().setup()
    assert not (places / "data").exists()


def test_preset_checks_the_class_folders(places):
    root = places / "wrong"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(root / split / name / "0.png")
    with pytest.raises(ValueError, match=rf"class folders of {root} must be \['airplane', .*got \['cat', 'dog'\]"):
        CIFAR10JPEGDataModule(root=str(root)).setup()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason=f"the CIFAR-10 JPEG archive is not at {SHARED_ARCHIVE}")
def test_the_real_archive_gives_cifar10(tmp_path, monkeypatch):
    monkeypatch.setenv("LRLIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LRL_DATA_ROOT", str(tmp_path / "data"))
    datamodule = CIFAR10JPEGDataModule()
    datamodule.setup()
    assert [len(d[1]) for d in (datamodule.train_data, datamodule.val_data, datamodule.test_data)] == [45000, 5000,
                                                                                                      10000]
    assert torch.bincount(datamodule.test_data[1]).tolist() == [1000] * 10
    assert torch.bincount(datamodule.val_data[1]).tolist() == [500] * 10
    torch.testing.assert_close(torch.tensor(datamodule.mean), torch.tensor([0.4912, 0.4821, 0.4465]), atol=2e-3,
                               rtol=0)
