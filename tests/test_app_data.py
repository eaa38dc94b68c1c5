import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import lrlightning.app.data.mnist as mnist_module
from lrlightning.app.data import (
    DATAMODULES,
    BatchTransform,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataNotFoundError,
    FashionMNISTDataModule,
    MNISTDataModule,
    SyntheticDataModule,
    download,
    normalize,
    random_crop,
    random_horizontal_flip,
)
from lrlightning.app.data.readers import read_cifar, read_idx

def idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.numpy().tobytes()


def write_idx(path: Path, array: torch.Tensor) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def numbered_images(count: int, offset: int = 0) -> torch.Tensor:
    """uint8 (count, 28, 28) images whose first two pixels encode their number (offset + i)."""
    images = torch.randint(0, 256, (count, 28, 28), generator=torch.Generator().manual_seed(offset), dtype=torch.uint8)
    numbers = torch.arange(offset, offset + count)
    images[:, 0, 0], images[:, 0, 1] = (numbers % 256).to(torch.uint8), (numbers // 256).to(torch.uint8)
    return images


def image_numbers(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def write_mnist_folder(folder: Path, train: int = 120, test: int = 40, suffix: str = ".gz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", numbered_images(train))
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", (torch.arange(train) % 10).to(torch.uint8))
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", numbered_images(test, offset=1000))
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", (torch.arange(test) % 10).to(torch.uint8))
    return folder


def cifar_batch(count: int, start: int, label_keys: dict[str, int]) -> dict:
    pixels = np.zeros((count, 3072), dtype=np.uint8)
    pixels[:, 0] = np.arange(start, start + count) % 256
    pixels[:, 1:] = np.random.default_rng(start).integers(0, 256, (count, 3071), dtype=np.uint8)
    labels = {key: [(start + i) % classes for i in range(count)] for key, classes in label_keys.items()}
    return {"data": pixels, **labels}


def cifar_members(kind: str, per_batch: int = 4) -> dict[str, dict]:
    if kind == "cifar10":
        members = {f"data_batch_{b}": cifar_batch(per_batch, (b - 1) * per_batch, {"labels": 10}) for b in range(1, 6)}
        return {**members, "test_batch": cifar_batch(per_batch, 200, {"labels": 10})}
    keys = {"fine_labels": 100, "coarse_labels": 20}
    return {"train": cifar_batch(5 * per_batch, 0, keys), "test": cifar_batch(per_batch, 200, keys), "meta": {}}


def write_cifar(target: Path, kind: str, archive: bool = True, protocol: int = 2, **overrides: bytes) -> Path:
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    blobs = {name: pickle.dumps(batch, protocol=protocol) for name, batch in cifar_members(kind).items()}
    blobs.update(overrides)
    if not archive:
        (target / folder).mkdir(parents=True)
        for name, blob in blobs.items():
            (target / folder / name).write_bytes(blob)
        return target / folder
    with tarfile.open(target, "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return target


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """Point every default search location at empty or missing folders."""
    monkeypatch.setenv("LRL_FASHION_MNIST", str(tmp_path / "env_empty"))
    monkeypatch.setenv("LRL_DATA_ROOT", str(tmp_path / "data_root_empty"))
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST", tmp_path / "no_debian_package")


# IDX reader


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_plain_and_gzip(tmp_path, suffix):
    images = numbered_images(7)
    read = read_idx(write_idx(tmp_path / f"images{suffix}", images))
    assert read.dtype == torch.uint8
    assert torch.equal(read, images)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / f"labels{suffix}", labels)), labels)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda raw: raw[:-5], r"truncated, header declares shape \(3, 28, 28\) = 2352 bytes, found 2347"),
        (lambda raw: raw + b"xx", r"2 trailing bytes"),
        (lambda raw: b"\x01\x02" + raw[2:], r"not an IDX file \(magic number starts with 0102"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], r"element type 0x0d is not supported"),
        (lambda raw: raw[:9], r"truncated IDX header \(9 bytes, need 16 for 3 dims\)"),
        (lambda raw: gzip.compress(raw)[:-20], r"corrupted or truncated gzip stream"),
    ],
    ids=["short-payload", "trailing-bytes", "bad-magic", "float-type", "short-header", "truncated-gzip"],
)
def test_read_idx_names_the_file_and_the_problem(tmp_path, mangle, message):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(numbered_images(3))))
    with pytest.raises(ValueError, match=rf"{path}: .*{message}"):
        read_idx(path)


