"""Reading and writing thresholds files: one read of the file's bytes (header checked before
the tensors are parsed), the digest of those bytes, and ``save_thresholds``.

Every problem raises ``ThresholdsError`` naming the file, the problem and the fix. Never
unpickles anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import replace

from sparge_serve.thresholds.schema import (
    _FIX_RECALIBRATE,
    _GEOMETRY_KEYS,
    BUDGET_TENSORS,
    FORMAT,
    FORMAT_VERSION,
    TENSOR_NAMES,
    ModelGeometry,
    Thresholds,
    ThresholdsError,
    _err,
    check_geometry,
)

# NOTE: the safetensors crate refuses headers above 100 MB too; a thresholds file's is ~1 KB.
_MAX_HEADER_BYTES = 100 << 20


def save_thresholds(path: str | os.PathLike[str], th: Thresholds) -> None:
    """Write ``th`` to ``path`` (safetensors). Fills ``created``/``package_version`` when empty."""
    from safetensors.torch import save_file

    if not th.created:
        th = replace(th, created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    if not th.package_version:
        th = replace(th, package_version=_package_version())
    if th.head_offset != 0:
        raise ThresholdsError("save_thresholds: these thresholds were sliced with for_rank; "
                              "save the global (all-heads) thresholds instead")
    tensors = {name: getattr(th, name).detach().cpu().contiguous() for name in TENSOR_NAMES}
    for name in BUDGET_TENSORS:
        t = getattr(th, name)
        if t is not None:
            tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, os.fspath(path), metadata=th.metadata())


def load_thresholds(path: str | os.PathLike[str],
                    expect: ModelGeometry | None = None) -> Thresholds:
    """Read and validate a thresholds file; with ``expect``, also check it fits that model.

    The file is read once: the tensors and metadata are parsed from those bytes and
    ``Thresholds.sha256`` is their digest. Raises :class:`ThresholdsError` (a ``ValueError``)
    naming the file, the problem and the fix. Never unpickles anything.
    """
    src = os.fspath(path)
    data, meta = _read_file(src)
    return _parse(data, meta, src, expect)


def _read_file(src: str) -> tuple[bytes, dict[str, str]]:
    """The whole file and its safetensors metadata, read through one open file. A file that is
    not a sparge thresholds file is refused after its header (a model's weights are not read)."""
    try:
        # NOTE: O_NONBLOCK: a FIFO must not hang the start-up (it is refused below).
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _err(src, "no such file", "pass an existing path (sparge `thresholds` / "
                   "SPARGE_THRESHOLDS), or drop the setting to attend densely") from None
    except IsADirectoryError:
        raise _err(src, "is not a regular file",
                   "pass the path of the .safetensors file itself") from None
    except OSError as e:
        raise _err(src, f"cannot be opened ({e.strerror or e})",
                   "check the path and the file's permissions") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _err(src, "is not a regular file", "pass the path of the .safetensors file itself")
    with os.fdopen(fd, "rb") as f:
        try:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < size <= min(_MAX_HEADER_BYTES, st.st_size - 8):
                raise ValueError(f"header length {size} does not fit a file of {st.st_size} bytes")
            header_bytes = f.read(size)
            header = json.loads(header_bytes)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            meta = header.get("__metadata__") or {}
            if not isinstance(meta, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
                raise ValueError("__metadata__ is not a map of strings")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise _err(src, f"is not a readable safetensors file ({type(e).__name__}: {e})",
                       "pickled .pt files are refused on purpose; point at a thresholds file "
                       "written by `sparge-calibrate` (or save_thresholds)") from e
        _check_format(meta, src)
        try:
            rest = f.read()
        except OSError as e:
            raise _err(src, f"cannot be read ({e.strerror or e})",
                       "check the file and its permissions") from None
    return head + header_bytes + rest, meta


def _check_format(meta: Mapping[str, str], src: str) -> None:
    if meta.get("format") != FORMAT:
        raise _err(src, f"metadata `format` is {meta.get('format')!r}, expected {FORMAT!r} "
                   "(this safetensors file is not a sparge thresholds file)",
                   "point at a file written by `sparge-calibrate` (or save_thresholds)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _err(src, f"format_version {meta.get('format_version')!r} is not supported (this "
                   f"sparge_serve reads version {FORMAT_VERSION!r})",
                   "use the sparge_serve version that wrote the file, or " + _FIX_RECALIBRATE)


def _parse(data: bytes, meta: Mapping[str, str], src: str,
           expect: ModelGeometry | None) -> Thresholds:
    """Thresholds from a file's bytes (``meta``: the metadata of their header), validated."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type for every kind of corruption
        raise _err(src, f"is not a readable safetensors file ({type(e).__name__}: {e})",
                   "pickled .pt files are refused on purpose; point at a thresholds file written "
                   "by `sparge-calibrate` (or save_thresholds)") from e
    keys = set(tensors)
    missing = [k for k in TENSOR_NAMES if k not in keys]
    if missing:
        raise _err(src, f"missing tensor(s) {missing}", _FIX_RECALIBRATE)
    extra = sorted(keys - set(TENSOR_NAMES) - set(BUDGET_TENSORS))
    if extra:
        raise _err(src, f"unexpected tensor(s) {extra} for format_version {FORMAT_VERSION}",
                   _FIX_RECALIBRATE)
    digest = hashlib.sha256(data).hexdigest()

    def meta_int(key: str) -> int:
        raw = meta.get(key)
        if raw is None:
            raise _err(src, f"metadata key `{key}` is missing", _FIX_RECALIBRATE)
        try:
            value = int(raw)
        except ValueError:
            raise _err(src, f"metadata `{key}` = {raw!r} is not an integer",
                       _FIX_RECALIBRATE) from None
        if value <= 0 and key != "num_prompts":  # num_prompts >= 0: _validate_provenance
            raise _err(src, f"metadata `{key}` = {value} must be positive", _FIX_RECALIBRATE)
        return value

    def meta_float(key: str) -> float | None:
        raw = meta.get(key, "")
        if raw in ("", "None"):
            return None
        try:
            return float(raw)  # range and finiteness: _validate_provenance
        except ValueError:
            raise _err(src, f"metadata `{key}` = {raw!r} is not a number",
                       _FIX_RECALIBRATE) from None

    geo = {k: meta_int(k) for k in _GEOMETRY_KEYS}
    shape = [geo["num_layers"], geo["num_heads"]]
    budgets = {name: tensors.pop(name, None) for name in BUDGET_TENSORS}
    for name, t in tensors.items():
        if list(t.shape) != shape:
            raise _err(src, f"tensor `{name}` has shape {list(t.shape)} but the metadata says "
                       f"[num_layers, num_heads] = {shape}", _FIX_RECALIBRATE)
    try:
        th = Thresholds(
            **tensors, **budgets, num_kv_heads=geo["num_kv_heads"], head_dim=geo["head_dim"],
            blkq=geo["blkq"], blkk=geo["blkk"], model=meta.get("model", ""),
            config_hash=meta.get("config_hash", ""), l1=meta_float("l1"),
            pv_l1=meta_float("pv_l1"), sim_rule=meta.get("sim_rule", ""),
            allocation=meta.get("allocation", ""),
            num_prompts=meta_int("num_prompts") if meta.get("num_prompts") else 0,
            prompts_sha256=meta.get("prompts_sha256", ""),
            package_version=meta.get("package_version", ""), created=meta.get("created", ""),
            sha256=digest)
    except ThresholdsError as e:
        raise ThresholdsError(str(e).replace("<in-memory Thresholds>", src, 1)) from None
    if expect is not None:
        check_geometry(th, expect, src)
    return th


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparge-serve")
    except PackageNotFoundError:
        return "unknown"
