"""The image-folder datamodule on tiny JPEG/PNG/WebP folders: layouts, splits, statistics, the decode cache and
the errors that name the path at fault."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import lrlightning.app.data.decode as decode_module
from lrlightning.app.data import DATAMODULES, DataNotFoundError, ImageFolderDataModule
from lrlightning.app.data.decode import decode_all
from lrlightning.app.data.image_folder import channel_stats, stratified_order

RED, GREEN, BLUE = (250, 0, 0), (0, 250, 0), (0, 0, 250)


def save(path, colour, size=(8, 8), **options):
    """A solid-colour image file at `path`, in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **options)
    return path


def class_folder(folder, colour, count, size=(8, 8)):
    """`count` images of `colour` in `folder`, cycling through PNG, lossless WebP and JPEG."""
    for i in range(count):
        suffix, options = [(".png", {}), (".webp", {"lossless": True}), (".jpg", {"quality": 100})][i % 3]
        save(folder / f"{i:03d}{suffix}", colour, size, **options)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """`$LRLIGHTNING_CACHE` in tmp_path; the image-folder cache files go to its image_folder/."""
    monkeypatch.setenv("LRLIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "image_folder"


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images decoded (in this process: the test folders fit one chunk)."""
    calls = []
    original = decode_module.decode_image

    def counting(path, image_size, channels=3):
        calls.append(path)
        return original(path, image_size, channels)

    monkeypatch.setattr(decode_module, "decode_image", counting)
    return calls


@pytest.fixture
def split_folder(tmp_path):
    """root/train/{cat: red ×6, dog: green ×6} and root/test/{cat, dog: blue ×2}."""
    root = tmp_path / "pets"
    class_folder(root / "train" / "cat", RED, 6)
    class_folder(root / "train" / "dog", GREEN, 6)
    class_folder(root / "test" / "cat", BLUE, 2)
    class_folder(root / "test" / "dog", BLUE, 2)
    return root


def test_train_test_layout_class_names_and_statistics_of_the_training_split(split_folder, cache):
    datamodule = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2, batch_size=4)
    assert datamodule.class_names == ["cat", "dog"] and datamodule.num_classes == 2
    datamodule.setup("fit")
    train, val, test = datamodule.train_data, datamodule.val_data, datamodule.test_data
    assert (len(train[1]), len(val[1]), len(test[1])) == (10, 2, 4)
    assert sorted(val[1].tolist()) == [0, 1]  # stratified: one of each class
    assert train[0].dtype == torch.uint8 and train[0].shape[1:] == (3, 8, 8)
    assert test[0][:, 2].float().mean() > 240 and test[0][:, :2].float().mean() < 5  # test/ holds the blue images
    expected_mean = train[0].double().mean(dim=(0, 2, 3)) / 255
    expected_std = train[0].double().std(dim=(0, 2, 3), unbiased=False) / 255
    torch.testing.assert_close(torch.tensor(datamodule.mean, dtype=torch.float64), expected_mean)
    torch.testing.assert_close(torch.tensor(datamodule.std, dtype=torch.float64), expected_std)
    assert datamodule.mean[2] < 0.01  # from the training split only: no blue there
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (datamodule.crop_padding, datamodule.flip) == (1, True)
    assert DATAMODULES["image_folder"] is ImageFolderDataModule


def test_single_folder_is_split_by_val_and_test_size_with_the_seed(tmp_path, cache):
    root = tmp_path / "shapes"
    for name, colour in (("a", RED), ("b", GREEN), ("c", BLUE)):
        class_folder(root / name, colour, 10)
    datamodule = ImageFolderDataModule(str(root), image_size=8, val_size=0.2, test_size=3, seed=1)
    datamodule.setup()
    sizes = [len(d[1]) for d in (datamodule.train_data, datamodule.val_data, datamodule.test_data)]
    assert sizes == [21, 6, 3]
    assert torch.bincount(datamodule.val_data[1]).tolist() == [2, 2, 2]
    assert torch.bincount(datamodule.test_data[1]).tolist() == [1, 1, 1]
    images = torch.cat([datamodule.train_data[0], datamodule.val_data[0], datamodule.test_data[0]])
    assert len(images) == 30

    def val_images(seed):
        other = ImageFolderDataModule(str(root), image_size=8, val_size=0.2, test_size=3, seed=seed)
        other.setup()
        return other.val_data[0]

    assert torch.equal(val_images(1), datamodule.val_data[0])
    order_1, order_2 = stratified_order(torch.arange(30) % 3, 1), stratified_order(torch.arange(30) % 3, 2)
    assert sorted(order_1.tolist()) == list(range(30)) and not torch.equal(order_1, order_2)


def test_files_are_resized_and_converted_to_grayscale(tmp_path, cache):
    root = tmp_path / "sizes"
    save(root / "red" / "wide.png", RED, size=(20, 12))
    save(root / "red" / "small.png", RED, size=(4, 4))
    save(root / "green" / "square.webp", GREEN, size=(16, 16), lossless=True)
    rgb = ImageFolderDataModule(str(root), image_size=8, val_size=1, test_size=1)
    images, _ = rgb.load(train=True)
    assert images.shape[1:] == (3, 8, 8)
    gray = ImageFolderDataModule(str(root), image_size=6, in_channels=1, val_size=1, test_size=1)
    gray.setup()
    every = torch.cat([gray.train_data[0], gray.val_data[0], gray.test_data[0]])
    labels = torch.cat([gray.train_data[1], gray.val_data[1], gray.test_data[1]])
    assert every.shape == (3, 1, 6, 6)
    luma = {0: round(250 * 0.587), 1: round(250 * 0.299)}  # classes sorted: green, red
    assert all(int(image.float().mean().round()) == luma[int(label)] for image, label in zip(every, labels))
    assert len(gray.mean) == 1 and len(list(cache.glob("*.npz"))) == 2  # one cache per size and channels


def test_second_setup_reads_the_cache_without_decoding(split_folder, cache, decodes):
    first = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2)
    first.prepare_data()
    first.setup()
    assert len(decodes) == 16
    cached = first.cache_file()
    assert cached.parent == cache and cached.is_file()
    mtime = cached.stat().st_mtime_ns
    second = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.setup()
    assert len(decodes) == 16 and cached.stat().st_mtime_ns == mtime
    assert torch.equal(second.train_data[0], first.train_data[0]) and second.mean == first.mean
    assert not [p for p in cache.iterdir() if p.suffix != ".npz"]  # no temporary file left


def test_a_changed_file_rebuilds_the_cache_with_a_warning(split_folder, cache, decodes):
    ImageFolderDataModule(str(split_folder), image_size=8, val_size=2).setup()
    save(split_folder / "test" / "cat" / "000.png", GREEN)
    os.utime(split_folder / "test" / "cat" / "000.png", ns=(1, 1))
    rebuilt = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2)
    with pytest.warns(UserWarning, match=r"image cache .*\.npz was built from other files"):
        rebuilt.setup()
    assert len(decodes) == 32
    assert rebuilt.test_data[0][0, 1].float().mean() > 240  # the new green image
    (split_folder / "train" / "dog" / "005.jpg").unlink()
    with pytest.warns(UserWarning, match="other files"):
        ImageFolderDataModule(str(split_folder), image_size=8, val_size=2).setup()
    assert len(decodes) == 32 + 15


def test_a_truncated_cache_is_rebuilt_with_a_warning(split_folder, cache, decodes):
    datamodule = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2)
    datamodule.setup()
    cached = datamodule.cache_file()
    size = cached.stat().st_size
    cached.write_bytes(cached.read_bytes()[: size // 2])
    rebuilt = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2)
    with pytest.warns(UserWarning, match=rf"image cache {cached} is unreadable \(truncated or corrupt"):
        rebuilt.setup()
    assert len(decodes) == 32 and cached.stat().st_size == size
    assert torch.equal(rebuilt.train_data[0], datamodule.train_data[0])


def test_a_cache_built_from_another_folder_is_rebuilt_with_a_warning(tmp_path, split_folder, cache, decodes):
    other = tmp_path / "other"
    class_folder(other / "x", RED, 3)
    class_folder(other / "y", GREEN, 3)
    source = ImageFolderDataModule(str(other), image_size=8, val_size=1, test_size=1)
    source.setup()
    target = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2)
    target.cache_file().write_bytes(source.cache_file().read_bytes())
    with pytest.warns(UserWarning, match=rf"was built from another folder \({other}\)"):
        target.setup()
    assert target.class_names == ["cat", "dog"] and len(target.test_data[1]) == 4


@pytest.mark.parametrize("case", ["missing", "file"])
def test_a_missing_root_is_named(tmp_path, cache, case):
    root = tmp_path / "nowhere"
    if case == "file":
        root.write_text("not a folder")
    with pytest.raises(DataNotFoundError, match=rf"`root` {root} (does not exist|is not a folder).*class folders"):
        ImageFolderDataModule(str(root)).setup()
    with pytest.raises(DataNotFoundError, match=str(root)):
        _ = ImageFolderDataModule(str(root)).num_classes


def test_folders_without_classes_or_images_are_named(tmp_path, cache):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "notes.txt").write_text("a file outside any class folder")
    with pytest.raises(ValueError, match=rf"{root} must hold at least 2 class folders .* found none"):
        ImageFolderDataModule(str(root)).setup()
    class_folder(root / "only", RED, 2)
    with pytest.raises(ValueError, match=r"found only 'only'"):
        ImageFolderDataModule(str(root)).setup()
    (root / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"class folder {root / 'empty'} holds no files"):
        ImageFolderDataModule(str(root)).setup()
    assert not cache.exists()

    half = tmp_path / "half"
    class_folder(half / "train" / "a", RED, 2)
    class_folder(half / "train" / "b", RED, 2)
    with pytest.raises(ValueError, match=rf"`root` {half} has a train/ folder but no test/ folder"):
        ImageFolderDataModule(str(half)).setup()


def test_train_and_test_class_lists_that_differ_are_named(split_folder, cache):
    class_folder(split_folder / "test" / "bird", BLUE, 1)
    (split_folder / "train" / "cat").rename(split_folder / "train" / "kitten")
    expected = (rf"class folders of {split_folder / 'train'} and {split_folder / 'test'} differ: only in train: "
                rf"\['kitten'\], only in test: \['bird', 'cat'\]")
    with pytest.raises(ValueError, match=expected):
        _ = ImageFolderDataModule(str(split_folder)).class_names
    with pytest.raises(ValueError, match=expected):
        ImageFolderDataModule(str(split_folder)).setup()


def test_a_file_that_is_not_an_image_is_named_and_nothing_is_cached(split_folder, cache):
    bad = split_folder / "train" / "dog" / "readme.txt"
    bad.write_text("not an image")
    datamodule = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2)
    with pytest.raises(ValueError, match=rf"{bad} is not a readable image \(UnidentifiedImageError.*skip_unreadable"):
        datamodule.setup()
    assert datamodule.train_data is None and not datamodule.cache_file().exists()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_skip_unreadable_leaves_out_and_counts_the_files(split_folder, cache, decodes):
    (split_folder / "train" / "dog" / "readme.txt").write_text("not an image")
    truncated = split_folder / "train" / "cat" / "000.png"
    truncated.write_bytes(truncated.read_bytes()[:20])
    datamodule = ImageFolderDataModule(str(split_folder), image_size=8, val_size=2, skip_unreadable=True)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable files \(skip_unreadable=True\)"):
        datamodule.setup()
    assert len(datamodule.train_data[1]) + len(datamodule.val_data[1]) == 11 and len(decodes) == 17
    with pytest.warns(UserWarning, match="skipped 2 unreadable files"):  # counted again from the cache
        ImageFolderDataModule(str(split_folder), image_size=8, val_size=2, skip_unreadable=True).setup()
    assert len(decodes) == 17
    with pytest.raises(ValueError, match=rf"{truncated} is not a readable image .*\(and 1 more\)"):
        ImageFolderDataModule(str(split_folder), image_size=8, val_size=2).setup()

    for path in (split_folder / "test" / "dog").iterdir():
        path.write_text("no image either")
    empty = rf"class folder {split_folder / 'test' / 'dog'} holds no readable images"
    with pytest.warns(UserWarning, match="other files"), pytest.raises(ValueError, match=empty):
        ImageFolderDataModule(str(split_folder), image_size=8, val_size=2, skip_unreadable=True).setup()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"in_channels": 2}, r"`in_channels` must be 1 \(grayscale\) or 3 \(RGB\), got 2"),
    ({"val_size": 1.5}, r"`val_size` must be a count \(int >= 1\) or a fraction in \(0, 1\), got 1.5"),
    ({"test_size": 0}, r"`test_size` must be a count \(int >= 1\) or a fraction in \(0, 1\), got 0"),
    ({"image_size": 0}, r"`image_size` must be an int >= 1, got 0"),
    ({"crop_padding": -1}, r"`crop_padding` must be an int >= 0, got -1"),
])
def test_bad_arguments_are_named_with_what_is_allowed(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(str(tmp_path), **arguments)


def test_split_sizes_that_leave_no_training_images_or_do_not_fit_the_layout(split_folder, cache):
    with pytest.raises(ValueError, match=r"val_size=12 \(12 images\) leave no training images of the 12"):
        ImageFolderDataModule(str(split_folder), image_size=8, val_size=12).setup()
    with pytest.raises(ValueError, match=rf"`test_size` applies to a folder of class folders; {split_folder} has"):
        ImageFolderDataModule(str(split_folder), image_size=8, test_size=0.2).setup()
    with pytest.raises(ValueError, match=r"needs `root`"):
        ImageFolderDataModule().setup()


def test_parallel_decoding_matches_decoding_in_this_process(tmp_path, monkeypatch):
    folder = class_folder(tmp_path / "many", RED, 9, size=(12, 10))
    save(folder / "zz.txt", RED, format="PNG")
    (folder / "zzz.png").write_text("broken")
    paths = sorted(folder.iterdir())
    monkeypatch.setattr(decode_module, "CHUNK", 3)
    parallel, failed = decode_all(paths, 8, 3, workers=2)
    serial, failed_serial = decode_all(paths, 8, 3, workers=1)
    assert np.array_equal(parallel, serial) and parallel.shape == (11, 3, 8, 8)
    assert list(failed) == list(failed_serial) == [10] and "UnidentifiedImageError" in failed[10]


def test_channel_stats_are_exact_on_uint8_images():
    images = torch.randint(0, 256, (5, 2, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), images.double().mean((0, 2, 3)) / 255)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64),
                               images.double().std((0, 2, 3), unbiased=False) / 255)
    assert channel_stats(torch.full((2, 1, 2, 2), 7, dtype=torch.uint8))[1] == (1.0,)


def test_lrl_train_on_an_image_folder_records_its_class_names(split_folder, cache, tmp_path):
    from hydra import compose, initialize_config_dir

    from lrlightning.app.cli import CONF_DIR
    from lrlightning.app.train import train

    overrides = ["data=image_folder", f"data.root={split_folder}", "data.image_size=16", "+data.val_size=2",
                 "+data.batch_size=4", "model=simple_cnn", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "lowrank.every_n_train_steps=1", "+trainer.enable_progress_bar=false",
                 "+trainer.enable_model_summary=false", "latency_batch_sizes=[2]"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    summary = train(cfg, tmp_path / "run")
    assert summary["class_names"] == sorted(path.name for path in (split_folder / "train").iterdir())
    assert summary["global_step"] == 2 and summary["layers_compressed"] >= 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["class_names"] == summary["class_names"]
    assert summary["max_abs_logit_diff"] < 1e-3
