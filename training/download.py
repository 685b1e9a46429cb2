"""Downloads into a cache, checked by sha256 and moved into place only when complete."""

import hashlib
import http.client
import urllib.request
from pathlib import Path

from tqdm import tqdm


class DownloadError(RuntimeError):
    """A file could not be downloaded or did not match its expected hash."""


def download(url: str, dest: Path, sha256: str | None) -> Path:
    """`dest`, fetched from `url` unless a file with the expected sha256 is already there.

    sha256=None is for an archive whose own hash is not published: it is always fetched, and the
    caller checks the hash of what it extracts.
    """
    if sha256 is not None and dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as exc:  # HTTPException: e.g. the connection dropped mid-body
        partial.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url}: {exc}") from exc
    if sha256 is not None and digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{url}: sha256 {digest.hexdigest()} does not match expected {sha256}")
    partial.replace(dest)
    return dest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
