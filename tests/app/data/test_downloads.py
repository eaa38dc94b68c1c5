"""Downloads: checked against the MD5, never a partial file."""
import hashlib
import io
import urllib.request

import pytest

from lrlightning.app.data import download


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
