"""Rendered kernel sources and their content-hashed on-disk cache.

:func:`render` turns a :class:`KernelKey` into a self-contained Python module: the ``@triton.jit``
functions the kernel needs (in dependency order) plus the key and its baked constants. A plan
records it (``Plan.kernels[uri] = {"source", "sha256", "key"}``) to show what was compiled, but a
plan's text is never run: :func:`load_kernel` always imports this kvcompile's own rendering of the
key and only compares a given source / hash with it (``kvcompile.load`` does the same comparison).

:func:`load_source` writes a source to ``$KVCOMPILE_CACHE_DIR/kernels/<uri>-<sha256[:16]>.py``
(temp file + rename, so readers see a whole file or none) and imports it. Loading is
try → lock → re-check → build → load (flashinfer's JIT spec): a process that finds the file imports
it; otherwise it takes ``<file>.lock`` (``fcntl.flock``), checks again (another process may have
written it meanwhile), writes, then imports. A source whose SHA-256 differs from the recorded hash,
or a cached file whose content no longer hashes to its name, is refused with
:class:`KernelSourceError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
import sys
import textwrap
import threading
from pathlib import Path
from types import ModuleType

from .._io import write_atomic
from ..plan import PlanError
from . import _common, decode_compact, decode_mixed, decode_quant, quant_append
from .keys import KernelKey

_DENSE = (decode_compact._dense_tokens,)
_SOURCES = {
    "decode_full": _common.COMMON_SOURCES + decode_compact.SOURCES,
    "decode_fp8": _common.COMMON_SOURCES + decode_compact.SOURCES,
    "decode_compact": _common.COMMON_SOURCES + decode_compact.SOURCES,
    "decode_compact_scored": _common.COMMON_SOURCES + decode_compact.SCORED_SOURCES,
    "decode_quant": _common.COMMON_SOURCES + _DENSE + decode_quant.SOURCES,
    "decode_mixed": _common.COMMON_SOURCES + _DENSE + decode_quant.SOURCES[:2] + decode_mixed.SOURCES,
    "quant_append": quant_append.SOURCES,
}
_ENTRY = {
    "decode_full": "_decode_dense_kernel",
    "decode_fp8": "_decode_dense_kernel",
    "decode_compact": "_decode_dense_kernel",
    "decode_compact_scored": "_decode_scored_kernel",
    "decode_quant": "_decode_quant_kernel",
    "decode_mixed": "_decode_mixed_kernel",
    "quant_append": "_quant_pack_kernel",
}

_LOADED: dict[str, ModuleType] = {}
_LOCK = threading.Lock()


class KernelSourceError(PlanError):
    """A kernel source does not match its recorded hash (tampered plan or cache file)."""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def render(key: KernelKey) -> str:
    """The module source of ``key``'s kernel: header, constants, then the jit functions it calls.

    The only source kvcompile ever imports: a function of the key and the installed kvcompile."""
    fns = _SOURCES[key.kind]
    body = "\n\n".join(textwrap.dedent(inspect.getsource(f.fn)).strip() + "\n" for f in fns)
    key_json = json.dumps(key.to_json(), sort_keys=True)
    return (
        f'"""kvcompile kernel {key.uri()}: rendered by kvcompile.codegen.cache.render; do not edit."""\n\n'
        "import triton\nimport triton.language as tl\n\n"
        f"KEY = {key_json!r}\n"
        f"URI = {key.uri()!r}\n"
        f"ENTRY = {_ENTRY[key.kind]!r}\n"
        "REDUCE = '_reduce_splits_kernel'\n\n\n"
        f"{body}"
    )


def kernel_dir() -> Path:
    return Path(os.environ.get("KVCOMPILE_CACHE_DIR", Path.home() / ".cache" / "kvcompile")) / "kernels"


def _valid_file(path: Path, digest: str) -> bool:
    try:
        return sha256(path.read_text()) == digest
    except OSError:
        return False


def load_source(uri: str, source: str, expected_sha256: str | None = None) -> ModuleType:
    """Import a rendered kernel source through the on-disk cache (see module docstring).

    Internal: imports ``source`` as Python, so callers pass only :func:`render` output (as
    :func:`load_kernel` does), never text from a plan or a user. ``uri`` must be a key's uri.

    Raises :class:`KernelSourceError` when ``expected_sha256`` is given and differs from the source's.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,200}", uri):
        raise KernelSourceError(f"kernel uri {uri[:80]!r} is not a file-system-safe name")
    digest = sha256(source)
    if expected_sha256 is not None and digest != expected_sha256:
        raise KernelSourceError(
            f"kernel {uri}: source hash {digest[:16]} does not match the recorded {expected_sha256[:16]}; "
            "the plan's kernel source was modified"
        )
    path = kernel_dir() / f"{uri}-{digest[:16]}.py"
    with _LOCK:
        if str(path) in _LOADED:
            return _LOADED[str(path)]
        if not _valid_file(path, digest):  # try
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{path}.lock", "w") as lock_file:  # lock
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    if not _valid_file(path, digest):  # re-check, then build
                        write_atomic(path, source)
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        module = _import(path, digest)  # load
        _LOADED[str(path)] = module
        return module


def _import(path: Path, digest: str) -> ModuleType:
    name = f"kvcompile_kernels.{path.stem.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KernelSourceError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    if sha256(path.read_text()) != digest:  # changed between check and import
        sys.modules.pop(name, None)
        raise KernelSourceError(f"{path}: cached kernel file changed while loading")
    return module


def load_kernel(key: KernelKey, source: str | None = None, expected_sha256: str | None = None):
    """(entry, reduce) jit functions of ``key``, always from this kvcompile's :func:`render` of ``key``.

    ``source`` / ``expected_sha256`` (e.g. a plan's record) are only *compared* with the rendering:
    a difference raises :class:`KernelSourceError` naming the kernel, and nothing from them is ever
    written or imported, so a plan cannot run code through a kernel record.
    """
    uri = key.uri()
    rendered = render(key)
    if source is not None and source != rendered:
        raise KernelSourceError(
            f"kernel {uri}: the given source is for another kernel or was edited (it differs from this "
            "kvcompile's rendering of the key); refusing it"
        )
    digest = sha256(rendered)
    if expected_sha256 is not None and expected_sha256 != digest:
        raise KernelSourceError(
            f"kernel {uri}: recorded hash {str(expected_sha256)[:16]} does not match the rendering's {digest[:16]}"
        )
    module = load_source(uri, rendered, digest)
    if uri != module.URI:
        raise KernelSourceError(f"kernel source is for {module.URI}, expected {uri}")
    return getattr(module, module.ENTRY), getattr(module, module.REDUCE, None)


def clear_memory_cache() -> None:
    """Forget imported kernels (tests); files stay on disk."""
    with _LOCK, contextlib.suppress(Exception):
        _LOADED.clear()
