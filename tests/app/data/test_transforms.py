"""Batched augmentation and normalization."""
import torch

from lrlightning.app.data import BatchTransform, normalize, random_crop, random_horizontal_flip


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
