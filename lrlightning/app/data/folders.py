"""What an image folder holds: its layout, its class names and its files, with the errors for folders that do not
fit either layout.

Two layouts: `root/train/<class>/...` with `root/test/<class>/...` (the same classes), or `root/<class>/...`.
Classes are the sorted names of the class folders; a class folder's files are taken from it and its subfolders
at any depth, in sorted order. Names starting with "." are ignored, and so are files directly in `root`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .files import DataNotFoundError

SPLITS = ("train", "test")
LAYOUTS = "root/<class>/* (split by val_size and test_size) or root/train/<class>/* with root/test/<class>/*"


@dataclass
class FolderListing:
    """The files of an image folder: `paths` (str), their `labels` (class index) and `splits` (0 train, 1 test),
    and `entries` (path relative to the root with "/", size in bytes, mtime in ns) to key a cache on."""

    root: Path
    class_names: list[str]
    has_test: bool
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    splits: list[int] = field(default_factory=list)
    entries: list[tuple[str, int, int]] = field(default_factory=list)


def check_root(root: Path) -> Path:
    """`root` if it is a folder; else a `DataNotFoundError` naming it."""
    if not root.exists():
        raise DataNotFoundError(f"`root` {root} does not exist; expected a folder of images in class folders: "
                                f"{LAYOUTS}")
    if not root.is_dir():
        raise DataNotFoundError(f"`root` {root} is not a folder; expected a folder of images in class folders: "
                                f"{LAYOUTS}")
    return root


def has_splits(root: Path) -> bool:
    """Whether `root` has the train/test layout; a ValueError when it has only one of the two folders."""
    present = [name for name in SPLITS if (root / name).is_dir()]
    if len(present) == 1:
        missing = next(name for name in SPLITS if name not in present)
        raise ValueError(f"`root` {root} has a {present[0]}/ folder but no {missing}/ folder; expected {LAYOUTS}")
    return len(present) == 2


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the class folders in `folder` (subfolders not starting with "."); a ValueError when there
    are fewer than 2."""
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise ValueError(f"{folder} must hold at least 2 class folders (one per class, with its images), found "
                         f"{found}; expected {LAYOUTS}")
    return names


def find_classes(root: Path) -> tuple[list[str], bool]:
    """The class names of the image folder `root` and whether it has the train/test layout; errors name the path
    at fault (missing root, fewer than 2 class folders, train and test classes that differ)."""
    check_root(root)
    if not has_splits(root):
        return class_folders(root), False
    train, test = class_folders(root / "train"), class_folders(root / "test")
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ValueError(f"the class folders of {root / 'train'} and {root / 'test'} differ: only in train: "
                         f"{only_train}, only in test: {only_test}; both must hold the same class folders")
    return train, True


def list_folder(root: Path) -> FolderListing:
    """Every file of the image folder `root` with its class and split; a ValueError naming an empty class folder."""
    class_names, split_layout = find_classes(root)
    listing = FolderListing(root, class_names, split_layout)
    for split, name in enumerate(SPLITS if split_layout else ("",)):
        for label, class_name in enumerate(class_names):
            relative = f"{name}/{class_name}" if name else class_name
            files = _files_under(str(root), relative)
            if not files:
                raise ValueError(f"class folder {root / relative} holds no files; every class folder needs images")
            for path, entry in files:
                listing.paths.append(path)
                listing.entries.append(entry)
            listing.labels.extend([label] * len(files))
            listing.splits.extend([split] * len(files))
    return listing


def _files_under(root: str, relative: str) -> list[tuple[str, tuple[str, int, int]]]:
    """(path, (path relative to `root`, size in bytes, mtime in ns)) of the files under `root`/`relative`, in
    sorted order, hidden names left out (plain strings: a folder may hold millions of files)."""
    found = []
    for entry in sorted(os.scandir(os.path.join(root, relative)), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        name = f"{relative}/{entry.name}"
        if entry.is_dir():
            found.extend(_files_under(root, name))
        elif entry.is_file():
            stat = entry.stat()
            found.append((entry.path, (name, stat.st_size, stat.st_mtime_ns)))
    return found
