"""Where a command may write: an output of the right kind (a folder where a folder is written, a file where a
file is, nothing below a file) and not one of the files the command reads (:func:`same_file`), each refused in one
line before any work."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

from fsspec.implementations.local import LocalFileSystem

from semclip_batch.errors import ConfigError, OutputError, one_line
from semclip_batch.io.storage import filesystem, has_protocol, protocol_of, redact

log = logging.getLogger(__name__)


LOCAL_PROTOCOLS = ("file", "local")  # URLs that name a local path


def same_file(a: str, b: str) -> bool:
    """Whether two paths or URLs name one file. Local paths (and ``file://`` URLs): symlinks and relative parts
    resolved, and the same inode where both exist (a hard link counts); other URLs: equal but for the protocol's
    case and a trailing slash (an object store's keys are literal: ``s3://b/x/../k`` is another key than
    ``s3://b/k``)."""
    local_a, local_b = _local_path(a), _local_path(b)
    if local_a is None or local_b is None:
        return local_a is None and local_b is None and _url_key(a) == _url_key(b)
    real_a, real_b = os.path.realpath(local_a), os.path.realpath(local_b)
    if real_a == real_b:
        return True
    try:
        return os.path.samefile(real_a, real_b)
    except OSError:  # either does not exist (yet): different names are different files
        return False


def _local_path(url: str) -> str | None:
    if not has_protocol(url):
        return os.path.expanduser(url)
    return url.split("://", 1)[1] if protocol_of(url).lower() in LOCAL_PROTOCOLS else None


def _url_key(url: str) -> str:
    return f"{protocol_of(url).lower()}://{url.split('://', 1)[1].rstrip('/')}"


def inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies below it. Local paths (and ``file://`` URLs): symlinks and relative parts
    resolved on both (a link to OUT, or OUT named through one, is OUT); other URLs: by their keys, as
    :func:`same_file` compares them."""
    local_path, local_root = _local_path(path), _local_path(root)
    if local_path is None or local_root is None:
        if local_path is not None or local_root is not None:
            return False
        key, base = _url_key(path), _url_key(root)
        return key == base or key.startswith(base + "/")
    real, base = os.path.realpath(local_path), os.path.realpath(local_root)
    return real == base or real.startswith(base.rstrip("/") + "/")


def refuse_inside_out(out: str, root: str, what: str) -> None:
    """Refuse, before any work, a file ``out`` to write inside the output root ``root`` (a run's outputs: a file
    dropped there joins its predictions or its state). ``what``: the option and what it names, for the message.
    Raises :class:`ConfigError`."""
    if inside(out, root):
        raise ConfigError(f"{what} {redact(out)!r} is inside OUT {redact(root)}: write it elsewhere (OUT holds the "
                          "run's own outputs only)")


def refuse_out_inside_input_folder(source: str, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse a run's OUT inside the image folder it scores: a rerun (the resume after a kill) would list OUT's own
    files as frames. A manifest file's folder may hold OUT. Raises :class:`ConfigError`."""
    if not inside(root, source):
        return
    fs, path = filesystem(source, storage_options)
    if fs.isdir(path):
        raise ConfigError(f"--out {redact(root)} is inside the input folder {redact(source)}: a rerun would read its "
                          "outputs as frames; give an --out outside it")


def refuse_overwriting_inputs(out: str, inputs: Mapping[str, str | None]) -> None:
    """Refuse, before any work, an ``--out`` that names a file the command reads (writing it would destroy that
    input: a manifest, weights, a class map or a KLARF given as ``--out`` too). ``inputs``: what each file is, for
    the message (``"--class-map file"``) -> its path or URL, None when not given. Raises :class:`ConfigError`."""
    for what, given in inputs.items():
        if given is not None and same_file(out, given):
            raise ConfigError(f"--out {redact(out)!r} is the {what} this command reads: write to another file")


def _refuse_missing_bucket(fs: Any, path: str, url: str, what: str) -> None:
    """On S3, an output whose bucket does not exist: refused now, not after the work (a `train`'s fit, a `run`'s
    Ray start) with a message that named no URL. Only a clear 404 refuses; an answer this user may not read (a
    403 on HEAD bucket) stands aside, as in :func:`check_target`."""
    if not hasattr(fs, "call_s3"):
        return
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise OutputError(f"{what} {redact(url)}: bucket {bucket!r} does not exist (create it first)") from None
    except Exception as exc:  # noqa: BLE001 - not ours to judge: the write says what is wrong
        log.debug("%s %s: its bucket not checked (%s)", what, redact(url), one_line(exc))


def check_target(url: str, kind: Literal["file", "folder"], what: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse, before any work, an output location holding the other kind of entry: a file where ``kind`` is
    ``"folder"`` (a checkpoint folder, a run's output root), a folder where it is ``"file"`` (a weights file, a
    manifest, a KLARF); on a local disk, also a file among the folders above it (nothing can be made below a file).
    ``what``: the option and what it names, for the message (e.g. ``"--out (the checkpoint folder)"``). Raises
    :class:`~semclip_batch.errors.OutputError`."""
    fs, path = filesystem(url, storage_options)
    try:
        wrong = fs.isfile(path) if kind == "folder" else fs.isdir(path)
    except OSError as exc:  # e.g. a store that lets this user write but not list: the write says what is wrong
        log.debug("%s %s: its kind not checked (%s)", what, redact(url), one_line(exc))
        wrong = False
    if wrong and kind == "folder":
        raise OutputError(f"{what} {redact(url)} is a file: give a folder (new, or one this command wrote before)")
    if wrong:
        raise OutputError(f"{what} {redact(url)} is a folder: give the name of the file to write")
    _refuse_missing_bucket(fs, path, url, what)
    if isinstance(fs, LocalFileSystem):
        above = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise OutputError(f"{what} {redact(url)} lies below {above}, which is a file: nothing can be written there")
