"""The files ``sparge-calibrate`` writes (``--out``, ``--plot``): checked before any work, written
atomically, never written over a file the tool did not make, and saved elsewhere when the write
fails at the end.

- :func:`check_output` (argument time): the folder exists and takes new files; an existing file is
  only replaced if it is one of the tool's own outputs (a sparge thresholds file for ``--out``, a
  sparge-calibrate heatmap for ``--plot``), recognised from its header alone.
- :func:`write_atomic` (end of the run): a temporary file in the same folder, then ``os.replace``,
  so a crash or a full disk never leaves a half-written file at the target. The target is checked
  again just before the replace.
- :func:`save_copy`: where the write fails, the results go to ``<name>.partial-<pid><ext>`` in the
  same folder, or in the temp dir if that fails too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from sparge_serve.thresholds import FORMAT, TENSOR_NAMES

__all__ = [
    "HEATMAP_SOFTWARE",
    "Output",
    "OutputError",
    "check_output",
    "describe_cause",
    "not_heatmap",
    "not_thresholds",
    "save_copy",
    "write_atomic",
]

HEATMAP_SOFTWARE = "sparge-calibrate"
"""Start of the ``Software`` text chunk of the heatmaps the tool writes (how ``--plot`` recognises a
file it may replace)."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class OutputError(ValueError):
    """An output path cannot be written; the message names the file, the cause and the fix."""


@dataclass(frozen=True)
class Output:
    """An output the user asked for: ``path`` as given, ``target`` the file actually written (the
    link's target when ``path`` is a symbolic link), ``existed`` whether a file is there to replace."""

    flag: str
    path: str
    target: str
    existed: bool

    @property
    def folder(self) -> str:
        return os.path.dirname(os.path.abspath(self.target))


def not_thresholds(path: str) -> str | None:
    """``None`` if ``path`` is a sparge thresholds file, else what it is instead. Reads the
    safetensors header only (8-byte length + JSON), never the tensors."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "it is empty"
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                return "it is not a safetensors file"
            raw = f.read(n)
    except OSError as e:
        return f"it cannot be read ({describe_cause(e)})"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "it is not a safetensors file"
    if not isinstance(header, dict):
        return "it is not a safetensors file"
    meta = header.get("__metadata__")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    names = sorted(k for k in header if k != "__metadata__")
    if fmt == FORMAT and set(TENSOR_NAMES) <= set(names):
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"it is a safetensors file without the thresholds metadata (format {fmt!r}, tensors "
            f"{shown or 'none'}), e.g. model weights")


def not_heatmap(path: str) -> str | None:
    """``None`` if ``path`` is a heatmap written by sparge-calibrate (a PNG whose ``Software`` text
    chunk starts with :data:`HEATMAP_SOFTWARE`), else what it is instead. Reads chunk headers only."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return "it is not a PNG file"
            while True:
                head = f.read(8)
                if len(head) < 8:
                    break
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):  # matplotlib writes its text chunks before the image
                    break
                if kind == b"tEXt" and length < 65536:
                    key, _, value = f.read(length).partition(b"\0")
                    if key == b"Software" and value.startswith(HEATMAP_SOFTWARE.encode()):
                        return None
                    f.seek(4, os.SEEK_CUR)  # CRC
                else:
                    f.seek(length + 4, os.SEEK_CUR)
    except OSError as e:
        return f"it cannot be read ({describe_cause(e)})"
    return "it is a PNG file that sparge-calibrate did not write"


_RECOGNISE = {".safetensors": (not_thresholds, "a sparge thresholds file"),
              ".png": (not_heatmap, "a sparge-calibrate heatmap")}


def check_output(flag: str, path: str, extension: str) -> Output:
    """Check before any work that ``path`` can be written; :class:`OutputError` if not."""
    if not path.lower().endswith(extension):
        raise OutputError(f"{flag}: {path} must end with {extension}")
    target = os.path.realpath(path) if os.path.islink(path) else path
    via = f" (a link to {target})" if target != path else ""
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.exists(folder):
        raise OutputError(f"{flag}: directory {folder} does not exist; create it or choose "
                          "another path")
    if not os.path.isdir(folder):
        raise OutputError(f"{flag}: {folder} is not a directory; choose another path")
    existed = os.path.lexists(target)
    if existed:
        if os.path.isdir(target):
            raise OutputError(f"{flag}: {path}{via} is a directory; give a file name inside it")
        if not os.path.isfile(target):
            raise OutputError(f"{flag}: {path}{via} exists and is not a regular file; choose "
                              "another path")
        check_replaceable(flag, path, target, extension)
    try:
        probe = _create_new(folder, ".sparge-calibrate-probe-", ".tmp")
    except OSError as e:
        raise OutputError(f"{flag}: cannot create files in directory {folder} "
                          f"({describe_cause(e)}); choose a folder you can write to") from None
    os.unlink(probe)
    return Output(flag, path, target, existed)


def check_replaceable(flag: str, path: str, target: str, extension: str) -> None:
    """:class:`OutputError` unless the existing file ``target`` is one of the tool's own outputs."""
    recognise, what = _RECOGNISE[extension]
    why = recognise(target)
    if why is not None:
        via = f" (a link to {target})" if target != path else ""
        raise OutputError(
            f"{flag}: {path}{via} exists and is not {what}: {why}. sparge-calibrate only replaces "
            f"its own outputs; choose another {flag} path, or remove {path} yourself if it is no "
            "longer needed")


def write_atomic(out: Output, extension: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a new file of the target's folder, then move it onto the target.

    The target is checked again first (a file that appeared during the run is not replaced); the
    file keeps the mode of the one it replaces, or gets the mode ``open`` would give a new one. On
    any failure the temporary file is removed and the exception propagates."""
    mode = _new_file_mode()
    if os.path.lexists(out.target):
        if not os.path.isfile(out.target):
            raise OutputError(f"{out.path} became something other than a file during the run")
        check_replaceable(out.flag, out.path, out.target, extension)
        mode = stat.S_IMODE(os.stat(out.target).st_mode)
    name = os.path.basename(out.target)
    tmp = _create_new(out.folder, f".{name}.", ".tmp")
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, out.target)
    except BaseException:
        _remove(tmp)
        raise


def save_copy(out: Output, write: Callable[[str], None]) -> str | None:
    """Write the results to ``<name>.partial-<pid><ext>`` next to the target, else in the temp dir;
    the path written, or ``None`` if neither takes it. Never replaces an existing file."""
    stem, ext = os.path.splitext(os.path.basename(out.target))
    for folder in (out.folder, tempfile.gettempdir()):
        try:
            path = _create_new(folder, f"{stem}.partial-{os.getpid()}", ext, exact_first=True)
        except OSError:
            continue
        try:
            write(path)
            os.chmod(path, _new_file_mode())
            return path
        except Exception:
            _remove(path)
    return None


def describe_cause(e: BaseException) -> str:
    """One line for an I/O failure: ``strerror`` for an ``OSError``, else the exception."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def _create_new(folder: str, prefix: str, suffix: str, exact_first: bool = False) -> str:
    """Create an empty file that did not exist (``O_EXCL``) and return its path."""
    for attempt in range(100):
        tag = "" if exact_first and attempt == 0 else (
            ("-" if exact_first else "") + secrets.token_hex(4))
        path = os.path.join(folder, f"{prefix}{tag}{suffix}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"no free temporary file name in {folder}")


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
