"""Small file helpers shared by the artifact writers and readers (plans, kernel sources, caches).

Writers: :func:`write_atomic` (readers see the old file or the whole new one; temp files of writers
that were killed are swept by the next write). Readers: :func:`read_json_strict` parses a file that
may come from anyone into plain JSON values under hard limits, raising :class:`JsonInputError` (a
``ValueError``) with a one-line reason instead of ``UnicodeDecodeError`` / ``RecursionError`` / a
silent ``NaN``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
STALE_TMP_S = 600.0  # a temp sibling older than this belongs to a writer that died


class JsonInputError(ValueError):
    """A JSON input is not UTF-8, not JSON, too big / deep, or holds NaN, Infinity or duplicate keys."""


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` so readers see either the old file or the whole new one.

    The temp file (unique name ``.<name>.<random>.tmp``) lives in the same folder (``os.replace`` is
    atomic only within a file system) and is fsynced before the rename; on any failure it is removed
    and the old file stays. A writer killed with SIGKILL cannot clean up, so each write first removes
    temp siblings of the same target older than ``STALE_TMP_S``. The file gets the usual permissions
    (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``.
    """
    path = Path(path)
    sweep_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sweep_stale_tmp(path: Path, older_than_s: float = STALE_TMP_S) -> int:
    """Remove ``.<name>.*.tmp`` siblings of ``path`` older than ``older_than_s``; returns how many.

    Young temp files may belong to a writer that is still running, so they are left alone.
    """
    removed = 0
    now = time.time()
    with contextlib.suppress(OSError):
        for p in Path(path).parent.glob(f".{glob.escape(Path(path).name)}.*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- strict JSON reading --------------------------------------------------------------------------
MAX_INT = 2**63  # larger integers in an artifact are corrupt (no byte count or size gets near it)


def read_json_strict(path: str | os.PathLike[str], *, max_bytes: int, max_depth: int, max_nodes: int) -> Any:
    """Parse ``path`` as strict JSON: UTF-8 only, at most ``max_bytes`` / ``max_depth`` nesting
    levels / ``max_nodes`` values, no NaN / ±Infinity (nor float literals that overflow to them), no
    duplicate object keys, integers below 2**63. Raises ``OSError`` when unreadable and
    :class:`JsonInputError` otherwise."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JsonInputError(f"file is larger than {max_bytes} bytes")
    return loads_strict(data, max_depth=max_depth, max_nodes=max_nodes)


def loads_strict(data: bytes | str, *, max_depth: int, max_nodes: int) -> Any:
    """:func:`read_json_strict` on bytes or text already in memory."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonInputError(f"not UTF-8 text (invalid byte at offset {e.start})") from None
    else:
        text = data
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as e:
        raise JsonInputError(f"not valid JSON, the file is corrupt or truncated ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise JsonInputError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as e:  # our hooks, and int() refusing thousands of digits
        raise JsonInputError(f"not valid JSON: {' '.join(str(e).split())[:200]}") from None
    check_json_shape(value, max_depth=max_depth, max_nodes=max_nodes)
    return value


def check_json_shape(value: Any, *, max_depth: int, max_nodes: int) -> None:
    """Iteratively check that ``value`` is plain JSON (dict with str keys, list, str, int, finite
    float, bool, None) within ``max_depth`` levels and ``max_nodes`` values."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise JsonInputError(f"JSON holds more than {max_nodes} values")
        if isinstance(v, dict):
            if depth > max_depth:
                raise JsonInputError(f"JSON nested deeper than {max_depth} levels")
            for k, x in v.items():
                if not isinstance(k, str):
                    raise JsonInputError(f"JSON object key {k!r} is not a string")
                stack.append((x, depth + 1))
        elif isinstance(v, (list, tuple)):
            if depth > max_depth:
                raise JsonInputError(f"JSON nested deeper than {max_depth} levels")
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise JsonInputError(f"non-finite number {v!r} (NaN and Infinity are not JSON)")
        elif isinstance(v, int) and not isinstance(v, bool):
            if abs(v) >= MAX_INT:
                raise JsonInputError(f"integer {str(v)[:24]}... out of range")
        elif not (v is None or isinstance(v, (str, bool))):
            raise JsonInputError(f"{type(v).__name__} is not a JSON value")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (NaN and Infinity are not JSON)")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:24]} overflows to {x}")
    return x


def _bounded_int(text: str) -> int:
    if len(text) > 20:
        raise ValueError(f"integer {text[:24]}... out of range")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:40]!r} in an object")
        out[k] = v
    return out


def read_json_object(path: Path, error: type[Exception], not_object: str, **limits: int) -> dict[str, Any]:
    """:func:`read_json_strict` for a file that must hold a JSON object; every failure is one ``error``
    naming ``path`` (``not_object`` may use ``{type}``, the JSON type found)."""
    try:
        raw = read_json_strict(path, **limits)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except JsonInputError as e:
        raise error(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: {not_object.format(type=type(raw).__name__)}")
    return raw
