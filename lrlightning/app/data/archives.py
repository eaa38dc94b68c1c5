"""Extraction of a tar archive into a folder, atomically: extracted beside it, then renamed into place."""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def extract_tar(archive: str | os.PathLike, target: str | os.PathLike, required: tuple[str, ...] = ()) -> Path:
    """Extract the tar archive `archive` (any compression `tarfile` reads) so that its content is the folder
    `target`, and return `target`; never leaves a partial folder there.

    The archive is extracted into a temporary folder beside `target` with tarfile's "data" filter (no absolute
    paths, no links or paths leading outside, no device files), then renamed to `target`. An archive holding a
    single top folder gives that folder's content. `required`: names that must be at the top of the content, else
    a ValueError naming the archive. `target` must be absent or an empty folder. If another process put a folder
    with the `required` names at `target` meanwhile, that one is kept.
    """
    archive, target = Path(archive), Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"cannot extract {archive} into {target}: it exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
    start = time.perf_counter()
    try:
        try:
            with tarfile.open(archive) as tar:
                safe_extract(tar, partial, archive)
        except (tarfile.TarError, EOFError, OSError) as error:
            raise ValueError(f"cannot extract {archive}: {type(error).__name__}: {error}") from error
        content = _content(partial, required)
        missing = [name for name in required if not (content / name).exists()]
        if missing:
            found = sorted(p.name for p in content.iterdir())
            raise ValueError(f"archive {archive} must hold {list(required)} at its top (or in a single top folder), "
                             f"found {found}")
        try:
            if target.is_dir():
                target.rmdir()
            content.rename(target)
        except OSError:
            if not all((target / name).exists() for name in required) or not required:
                raise
            log.info("%s was extracted into %s by another process", archive, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("extracted %s into %s in %.1f s", archive, target, time.perf_counter() - start)
    return target


def safe_extract(tar: tarfile.TarFile, folder: Path, archive: Path) -> None:
    """Extract ``tar`` into ``folder`` with tarfile's "data" filter; on a Python without it (before 3.10.12), only
    an archive of plain files and folders with relative paths inside ``folder`` is extracted."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(folder, filter="data")
        return
    for member in tar.getmembers():
        inside = (folder / member.name).resolve().is_relative_to(folder.resolve())
        if not (member.isfile() or member.isdir()) or Path(member.name).is_absolute() or not inside:
            raise ValueError(f"archive {archive} holds {member.name!r}, which is not a plain file or folder inside it")
    tar.extractall(folder)


def _content(folder: Path, required: tuple[str, ...]) -> Path:
    """`folder`, or its single subfolder when it holds nothing else and not the `required` names itself."""
    entries = list(folder.iterdir())
    if required and all((folder / name).exists() for name in required):
        return folder
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder
