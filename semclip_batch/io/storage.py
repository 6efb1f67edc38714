"""Object-storage access through fsspec: every URL the project touches goes through here.

Secrets never pass through this module's arguments: credentials come from the standard AWS environment
variables / profiles on each node; ``storage_options`` carries only non-secret settings (endpoint, region).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from semclip_batch.errors import ConfigError, shorten

log = logging.getLogger(__name__)
T = TypeVar("T")

TEMP_PREFIX = ".tmp-"  # a local write in progress (see put_whole); readers and listings skip dot-files
SECRET_OPTION_NAMES = frozenset(
    {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "password"}
)


FLAG_OPTIONS = {"endpoint_url": str, "region_name": str, "anon": bool, "use_ssl": bool, "requester_pays": bool}
"""The storage options ``--storage-option KEY=VALUE`` takes: flat, non-secret settings of s3fs-like stores."""


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"storage option {key}: expected true or false, got {str(value)[:40]!r}")
    return text in ("true", "1", "yes")


def check_storage_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate storage options given as flags: only :data:`FLAG_OPTIONS`; secrets are refused (they belong in
    AWS_* environment variables or profiles), nested options (``client_kwargs=`` ...) too."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key.lower() in SECRET_OPTION_NAMES:
            raise ConfigError(
                f"storage option {key!r} is a secret; set credentials with AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or a profile) instead"
            )
        kind = FLAG_OPTIONS.get(key)
        if kind is None:
            raise ConfigError(f"unknown storage option {key[:40]!r}; accepted: {', '.join(FLAG_OPTIONS)}")
        if kind is not bool and has_credentials(str(value)):  # an endpoint_url=http://KEY:SECRET@host
            raise ConfigError(f"storage option {key!r} {redact(str(value))}: credentials inside a URL are refused; set "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile) instead")
        out[key] = _parse_bool(key, value) if kind is bool else str(value)
    return out


S3_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 10}
"""Seconds botocore waits for a connection, and between two reads of an answer (not for the whole object); s3fs's
defaults are 5 and 15."""
S3FS_TRIES = 2
"""s3fs's own tries of a call, around botocore's (which retries timeouts, resets and 5xx answers itself) and under
this module's (:data:`RETRY_ATTEMPTS`); a second one still covers a connection dropped mid-body on the reads this
module does not wrap (ranged reads, listings, pyarrow datasets). With s3fs's 5 tries of botocore's 5 attempts at a
15 s read timeout, an endpoint that accepts connections and never answers held one read ~7 minutes (a `run` or
`query` seemed to hang); now it fails in about 2 minutes (2 x 5 attempts of 10 s) as the row's ``read_error``."""


def fs_kwargs(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options as the filesystem of ``url`` takes them (``region_name`` goes to the S3 client)."""
    opts = dict(storage_options or {})
    region = opts.pop("region_name", None)
    if region is not None and protocol_of(url) in ("s3", "s3a"):
        opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "region_name": region}
    if protocol_of(url) in ("s3", "s3a"):
        opts["config_kwargs"] = {**S3_TIMEOUTS, **opts.get("config_kwargs", {})}
    if not has_protocol(url):
        opts = {}
    return opts


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
    if not has_protocol(url):  # a local path is taken literally ("a::b.png" is a file name, not a URL chain)
        return LocalFileSystem(), posixpath.abspath(url)
    try:
        # the URL's own filesystem, taken literally: "::" inside a key (a lot id may hold it) is not a URL chain
        cls = fsspec.get_filesystem_class(protocol_of(url))
        fs, path = cls(**fs_kwargs(url, storage_options)), cls._strip_protocol(url)
        if hasattr(fs, "retries") and protocol_of(url) in ("s3", "s3a"):  # s3fs's own tries (a class attribute)
            fs.retries = S3FS_TRIES
    except TypeError as exc:
        names = ", ".join(sorted(storage_options or {})) or "none"
        raise ConfigError(f"storage options ({names}) are not accepted for {protocol_of(url)}:// URLs: "
                          f"{shorten(str(exc), 200)}") from None
    except ValueError as exc:
        raise ConfigError(f"{redact(url)}: {shorten(str(exc), 200)}") from None
    return fs, path


READ_BLOCK_BYTES = 1 << 16  # read-ahead of read_with: each TIFF header on the way to a page costs one such read
RETRY_ATTEMPTS = 3
"""Tries of one :func:`read_bytes` / :func:`write_bytes` call, the first included. On S3 each try is itself up
to 5 botocore attempts (its default "legacy" retry mode, up to 15 s of its own backoff), so this layer only
adds tries for outages longer than botocore rides out, and for errors it does not retry."""
RETRY_BASE_DELAY_S = 0.25
"""Wait before the second try; doubled for each further try, capped at :data:`RETRY_MAX_DELAY_S`, and
jittered down to half of that at random (so many workers that failed together do not retry together)."""
RETRY_MAX_DELAY_S = 4.0
"""Longest wait between two tries."""
RETRY_DEADLINE_S = 10.0
"""No new try starts once this long has passed since the first began: an object that keeps failing fails
within this plus one try (on S3 at most ~15 s of botocore backoff, or its 5 attempts' read timeouts: see
:data:`S3_TIMEOUTS`), never hangs the worker."""
TRANSIENT_HTTP_STATUSES = frozenset({429, 500, 502, 503, 504})
TRANSIENT_ERROR_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "BandwidthLimitExceeded", "InternalError", "ServiceUnavailable", "RequestTimeout",
})
"""S3 error codes (or HTTP statuses) worth another try: throttling, server-side faults, timeouts."""


def _transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is worth another try: a 5xx or throttling answer,
    a connection reset or closed, a timeout. Never a missing object, a folder, a refused permission, nor any
    other answer the store gave on purpose."""
    import aiohttp
    import botocore.exceptions as bex

    seen: list[BaseException] = []
    err: BaseException | None = exc
    while err is not None and len(seen) < 8 and err not in seen:
        seen.append(err)
        if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)):
            return False
        if isinstance(err, (bex.SSLError, aiohttp.ClientSSLError)):  # a certificate does not fix itself
            return False
        if isinstance(err, (ConnectionError, TimeoutError, bex.ConnectionError, bex.HTTPClientError,
                            aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
        if isinstance(err, aiohttp.ClientResponseError):
            return err.status in TRANSIENT_HTTP_STATUSES
        if isinstance(err, bex.ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in TRANSIENT_ERROR_CODES or status in TRANSIENT_HTTP_STATUSES or (
                code.isdigit() and int(code) in TRANSIENT_HTTP_STATUSES)
        err = err.__cause__ if err.__cause__ is not None else None if err.__suppress_context__ else err.__context__
    return False


def _with_retries(action: str, url: str, call: Callable[[], T], attempts: int) -> T:
    """``call()``, tried again on :func:`_transient` errors per the ``RETRY_*`` policy above. A transient error
    that is not an ``OSError`` (botocore's ``EndpointConnectionError``...) is raised, after the last try, as an
    ``OSError`` from it, so callers handle every storage failure as one ``OSError``."""
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            delay = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if not _transient(exc):
                raise
            last = attempt == attempts or time.monotonic() - start + delay > RETRY_DEADLINE_S
            if last and isinstance(exc, OSError):
                raise
            if last:
                raise OSError(errno.EIO, f"{action} {redact(url)} failed after {attempt} tries: "
                                         f"{exc.__class__.__name__}: {shorten(str(exc), 200)}") from exc
            log.warning("%s %s failed (%s), try %d/%d in %.2f s", action, redact(url), exc.__class__.__name__,
                        attempt + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None, *, retries: int = RETRY_ATTEMPTS) -> bytes:
    """Read a whole object in up to ``retries`` tries (transient errors only, see :func:`_transient`); a missing
    object fails at once."""
    fs, path = filesystem(url, storage_options)
    return _with_retries("read of", url, lambda: fs.cat_file(path), retries)


def read_with(url: str, storage_options: Mapping[str, Any] | None, reader: Callable[[BinaryIO], T], *,
              retries: int = RETRY_ATTEMPTS) -> T:
    """``reader`` applied to the object opened for reading (seekable; on object stores ranged reads through a
    read-ahead cache), in up to ``retries`` tries like :func:`read_bytes`."""
    fs, path = filesystem(url, storage_options)

    def call() -> T:
        with fs.open(path, "rb", cache_type="readahead", block_size=READ_BLOCK_BYTES) as fh:
            return reader(fh)

    return _with_retries("read of", url, call, retries)


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a whole object so that no reader ever sees part of it (see :func:`put_whole`), in up to
    :data:`RETRY_ATTEMPTS` tries (a whole-object PUT can be repeated)."""
    fs, path = filesystem(url, storage_options)
    _with_retries("write of", url, lambda: put_whole(fs, path, data), RETRY_ATTEMPTS)


def move_file(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Move one file onto ``target``, both paths taken literally (``fs.mv`` and ``fs.rm`` expand ``*``, ``?`` and
    ``[`` on object stores): a rename on a local disk, a copy then a delete elsewhere."""
    if isinstance(fs, LocalFileSystem):
        os.replace(source, target)
        return
    fs.cp_file(source, target)
    fs.rm_file(source)


def put_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One object, all or nothing: on a local disk a temporary file in the same folder renamed over the
    target (``os.replace`` is atomic); on an object store a single PUT, which is atomic there."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    tmp = _temporary_copy(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _new_temporary(folder: str) -> tuple[int, str]:
    """A new dot-file in ``folder`` opened for writing, created with mode 0666 so that the kernel applies the
    umask (and a folder's default ACL) as for any new file (``mkstemp`` makes it 0600, which the rename kept)."""
    while True:
        tmp = posixpath.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # 64 random bits taken already: draw again
            continue


def _temporary_copy(path: str, data: bytes) -> str:
    """``data`` written whole to a new dot-file beside ``path`` (removed again if the write fails)."""
    folder = posixpath.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _new_temporary(folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def create_exclusive(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Create ``url`` only if it does not exist yet; False when another writer got there first.

    Local disks use ``O_EXCL`` (via a hard link of a fully written temporary file, so the object is never seen
    half written); object stores a conditional PUT (``If-None-Match: *``), which S3 and MinIO honour.
    """
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        tmp = _temporary_copy(path, data)
        try:
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


_GLOB_MAGIC = re.compile(r"[*?\[]")


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a file or folder tree if it exists, the path taken literally: an object store's ``rm`` expands ``*``,
    ``?`` and ``[`` in it (an OUT named ``o*x`` would take ``oZx``'s files with it), so there each object found
    below it is removed by its own name."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        if _GLOB_MAGIC.search(path) and not isinstance(fs, LocalFileSystem):
            for key in fs.find(path):
                fs.rm_file(key)
        else:
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
