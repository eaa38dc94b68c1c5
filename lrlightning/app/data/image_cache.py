"""The decode cache of an image folder: one uncompressed `.npz` file per (folder, image size, channels) under
`$LRLIGHTNING_CACHE/image_folder` (default `~/.cache/lrlightning/image_folder`), keyed on the folder's file list
with sizes and modification times.

The file holds `images` (uint8 N×C×S×S), `labels` (int64 N), `splits` (int8 N: 0 train, 1 test) and `meta` (a
JSON string: format version, folder, image size, channels, class names, key, unreadable files). It is written to
a temporary file beside it and renamed into place, so it is either complete or absent. A cache that cannot be
read (truncated, corrupt) or was built from another folder, other settings or other files is rebuilt, with a
warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...speed.latency import default_cache_dir

FORMAT_VERSION = 1
SUBDIR = "image_folder"
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


@dataclass
class DecodedFolder:
    """A decoded image folder: `images` uint8 (N, C, S, S), `labels` int64 (N,), `splits` int8 (N,) (0 train,
    1 test), `class_names`, and the files left out as unreadable ({path relative to the folder: reason})."""

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    class_names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


def cache_path(root: Path, image_size: int, channels: int, cache_dir: Path | None = None) -> Path:
    """The cache file of folder `root` decoded at `image_size` px with `channels` channels."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / SUBDIR
    digest = hashlib.sha256(f"{root.resolve()}\0{image_size}\0{channels}".encode()).hexdigest()[:16]
    return folder.expanduser() / f"{root.resolve().name}-{image_size}px-{channels}ch-{digest}.npz"


def file_key(entries: list[tuple[str, int, int]]) -> str:
    """SHA-256 of the (relative path, size in bytes, mtime in ns) of every file, in order."""
    digest = hashlib.sha256()
    for name, size, mtime_ns in entries:
        digest.update(f"{name}\0{size}\0{mtime_ns}\n".encode())
    return digest.hexdigest()


def describe(root: Path, image_size: int, channels: int, key: str) -> dict:
    """The `meta` entries a cache must match to be used."""
    return {"version": FORMAT_VERSION, "root": str(root.resolve()), "image_size": image_size,
            "channels": channels, "key": key}


def read_cache(path: Path, expected: dict) -> DecodedFolder | None:
    """The cached folder at `path` if it exists and matches `expected` (`describe`); None otherwise, with a
    warning when a file is there but unreadable or built from another folder, settings or files."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            stale = _mismatch(meta, expected)
            if stale:
                warnings.warn(f"image cache {path} was built from {stale}: rebuilding it", stacklevel=3)
                return None
            folder = DecodedFolder(archive["images"], archive["labels"], archive["splits"],
                                   list(meta["class_names"]), dict(meta["skipped"]))
    except READ_ERRORS as error:
        warnings.warn(f"image cache {path} is unreadable (truncated or corrupt: {type(error).__name__}: {error}): "
                      f"rebuilding it", stacklevel=3)
        return None
    count = len(folder.labels)
    if folder.images.shape != (count, expected["channels"], expected["image_size"], expected["image_size"]) \
            or folder.splits.shape != (count,):
        warnings.warn(f"image cache {path} holds arrays of the wrong shape {folder.images.shape}: rebuilding it",
                      stacklevel=3)
        return None
    return folder


def write_cache(path: Path, folder: DecodedFolder, meta: dict) -> Path:
    """Write `folder` with `meta` (`describe`) to `path` atomically (temporary file, then rename); returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    record = {**meta, "class_names": folder.class_names, "skipped": folder.skipped}
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, images=folder.images, labels=folder.labels.astype(np.int64),
                     splits=folder.splits.astype(np.int8), meta=np.array(json.dumps(record)))
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path


def _mismatch(meta: dict, expected: dict) -> str | None:
    if meta.get("root") != expected["root"]:
        return f"another folder ({meta.get('root')})"
    for name in ("version", "image_size", "channels"):
        if meta.get(name) != expected[name]:
            return f"another {name} ({meta.get(name)!r}, now {expected[name]!r})"
    if meta.get("key") != expected["key"]:
        return "other files (files were added, removed or changed since)"
    return None
