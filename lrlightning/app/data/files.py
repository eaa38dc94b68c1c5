"""Datasets read from files: where they are searched, their download when absent, the error when they are missing.

File-based datasets are searched in this order: the `root` argument, the dataset's environment variable, the
system folder (Fashion-MNIST only: `/usr/share/datasets/fashion-mnist`), the download folder (`root`, else
`$LRL_DATA_ROOT/<key>`, else `~/.cache/lrlightning/<key>`). A folder may hold the files directly or in
torchvision's layout (`FashionMNIST/raw`, `MNIST/raw`). If none has them and `download=True`, they are
downloaded into the download folder; otherwise `DataNotFoundError` says where it looked and how to get them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .base import ImageDataModule

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "LRL_DATA_ROOT"
DEFAULT_DATA_ROOT = Path("~/.cache/lrlightning")


class DataNotFoundError(FileNotFoundError):
    """A dataset is in none of the searched folders and could not be downloaded."""


class FileDataModule(ImageDataModule):
    """Dataset read from files found in a list of folders, downloaded into the first writable choice if absent."""

    key = "dataset"
    env_var = DATA_ROOT_ENV
    source_url = ""
    install_hint = ""

    def prepare_data(self) -> None:
        """Find the files, downloading them when absent and `download=True` (runs on one process per node)."""
        self._locate()

    def search_dirs(self) -> list[Path]:
        """Folders searched, in order."""
        dirs = [self.root] if self.root is not None else []
        if os.environ.get(self.env_var):
            dirs.append(self._env_dir())
        return dirs + self._system_dirs() + [self.download_dir()]

    def download_dir(self) -> Path:
        """Where downloads go: `root`, else `$LRL_DATA_ROOT/<key>`, else `~/.cache/lrlightning/<key>`."""
        if self.root is not None:
            return self.root
        return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).expanduser() / self.key

    def find(self, folder: Path):
        """The dataset's files in `folder` (in the form `read` takes), or None."""
        raise NotImplementedError

    def fetch(self, folder: Path) -> None:
        """Download the dataset into `folder`."""
        raise NotImplementedError

    def read(self, found, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read(self._locate(), train)

    def _env_dir(self) -> Path:
        value = Path(os.environ[self.env_var]).expanduser()
        return value / self.key if self.env_var == DATA_ROOT_ENV else value

    def _system_dirs(self) -> list[Path]:
        return []

    def _locate(self):
        searched = list(dict.fromkeys(self.search_dirs()))
        for folder in searched:
            found = self.find(folder)
            if found is not None:
                log.info("%s: using %s", self.name, folder)
                return found
        if not self.download:
            raise self._not_found(searched, "download disabled (download=False)")
        target = self.download_dir()
        try:
            self.fetch(target)
        except (OSError, ValueError) as error:
            raise self._not_found(searched, f"download from {self.source_url} failed: {error}") from error
        found = self.find(target)
        if found is None:
            raise self._not_found(searched, f"download into {target} did not produce the expected files")
        return found

    def _not_found(self, searched: list[Path], reason: str) -> DataNotFoundError:
        env_way = (
            f"set {self.env_var}=/path/to/folder"
            if self.env_var != DATA_ROOT_ENV
            else f"set {DATA_ROOT_ENV}=/path/to/parent, with the files in its `{self.key}` subfolder"
        )
        third_way = f"{self.install_hint}, or " if self.install_hint else ""
        return DataNotFoundError(
            f"{self.name} not found. Looked in: {', '.join(map(str, searched))}; {reason}.\n"
            f"Get it in one of three ways:\n"
            f"  1. pass root=/path/to/folder (lrl-train: +data.root=...) for a folder holding {self._expected_files()};\n"
            f"  2. {env_way};\n"
            f"  3. {third_way}run once online with download=True (fetches {self.source_url} into "
            f"{self.download_dir()})."
        )

    def _expected_files(self) -> str:
        raise NotImplementedError
