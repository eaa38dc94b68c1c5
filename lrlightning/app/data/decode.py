"""Decoding image files (JPEG, PNG, WebP, anything Pillow reads) into one uint8 (N, C, S, S) array, in parallel
over the CPU's cores with a progress bar."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

MODES = {1: "L", 3: "RGB"}
CHUNK = 512  # images per task of a worker process
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(path: str | os.PathLike, image_size: int, channels: int = 3) -> np.ndarray:
    """The image at `path` as uint8 (channels, image_size, image_size): RGB (`channels=3`) or grayscale (1),
    resized (bilinear, antialiased, aspect ratio not kept) where its size differs. Raises what Pillow raises for a
    file it cannot read (an `OSError` such as `PIL.UnidentifiedImageError`, or a `ValueError`)."""
    size = (image_size, image_size)
    with Image.open(path) as image:
        image.draft(MODES[channels], size)
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        image = image.convert(MODES[channels])
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_chunk(paths: list[str], image_size: int, channels: int) -> tuple[np.ndarray, dict[int, str]]:
    """Decode `paths` into uint8 (len(paths), channels, image_size, image_size); the images that could not be read
    stay zero and come back as {position: reason}."""
    images = np.zeros((len(paths), channels, image_size, image_size), dtype=np.uint8)
    failed = {}
    for position, path in enumerate(paths):
        try:
            images[position] = decode_image(path, image_size, channels)
        except DECODE_ERRORS as error:
            failed[position] = f"{type(error).__name__}: {error}"
    return images, failed


def default_workers() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_all(paths: list[str | os.PathLike], image_size: int, channels: int = 3, workers: int | None = None,
               desc: str = "decoding") -> tuple[np.ndarray, dict[int, str]]:
    """Decode every file of `paths` into uint8 (N, channels, image_size, image_size), in `workers` processes
    (None: the CPU's cores; 1, or a single chunk of `CHUNK` images: in this process), with a progress bar.
    Returns the images and {index: reason} of the files that could not be read (their images are zero)."""
    workers = default_workers() if workers is None else workers
    start = time.perf_counter()
    images = np.zeros((len(paths), channels, image_size, image_size), dtype=np.uint8)
    failed: dict[int, str] = {}
    names = [str(p) for p in paths]
    chunks = [(begin, names[begin:begin + CHUNK]) for begin in range(0, len(names), CHUNK)]
    processes = 1 if workers <= 1 or len(chunks) <= 1 else min(workers, len(chunks))
    log.info("decoding %d images to %d×%d px in %d processes", len(names), image_size, image_size, processes)
    with tqdm(total=len(names), desc=desc, unit="img", disable=None) as bar:
        if processes == 1:
            results = ((begin, decode_chunk(chunk, image_size, channels)) for begin, chunk in chunks)
            _collect(results, images, failed, bar)
        else:
            with ProcessPoolExecutor(max_workers=processes) as pool:
                futures = [(begin, pool.submit(decode_chunk, chunk, image_size, channels)) for begin, chunk in chunks]
                _collect(((begin, future.result()) for begin, future in futures), images, failed, bar)
    log.info("decoded %d images in %.1f s", len(names), time.perf_counter() - start)
    return images, failed


def _collect(results, images: np.ndarray, failed: dict[int, str], bar: tqdm) -> None:
    for begin, (chunk, chunk_failed) in results:
        images[begin:begin + len(chunk)] = chunk
        failed.update({begin + position: reason for position, reason in chunk_failed.items()})
        bar.update(len(chunk))
