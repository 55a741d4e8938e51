"""``kvcompile serve`` end to end: vLLM's OpenAI server with the plugin loaded through its entry point in
the engine process, on 127.0.0.1; completions, chat and streaming round trips. Skipped without vLLM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")

from kvcompile.engines import vllm as ev  # noqa: E402
from kvcompile.runtime.builders import plan_for  # noqa: E402
from kvcompile.targets import load_target  # noqa: E402

pytestmark = pytest.mark.slow


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    return raw if body.get("stream") else json.loads(raw)


def test_openai_round_trip_against_kvcompile_serve(smol, tmp_path):
    # a sink + window layer too: the served engine process keeps its sink blocks (plugin via entry point)
    specs = [{"name": "paged", "kv_dtype": "fp8_e4m3"},
             {"name": "paged", "kv_dtype": "fp8_e4m3", "window": 64, "sinks": 4}]
    plan = plan_for(smol, lambda layer, head: specs[layer % 2], 512, target="cpu")
    plan = plan.model_copy(update={"engine": ev.record(plan, load_target("cpu"))}).sealed()
    path = tmp_path / "serve.kvplan"
    plan.save(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (the server writes it until terminated below)
    proc = subprocess.Popen([sys.executable, "-m", "kvcompile.cli", "serve", str(path), "--port", str(port),
                             "--kv-cache-memory", str(32 << 20)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                assert time.time() - t0 < 240, "server did not start"
                time.sleep(1)
        comp = _post(base + "/v1/completions", {"model": "kvcompile", "prompt": "The capital of France is",
                                                 "max_tokens": 6, "temperature": 0})
        assert "Paris" in comp["choices"][0]["text"]
        chat = _post(base + "/v1/chat/completions", {"model": "kvcompile", "max_tokens": 8, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Say hello."}]})
        assert chat["choices"][0]["message"]["content"].strip()
        stream = _post(base + "/v1/completions", {"model": "kvcompile", "prompt": "The capital of France is",
                                                   "max_tokens": 6, "temperature": 0, "stream": True})
        chunks = [json.loads(ln[6:]) for ln in stream.splitlines() if ln.startswith("data: {")]
        assert len(chunks) > 1 and "data: [DONE]" in stream
        assert "".join(c["choices"][0]["text"] for c in chunks) == comp["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    text = (tmp_path / "server.log").read_text()
    line = next(ln for ln in text.splitlines() if "KV cache size:" in ln)
    tokens = int(line.split("KV cache size:")[1].split("tokens")[0].replace(",", ""))
    site = plan.model.sites[0]
    pred = ev.predict_capacity(plan.engine["layers"], num_kv_heads=site.num_kv_heads, head_dim=site.head_dim,
                               max_model_len=512, memory_bytes=32 << 20, block_size=ev.BLOCK_SIZE["cpu"])
    assert tokens == pytest.approx(pred["tokens"], rel=0.05)
