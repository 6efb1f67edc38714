"""Object-storage access through fsspec: every URL the project touches goes through here.

Secrets never pass through this module's arguments: credentials come from the standard AWS environment
variables / profiles on each node; ``storage_options`` carries only non-secret settings (endpoint, region).
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from .errors import ConfigError

log = logging.getLogger(__name__)

SECRET_OPTION_NAMES = frozenset(
    {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "password"}
)


def check_storage_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse secrets among storage options: they belong in AWS_* environment variables or profiles."""
    bad = sorted(k for k in options if k.lower() in SECRET_OPTION_NAMES)
    if bad:
        raise ConfigError(
            f"storage option {bad[0]!r} is a secret; set credentials with AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or a profile) instead"
        )
    return dict(options)


def has_protocol(url: str) -> bool:
    return "://" in url


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if has_protocol(url) else "file"


def is_absolute(url: str) -> bool:
    return has_protocol(url) or url.startswith("/")


def join(base: str, *parts: str) -> str:
    """Join URL or path segments with ``/`` (fsspec URLs always use forward slashes)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}" if part else out
    return out


def parent(url: str) -> str:
    """The folder holding ``url`` (``s3://b/a/m.csv`` -> ``s3://b/a``)."""
    if has_protocol(url):
        proto, rest = url.split("://", 1)
        return f"{proto}://{posixpath.dirname(rest.rstrip('/'))}"
    return posixpath.dirname(posixpath.abspath(url))


def resolve(uri: str, base_folder: str) -> str:
    """An absolute URL for ``uri``: kept when absolute, else relative to ``base_folder``."""
    if is_absolute(uri):
        return uri
    return join(base_folder, posixpath.normpath(uri))


def normalize_root(url: str) -> str:
    """An output root as an absolute URL (local paths made absolute, no trailing slash)."""
    if has_protocol(url):
        return url.rstrip("/")
    return posixpath.abspath(url)


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``url``."""
    fs, path = url_to_fs(url, **dict(storage_options or {}))
    return fs, path


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None, *, retries: int = 3) -> bytes:
    """Read a whole object, retrying transient errors; a missing object fails at once."""
    delay = 0.2
    for attempt in range(1, retries + 1):
        try:
            fs, path = filesystem(url, storage_options)
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except OSError as exc:
            if attempt == retries:
                raise
            log.warning("read of %s failed (%s), retry %d/%d", url, exc.__class__.__name__, attempt, retries)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a file or folder tree if it exists."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.invalidate_cache()


def glob(pattern: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URLs matching ``pattern``, with the pattern's protocol kept."""
    fs, path = filesystem(pattern, storage_options)
    fs.invalidate_cache()
    found = sorted(fs.glob(path))
    if not has_protocol(pattern):
        return found
    return [fs.unstrip_protocol(p) for p in found]