# CIFAR reader


@pytest.mark.parametrize("archive", [True, False], ids=["tar.gz", "folder"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_read_cifar10_from_archive_or_folder(tmp_path, archive, protocol):
    source = write_cifar(tmp_path / "cifar-10-python.tar.gz" if archive else tmp_path, "cifar10", archive, protocol)
    images, labels = read_cifar(source, train=True)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(20)]
    assert images[:, 0, 0, 0].tolist() == list(range(20))  # batches 1..5 in order
    expected = cifar_members("cifar10")["data_batch_2"]["data"][1].reshape(3, 32, 32)
    assert torch.equal(images[5], torch.from_numpy(expected))
    test_images, test_labels = read_cifar(source, train=False)
    assert test_images.shape == (4, 3, 32, 32) and test_images[:, 0, 0, 0].tolist() == [200, 201, 202, 203]


def test_read_cifar_accepts_the_parent_folder_of_the_extracted_batches(tmp_path):
    write_cifar(tmp_path, "cifar10", archive=False)
    assert read_cifar(tmp_path, train=False)[0].shape == (4, 3, 32, 32)


def test_read_cifar100_fine_and_coarse_labels(tmp_path):
    source = write_cifar(tmp_path / "cifar-100-python.tar.gz", "cifar100")
    _, fine = read_cifar(source, train=True)
    _, coarse = read_cifar(source, train=True, coarse=True)
    assert fine.tolist() == list(range(20)) and coarse.tolist() == list(range(20))
    _, fine_test = read_cifar(source, train=False)
    assert fine_test.tolist() == [0, 1, 2, 3]  # 200..203 mod 100
    with pytest.raises(ValueError, match="`coarse`=True needs CIFAR-100"):
        read_cifar(write_cifar(tmp_path / "c10.tar.gz", "cifar10"), train=True, coarse=True)


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_read_cifar_refuses_pickles_that_would_run_code(tmp_path):
    marker = tmp_path / "created-by-pickle"
    hostile = pickle.dumps({"data": _CreatesFile(marker), "labels": []})
    source = write_cifar(tmp_path / "c10.tar.gz", "cifar10", test_batch=hostile)
    with pytest.raises(ValueError, match=r"c10.tar.gz:test_batch: not a valid CIFAR batch \(global \w+\.open is not"):
        read_cifar(source, train=False)
    assert not marker.exists()


def test_read_cifar_reports_truncated_and_malformed_files(tmp_path):
    archive = write_cifar(tmp_path / "c10.tar.gz", "cifar10")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(ValueError, match=rf"{truncated}: corrupted or truncated archive"):
        read_cifar(truncated, train=True)

    cut_pickle = pickle.dumps(cifar_members("cifar10")["data_batch_3"], protocol=2)[:3000]
    source = write_cifar(tmp_path / "cut.tar.gz", "cifar10", data_batch_3=cut_pickle)
    with pytest.raises(ValueError, match=r"cut.tar.gz:data_batch_3: .*truncated"):
        read_cifar(source, train=True)

    wrong_shape = pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]})
    source = write_cifar(tmp_path / "shape.tar.gz", "cifar10", test_batch=wrong_shape)
    with pytest.raises(ValueError, match=r"shape.tar.gz:test_batch: 'data' must be uint8 of shape \(N, 3072\)"):
        read_cifar(source, train=False)

    bad_labels = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    source = write_cifar(tmp_path / "labels.tar.gz", "cifar10", test_batch=bad_labels)
    with pytest.raises(ValueError, match=r"labels.tar.gz:test_batch: labels outside \[0, 10\)"):
        read_cifar(source, train=False)

    with pytest.raises(ValueError, match=r"no CIFAR python batches found"):
        read_cifar(tmp_path, train=True)


