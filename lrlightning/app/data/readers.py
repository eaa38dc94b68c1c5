"""Readers for the raw image-dataset formats: IDX (MNIST, Fashion-MNIST) and the CIFAR python archives.

Both return whole datasets as tensors, or raise a `ValueError` that names the file and what was wrong with it;
nothing is returned half-read. Only torch is needed for IDX; the CIFAR batches are numpy pickles, so numpy is
needed for them.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["read_idx", "read_cifar"]

IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
CIFAR_IMAGE_BYTES = 3 * 32 * 32
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (plain or gzip-compressed, detected from its first bytes).

    Returns a uint8 tensor of the shape stored in the header, e.g. (60000, 28, 28) for images, (60000,) for labels.
    Raises `ValueError` naming the file for a bad gzip stream, a bad magic number, a type other than unsigned
    byte, or a payload shorter or longer than the header says.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(f"{path}: corrupted or truncated gzip stream ({error})") from error
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes, need at least 4)")
    zero, type_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (magic number starts with {zero.hex()}, expected 0000)")
    if type_code != IDX_UBYTE:
        raise ValueError(f"{path}: IDX element type 0x{type_code:02x} is not supported (only unsigned byte, 0x08)")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header_bytes} for {ndim} dims)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    expected = math.prod(shape)
    found = len(raw) - header_bytes
    if found < expected:
        raise ValueError(f"{path}: truncated, header declares shape {shape} = {expected} bytes, found {found}")
    if found > expected:
        raise ValueError(f"{path}: {found - expected} trailing bytes after the {expected} bytes of shape {shape}")
    if expected == 0:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw[header_bytes:]), dtype=torch.uint8).reshape(shape)


def read_cifar(
    path_or_archive: str | os.PathLike, train: bool, coarse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 or CIFAR-100 from the official python version, without extracting anything to disk.

    `path_or_archive` is `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`, the extracted folder
    (`cifar-10-batches-py`, `cifar-100-python`), or a folder holding one of those. Which dataset it is follows
    from the batch names. `train` picks the 50000 training or 10000 test images; `coarse` picks CIFAR-100's 20
    superclass labels instead of its 100 fine labels.

    Returns (images uint8 N×3×32×32, labels int64 N). The batches are pickles: they are read with an unpickler
    that only builds numpy arrays, lists, dicts, strings and numbers, so a tampered file raises instead of
    running code. Corrupted or truncated files raise `ValueError` naming the file.
    """
    source = Path(path_or_archive)
    if not source.exists():
        raise FileNotFoundError(f"`path_or_archive` {str(source)!r} does not exist")
    members = _cifar_members(source)
    if all(name in members for name in CIFAR10_TRAIN_BATCHES + ("test_batch",)):
        if coarse:
            raise ValueError(f"`coarse`=True needs CIFAR-100, but {source} holds CIFAR-10")
        names, label_key, num_classes = (CIFAR10_TRAIN_BATCHES if train else ("test_batch",)), "labels", 10
    elif "train" in members and "test" in members:
        names = ("train",) if train else ("test",)
        label_key, num_classes = ("coarse_labels", 20) if coarse else ("fine_labels", 100)
    else:
        raise ValueError(
            f"{source}: no CIFAR python batches found (expected data_batch_1..5 + test_batch for CIFAR-10, "
            f"or train + test for CIFAR-100); found {sorted(members) or 'nothing'}"
        )
    parts = [_decode_cifar_batch(members[name](), f"{source}:{name}", label_key, num_classes) for name in names]
    images = torch.cat([images for images, _ in parts])
    labels = torch.cat([labels for _, labels in parts])
    return images, labels


def _cifar_members(source: Path) -> dict[str, Callable[[], bytes]]:
    """Map batch name -> zero-argument reader of its bytes, for an archive or a folder."""
    if source.is_dir():
        for folder in (source, source / CIFAR10_FOLDER, source / CIFAR100_FOLDER):
            files = {p.name: p.read_bytes for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
            if "test_batch" in files or "test" in files:
                return files
        return {}
    try:
        with tarfile.open(source, "r:*") as archive:
            contents = {
                Path(member.name).name: archive.extractfile(member).read()
                for member in archive.getmembers()
                if member.isfile() and Path(member.name).parent.name in (CIFAR10_FOLDER, CIFAR100_FOLDER)
            }
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{source}: corrupted or truncated archive ({type(error).__name__}: {error})") from error
    return {name: (lambda data=data: data) for name, data in contents.items()}


def _decode_cifar_batch(
    data: bytes, where: str, label_key: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch -> (uint8 N×3×32×32, int64 N), checking shapes, dtype and label range."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"{where}: not a valid CIFAR batch ({error})") from error
    except Exception as error:
        raise ValueError(f"{where}: corrupted or truncated pickle ({type(error).__name__}: {error})") from error
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{where}: expected a dict with 'data' and {label_key!r}, found {keys}")
    array, labels = batch["data"], batch[label_key]
    if getattr(array, "dtype", None) != "uint8" or array.ndim != 2 or array.shape[1] != CIFAR_IMAGE_BYTES:
        found = f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}"
        raise ValueError(f"{where}: 'data' must be uint8 of shape (N, {CIFAR_IMAGE_BYTES}), found {found}")
    labels = torch.as_tensor(list(labels), dtype=torch.int64)
    if labels.shape != (array.shape[0],):
        raise ValueError(f"{where}: {array.shape[0]} images but {labels.numel()} labels in {label_key!r}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels outside [0, {num_classes}) in {label_key!r}")
    images = torch.from_numpy(array.copy()).reshape(-1, 3, 32, 32)
    return images, labels


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the few globals numpy arrays need; anything else is refused."""

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return allowed[(module, name)]


def _allowed_globals() -> dict[tuple[str, str], object]:
    import _codecs

    import numpy

    try:
        from numpy._core import multiarray, numeric
    except ImportError:
        from numpy.core import multiarray, numeric
    allowed = {
        ("numpy", "ndarray"): numpy.ndarray,
        ("numpy", "dtype"): numpy.dtype,
        ("_codecs", "encode"): _codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed
