"""Atomic artifacts under concurrency and kills: two writers of one plan file, a writer SIGKILLed
mid-write, two processes filling the kernel cache; the file on disk is always the old or the new whole
artifact, never torn, and temp files of killed writers are swept by the next write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvcompile._io import STALE_TMP_S, sweep_stale_tmp, write_atomic

ROOT = Path(__file__).resolve().parent.parent

# a writer process: only kvcompile._io (no torch), so it starts in well under a second
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kvcompile._io import write_atomic
    path, tag, size, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    body = tag * (size // len(tag))
    end = time.time() + seconds
    n = 0
    print("ready", file=sys.stderr, flush=True)
    while time.time() < end:
        write_atomic(path, '{"tag": "%s", "n": %d, "body": "%s"}' % (tag, n, body))
        n += 1
    print(n)
    """
)


def _writer(path: Path, tag: str, size: int, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(size), str(seconds)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _check_whole(path: Path, tags: set[str], size: int) -> str:
    doc = json.loads(path.read_text())
    assert doc["tag"] in tags and len(doc["body"]) == size // len(doc["tag"]) * len(doc["tag"])
    return doc["tag"]


def test_two_writers_and_a_reader_never_see_a_torn_file(tmp_path):
    path = tmp_path / "out.kvplan"
    size = 200_000
    write_atomic(path, '{"tag": "old", "n": 0, "body": "%s"}' % ("old" * (size // 3)))
    procs = [_writer(path, "A", size, 3.0), _writer(path, "BB", size, 3.0)]
    seen, reads = set(), 0
    while any(p.poll() is None for p in procs):
        seen.add(_check_whole(path, {"old", "A", "BB"}, size))
        reads += 1
    counts = [int(p.communicate()[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs) and min(counts) > 5
    assert reads > 10 and seen & {"A", "BB"}
    _check_whole(path, {"A", "BB"}, size)
    assert [p.name for p in tmp_path.iterdir()] == ["out.kvplan"]  # no temp file left by live writers


def test_killed_writer_leaves_old_or_new_and_its_temp_is_swept(tmp_path):
    path = tmp_path / "out.kvplan"
    size = 20_000_000  # big writes, so kills land mid-write
    write_atomic(path, '{"tag": "old", "n": 0, "body": "%s"}' % ("old" * (size // 3)))
    leftovers = 0
    for i in range(6):
        p = _writer(path, "K", size, 30.0)
        assert p.stderr is not None and p.stderr.readline().strip() == "ready"  # interpreter start-up excluded
        time.sleep(0.05 + 0.07 * i)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        _check_whole(path, {"old", "K"}, size)
        leftovers = max(leftovers, len(list(tmp_path.glob(".out.kvplan.*.tmp"))))
    assert leftovers >= 1, "no kill landed mid-write (the test needs a temp file left behind)"
    # young temp files may belong to a live writer: kept; old ones are swept by the next write
    assert sweep_stale_tmp(path) == 0
    for t in tmp_path.glob(".out.kvplan.*.tmp"):
        os.utime(t, (time.time() - STALE_TMP_S - 1,) * 2)
    write_atomic(path, '{"tag": "new", "n": 0, "body": ""}')
    assert [p.name for p in tmp_path.iterdir()] == ["out.kvplan"]
    assert json.loads(path.read_text())["tag"] == "new"


def test_write_atomic_keeps_usual_permissions(tmp_path):
    path = tmp_path / "p.json"
    write_atomic(path, "{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


KERNEL_FILLER = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    from kvcompile.codegen.cache import load_kernel
    from kvcompile.codegen.keys import KernelKey
    entry, _ = load_kernel(KernelKey("decode_compact", 48, 2))
    print(entry is not None)
    """
)


@pytest.mark.slow
def test_two_processes_fill_the_kernel_cache_once(tmp_path):
    from kvcompile.codegen.cache import render, sha256
    from kvcompile.codegen.keys import KernelKey

    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVCOMPILE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", KERNEL_FILLER], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all(o.strip() == "True" for o in outs)
    files = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    src = render(KernelKey("decode_compact", 48, 2))
    name = f"{KernelKey('decode_compact', 48, 2).uri()}-{sha256(src)[:16]}.py"
    assert files == [name, name + ".lock"]
    assert (tmp_path / "kernels" / name).read_text() == src


def test_torn_kernel_cache_entry_is_rebuilt_not_served(tmp_path, monkeypatch):
    from kvcompile.codegen import cache as kc
    from kvcompile.codegen.keys import KernelKey

    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path))
    kc.clear_memory_cache()
    key = KernelKey("decode_compact", 48, 3)
    src = kc.render(key)
    path = tmp_path / "kernels" / f"{key.uri()}-{kc.sha256(src)[:16]}.py"
    path.parent.mkdir(parents=True)
    path.write_text(src[: len(src) // 2])  # a torn entry, as a crash without atomic rename would leave
    entry, _ = kc.load_kernel(key)
    assert entry is not None and path.read_text() == src
    kc.clear_memory_cache()


def test_calibration_cache_writer_is_atomic(tmp_path, monkeypatch):
    from kvcompile.passes import calibration

    path = tmp_path / "calibration" / "k.json"
    calibration._write_json(path, {"key": "k", "v": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        calibration._write_json(path, {"key": "k", "v": 2})
    assert json.loads(path.read_text()) == {"key": "k", "v": 1}
    assert [p.name for p in path.parent.iterdir()] == ["k.json"]