# Finding the data, and the error when it is missing


def test_missing_fashion_mnist_gives_one_error_with_the_three_ways(tmp_path, no_default_data):
    datamodule = FashionMNISTDataModule(root=str(tmp_path / "empty_root"), download=False)
    with pytest.raises(DataNotFoundError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    assert "Fashion-MNIST not found" in message and "download disabled (download=False)" in message
    assert "root=/path/to/folder" in message
    assert "LRL_FASHION_MNIST=" in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message
    assert str(tmp_path / "empty_root") in message and str(tmp_path / "no_debian_package") in message
    with pytest.raises(DataNotFoundError):
        datamodule.setup("fit")
    assert datamodule.train_data is None


def test_failed_download_gives_the_same_error_and_leaves_no_files(tmp_path, no_default_data, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "root"
    expected = r"(?s)download from http://fashion-mnist.*failed: .*no network.*three ways"
    with pytest.raises(DataNotFoundError, match=expected):
        FashionMNISTDataModule(root=str(root)).prepare_data()
    assert not root.exists() or list(root.iterdir()) == []


def test_search_order_root_then_env_then_system_folder(tmp_path, no_default_data, monkeypatch):
    debian = write_mnist_folder(tmp_path / "debian", train=30)
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST", debian)
    assert FashionMNISTDataModule(root=str(tmp_path / "empty"), download=False).load(train=True)[0].shape[0] == 30

    env = write_mnist_folder(tmp_path / "env", train=20, suffix="")
    monkeypatch.setenv("LRL_FASHION_MNIST", str(env))
    assert FashionMNISTDataModule(download=False).load(train=True)[0].shape[0] == 20

    write_mnist_folder(tmp_path / "root" / "FashionMNIST" / "raw", train=10)  # torchvision's layout
    assert FashionMNISTDataModule(root=str(tmp_path / "root"), download=False).load(train=True)[0].shape[0] == 10


def test_mnist_uses_the_data_root_subfolder(tmp_path, no_default_data, monkeypatch):
    monkeypatch.setenv("LRL_DATA_ROOT", str(tmp_path))
    write_mnist_folder(tmp_path / "mnist", train=25)
    images, labels = MNISTDataModule(download=False).load(train=True)
    assert images.shape == (25, 1, 28, 28) and labels.dtype == torch.int64


def test_download_writes_atomically_and_checks_md5(tmp_path, monkeypatch):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 1000)
    target = tmp_path / "out" / "file.bin"
    download(source.as_uri(), target, md5=hashlib.md5(source.read_bytes()).hexdigest())
    assert target.read_bytes() == source.read_bytes()

    with pytest.raises(ValueError, match="MD5 .* differs from the expected 0000"):
        download(source.as_uri(), tmp_path / "out" / "bad.bin", md5="0000")

    class DropsMidway(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection dropped")
            return super().read(10)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: DropsMidway(b"x" * 100))
    with pytest.raises(ConnectionResetError):
        download("http://example.invalid/f", tmp_path / "out" / "dropped.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file.bin"]


# DataModules


def test_fashion_mnist_split_is_seeded_disjoint_and_keeps_the_test_set_apart(tmp_path, no_default_data):
    root = write_mnist_folder(tmp_path / "fm", train=120, test=40)
    first = FashionMNISTDataModule(root=str(root), val_size=30, seed=1, download=False)
    again = FashionMNISTDataModule(root=str(root), val_size=30, seed=1, download=False)
    other = FashionMNISTDataModule(root=str(root), val_size=30, seed=2, download=False)
    for datamodule in (first, again, other):
        datamodule.setup("fit")
    train_ids, val_ids = image_numbers(first.train_data[0]), image_numbers(first.val_data[0])
    assert len(train_ids) == 90 and len(val_ids) == 30
    assert sorted(train_ids + val_ids) == list(range(120))
    assert val_ids == image_numbers(again.val_data[0])
    assert val_ids != image_numbers(other.val_data[0])
    assert first.val_data[1].tolist() == [i % 10 for i in val_ids]
    assert first.test_data is None
    first.setup("test")
    assert image_numbers(first.test_data[0]) == list(range(1000, 1040))


def test_truncated_file_in_a_datamodule_names_it_and_loads_nothing(tmp_path, no_default_data):
    root = write_mnist_folder(tmp_path / "fm", suffix="")
    labels = root / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    datamodule = FashionMNISTDataModule(root=str(root), val_size=10, download=False)
    with pytest.raises(ValueError, match=rf"{labels}: truncated"):
        datamodule.setup("fit")
    assert datamodule.train_data is None and datamodule.val_data is None


def test_mismatched_image_and_label_counts_are_reported(tmp_path, no_default_data):
    root = write_mnist_folder(tmp_path / "fm")
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.zeros(119, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz and .*train-labels-idx1-ubyte.gz do not match"):
        FashionMNISTDataModule(root=str(root), val_size=10, download=False).setup("fit")


def test_train_batches_are_augmented_floats_and_eval_batches_are_deterministic(tmp_path, no_default_data):
    root = write_mnist_folder(tmp_path / "fm", train=120, test=40)
    datamodule = FashionMNISTDataModule(root=str(root), val_size=20, batch_size=32, download=False)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (32,) and y.dtype == torch.int64
    assert [len(b[1]) for b in datamodule.train_dataloader()] == [32, 32, 32, 4]

    val_x, val_y = next(iter(datamodule.val_dataloader()))
    images, labels = datamodule.val_data
    torch.testing.assert_close(val_x, (images.float() / 255 - 0.2860) / 0.3530)
    assert torch.equal(val_y, labels)

    no_augment = FashionMNISTDataModule(root=str(root), val_size=20, batch_size=32, augment=False, download=False)
    no_augment.setup("fit")
    torch.manual_seed(0)
    images_a, labels_a = map(torch.cat, zip(*datamodule.train_dataloader()))
    torch.manual_seed(0)
    images_b, labels_b = map(torch.cat, zip(*no_augment.train_dataloader()))
    assert torch.equal(labels_a, labels_b)  # same order ...
    assert not torch.equal(images_a, images_b)  # ... so only the augmentation differs


def test_random_crop_takes_windows_of_the_zero_padded_image():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).view(2, 3, 6, 6).to(torch.uint8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    crops = random_crop(images, padding=2, generator=torch.Generator().manual_seed(0))
    assert crops.shape == images.shape and crops.dtype == torch.uint8
    for crop, source in zip(crops, padded):
        windows = [source[:, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(crop, window) for window in windows)
    assert random_crop(images, padding=0) is images


def test_random_horizontal_flip_mirrors_some_images_and_keeps_the_others():
    images = torch.randint(0, 256, (64, 1, 5, 5), dtype=torch.uint8)
    flipped = random_horizontal_flip(images, generator=torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(flipped, images)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(flipped, images)])
    assert (mirrored | kept).all() and mirrored.any() and kept.any()


def test_normalize_and_batch_transform_shapes_and_dtype():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    x = normalize(images, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    torch.testing.assert_close(x[1, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    out, labels = BatchTransform((0.5,) * 3, (0.2,) * 3, crop_padding=4, flip=True)((images, torch.tensor([1, 2])))
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32 and labels.tolist() == [1, 2]


def test_cifar_datamodules_read_small_archives(tmp_path):
    archive = write_cifar(tmp_path / "cifar-10-python.tar.gz", "cifar10")
    cifar10 = CIFAR10DataModule(root=str(tmp_path), val_size=5, batch_size=8, download=False)
    cifar10.setup("fit")
    x, y = next(iter(cifar10.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(cifar10.val_data[1]) == 5 and len(cifar10.train_data[1]) == 15
    assert CIFAR10DataModule(root=str(archive), val_size=5, download=False).load(train=False)[0].shape[0] == 4

    write_cifar(tmp_path / "c100", "cifar100", archive=False)
    coarse = CIFAR100DataModule(root=str(tmp_path / "c100"), val_size=5, coarse=True, download=False)
    coarse.setup("test")
    assert coarse.num_classes == 20 and coarse.test_data[1].tolist() == [0, 1, 2, 3]


def test_synthetic_datamodule_is_reproducible_and_sized(tmp_path):
    first = SyntheticDataModule(num_samples=100, image_size=10, in_channels=2, num_classes=4, val_size=20)
    second = SyntheticDataModule(num_samples=100, image_size=10, in_channels=2, num_classes=4, val_size=20)
    first.setup(None), second.setup(None)
    assert first.train_data[0].shape == (80, 2, 10, 10) and first.test_data[0].shape == (20, 2, 10, 10)
    assert torch.equal(first.train_data[0], second.train_data[0])
    assert not torch.equal(first.test_data[0][:20], first.val_data[0])
    x, _ = next(iter(first.train_dataloader()))
    assert x.shape == (80, 2, 10, 10) and x.dtype == torch.float32


def test_digits_datamodule_keeps_a_fixed_test_set():
    pytest.importorskip("sklearn", reason="DigitsDataModule needs the `digits` extra (scikit-learn)")
    from lrlightning.app.data import DigitsDataModule

    first, other = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    first.setup(None), other.setup(None)
    assert first.train_data[0].shape == (1797 - 360 - 180, 1, 8, 8) and first.train_data[0].dtype == torch.uint8
    assert first.train_data[0].max() == 255
    assert torch.equal(first.test_data[0], other.test_data[0])
    assert not torch.equal(first.val_data[0], other.val_data[0])
    x, _ = next(iter(first.val_dataloader()))
    assert x.shape == (128, 1, 8, 8) and abs(x.mean().item()) < 0.2


@pytest.mark.skipif(
    not mnist_module.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist_from_the_debian_package():
    datamodule = FashionMNISTDataModule(download=False)
    datamodule.setup("fit")
    datamodule.setup("test")
    assert datamodule.train_data[0].shape == (55000, 1, 28, 28) and datamodule.val_data[0].shape == (5000, 1, 28, 28)
    assert datamodule.test_data[0].shape == (10000, 1, 28, 28)
    assert torch.bincount(datamodule.test_data[1]).tolist() == [1000] * 10
    x, _ = next(iter(datamodule.val_dataloader()))
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1


def test_properties_and_registry():
    expected = {
        "fashion_mnist": (10, 1, 28),
        "mnist": (10, 1, 28),
        "cifar10": (10, 3, 32),
        "cifar100": (100, 3, 32),
        "digits": (10, 1, 8),
        "synthetic": (10, 3, 32),
    }
    assert set(DATAMODULES) == set(expected)
    for key, properties in expected.items():
        datamodule = DATAMODULES[key]()
        assert (datamodule.num_classes, datamodule.in_channels, datamodule.image_size) == properties


def test_invalid_arguments_raise_value_errors_naming_them(tmp_path, no_default_data):
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got 0"):
        SyntheticDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"`val_size` must be an int >= 1, got -5"):
        FashionMNISTDataModule(val_size=-5)
    with pytest.raises(ValueError, match=r"`image_size` must be an int >= 8, got 4"):
        SyntheticDataModule(image_size=4)
    root = write_mnist_folder(tmp_path / "fm", train=50)
    with pytest.raises(ValueError, match=r"`val_size` must be smaller than the 50 training images of .*, got 50"):
        FashionMNISTDataModule(root=str(root), val_size=50, download=False).setup("fit")
