"""Object-storage access through fsspec: every URL the project touches goes through here.

Secrets never pass through this module's arguments: credentials come from the standard AWS environment
variables / profiles on each node; ``storage_options`` carries only non-secret settings (endpoint, region).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"  # a local write in progress (see put_whole); readers and listings skip dot-files
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


def has_credentials(url: str) -> bool:
    """True for a URL with ``user[:secret]@`` in its authority (``s3://KEY:SECRET@bucket/...``)."""
    if not has_protocol(url):
        return False
    authority = url.split("://", 1)[1].split("/", 1)[0]
    return "@" in authority


def redact(url: str) -> str:
    """``url`` safe for a message: credentials in the authority replaced by ``***``, at most 200 characters."""
    if has_credentials(url):
        proto, rest = url.split("://", 1)
        authority, _, tail = rest.partition("/")
        url = f"{proto}://***@{authority.rsplit('@', 1)[1]}/{tail}"
    return url if len(url) <= 200 else f"{url[:120]}…{url[-60:]} ({len(url)} chars)"


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``url``.

    Raises :class:`ConfigError` for a URL carrying credentials (never echoed) and for storage options the
    filesystem does not take.
    """
    if has_credentials(url):
        raise ConfigError(f"{redact(url)}: credentials inside a URL are refused; set AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY (or a profile) instead")
    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
    except TypeError as exc:
        names = ", ".join(sorted(storage_options or {})) or "none"
        raise ConfigError(f"storage options ({names}) are not accepted for {protocol_of(url)}:// URLs: "
                          f"{' '.join(str(exc).split())[:200]}") from None
    except ValueError as exc:
        raise ConfigError(f"{redact(url)}: {' '.join(str(exc).split())[:200]}") from None
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
    """Write a whole object so that no reader ever sees part of it (see :func:`put_whole`)."""
    fs, path = filesystem(url, storage_options)
    put_whole(fs, path, data)


def put_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One object, all or nothing: on a local disk a temporary file in the same folder renamed over the
    target (``os.replace`` is atomic); on an object store a single PUT, which is atomic there."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    folder = posixpath.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_exclusive(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Create ``url`` only if it does not exist yet; False when another writer got there first.

    Local disks use ``O_EXCL`` (via a hard link of a fully written temporary file, so the object is never seen
    half written); object stores a conditional PUT (``If-None-Match: *``), which S3 and MinIO honour.
    """
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    try:
        with fs.open(path, "xb") as fh:
            fh.write(data)
        return True
    except FileExistsError:
        return False


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a file or folder tree if it exists."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.invalidate_cache()


def list_names(folder: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names (not paths) of the entries directly inside ``folder``, sorted; ``[]`` when it does not exist.

    The one way the project enumerates stored objects: an exact prefix listed and compared, never a glob on a
    user-supplied name (a lot called ``L[A]`` must not match ``LA``).
    """
    fs, path = filesystem(folder, storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    base = path.rstrip("/")
    names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries if str(e).rstrip("/") != base}
    return sorted(n for n in names if n)
