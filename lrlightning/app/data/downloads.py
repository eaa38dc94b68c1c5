"""Download of dataset files: streamed, checked against an MD5, renamed into place (never a partial file)."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

DOWNLOAD_TIMEOUT_S = 60.0


def download(
    url: str, destination: str | os.PathLike, md5: str | None = None, timeout: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """Download `url` to `destination` and return its path; never leaves a partial file there.

    Streams into a temporary file next to `destination`, checks the MD5 when given, then renames it into place.
    `timeout` (seconds) bounds each network wait. Raises `OSError` (e.g. `urllib.error.URLError`) when offline,
    `ValueError` on an MD5 mismatch.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_path = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise ValueError(f"{url}: MD5 {digest.hexdigest()} differs from the expected {md5} (incomplete or altered)")
        os.replace(partial_path, destination)
    except BaseException:
        Path(partial_path).unlink(missing_ok=True)
        raise
    return destination
