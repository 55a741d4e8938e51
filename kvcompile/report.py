"""Human-readable renderings of a plan (``kvcompile inspect``) and of the target list.

``render_inspect(plan)`` joins the sections in ``SECTIONS`` (each ``fn(plan, view) -> str | None``,
``None`` = nothing to show). To add a section (per-GPU memory, schedule, kernels ...), write a
function with that signature here or in your own module and append it to ``SECTIONS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from .ir import dtype_bytes
from .plan import MAX_BATCH, MAX_CONTEXT, Plan, SettingsError
from .strategies import Strategy
from .targets import Target, load_target


@dataclasses.dataclass(frozen=True)
class View:
    """The serving point a plan is shown at (defaults: the plan's own context and batch)."""

    context: int
    batch: int

    @classmethod
    def of(cls, plan: Plan, context: int | None = None, batch: int | None = None) -> View:
        ctx = plan.config.context if context is None else context
        b = plan.config.batch if batch is None else batch
        if not 0 < ctx <= MAX_CONTEXT or not 0 < b <= MAX_BATCH:
            raise SettingsError(f"context={ctx} and batch={b} must be in [1, {MAX_CONTEXT}] and [1, {MAX_BATCH}]")
        return cls(ctx, b)


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'`` (binary units)."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.2f} {unit}"
        x /= 1024
    return f"{x:.2f} TiB"  # unreachable


def head_bytes(plan: Plan, view: View) -> list[list[int]]:
    """``[layer][kv_head]`` -> bytes that head holds at ``view.context`` for ``view.batch`` sequences."""
    db = dtype_bytes(plan.model.dtype)
    return [
        [s.bytes_for(view.context, site.head_dim, db) * view.batch for s in row]
        for site, row in zip(plan.model.sites, plan.strategies(), strict=True)
    ]


def header(plan: Plan, view: View) -> str:
    m, t = plan.model, plan.target
    where = "meta device (no weights)" if m.on_meta else "real weights"
    gpus = f"{t.name} x{t.gpus}" if t.gpus > 1 else t.name
    return "\n".join(
        [
            f"plan {plan.content_hash[:12]}  kvcompile {plan.kvcompile_version}  "
            f"schema {plan.schema_version}",
            f"model   {m.name} ({m.arch}, {m.dtype}, {m.num_params / 1e9:.3g}B params, {where})",
            f"target  {gpus}  ({fmt_bytes(t.memory_bytes)} and {t.memory_bandwidth / 1e12:.2f} TB/s per GPU)",
            f"serving context {view.context} tokens x batch {view.batch}; objective {plan.config.objective}",
        ]
    )


def layer_table(plan: Plan, view: View) -> str:
    """Per layer and KV head: strategy short label and bytes at context, one sub-row per distinct
    strategy of a layer (its heads listed as ranges). Runs of identical consecutive layers are merged.
    A legend below the table gives each short label's full ``label()``."""
    strategies = plan.strategies()
    short = short_names(s for row in strategies for s in row)
    per_head = head_bytes(plan, view)
    rows: list[tuple[str, str, str, str]] = []
    wl = max(len(v) for v in short.values())
    i, n = 0, len(plan.layers)
    while i < n:
        key = _layer_key(plan, strategies, i)
        j = i
        while j + 1 < n and _layer_key(plan, strategies, j + 1) == key:
            j += 1
        site = plan.model.sites[i]
        layers = str(i) if i == j else f"{i}-{j}"
        window = str(site.sliding_window) if site.sliding_window else "-"
        total = fmt_bytes(sum(per_head[i]) * (j - i + 1)) + ("" if i == j else f" ({j - i + 1} layers)")
        groups: dict[str, list[int]] = {}
        for h, strat in enumerate(strategies[i]):
            groups.setdefault(strat.label(), []).append(h)
        for g, (label, heads) in enumerate(groups.items()):
            each = fmt_bytes(per_head[i][heads[0]]) + (" each" if len(heads) > 1 else "")
            cell = f"{_ranges(heads):<9} {short[label]:<{wl}}  {each}"
            rows.append((layers, window, cell, total) if g == 0 else ("", "", cell, ""))
        i = j + 1
    title = "KV heads: strategy, bytes at context"
    w0 = max(len("layer"), *(len(r[0]) for r in rows))
    w1 = max(len("window"), *(len(r[1]) for r in rows))
    w2 = max(len(title), *(len(r[2]) for r in rows))
    lines = [f"{'layer':>{w0}}  {'window':>{w1}}  {title:<{w2}}  bytes"]
    lines.append("-" * (len(lines[0]) + 8))
    lines += [f"{a:>{w0}}  {b:>{w1}}  {c:<{w2}}  {d}".rstrip() for a, b, c, d in rows]
    lines.append("")
    lines.append("strategies:")
    ws = max(len(v) for v in short.values())
    lines += [f"  {v:<{ws}}  {k}" for k, v in short.items()]
    return "\n".join(lines)


def short_names(strategies: Iterable[Strategy]) -> dict[str, str]:
    """Full ``label()`` -> ``short_label()`` for each distinct strategy, in first-seen order. Short
    labels that two different strategies share get ``#2``, ``#3`` ... so the legend stays one-to-one."""
    out: dict[str, str] = {}
    taken: dict[str, int] = {}
    for s in strategies:
        full = s.label()
        if full in out:
            continue
        base = s.short_label()
        taken[base] = taken.get(base, 0) + 1
        out[full] = base if taken[base] == 1 else f"{base}#{taken[base]}"
    return out


def _ranges(heads: list[int]) -> str:
    """``[0, 1, 2, 5] -> 'h0-h2,h5'`` (``[] -> '-'``)."""
    if not heads:
        return "-"
    out: list[str] = []
    start = heads[0]
    for a, b in zip(heads, [*heads[1:], -1], strict=True):
        if b != a + 1:
            out.append(f"h{start}" if start == a else f"h{start}-h{a}")
            start = b
    return ",".join(out)


def _layer_key(plan: Plan, strategies: list[list[Any]], i: int) -> tuple[Any, ...]:
    s = plan.model.sites[i]
    labels = tuple(x.label() for x in strategies[i])
    return (s.num_kv_heads, s.head_dim, s.v_head_dim, s.sliding_window, labels)


def totals(plan: Plan, view: View) -> str:
    """KV bytes vs the full cache and vs the node's memory at the view's context and batch."""
    kv = plan.predicted_kv_bytes(view.context, view.batch)
    full = plan.full_kv_bytes(view.context, view.batch)
    full_bf16 = plan.full_kv_bytes(view.context, view.batch, dtype="bfloat16")
    t = plan.target
    node_mem = t.memory_bytes * t.gpus
    weights = plan.model.param_bytes
    free = node_mem - weights - kv
    per_token_full = plan.full_kv_bytes(1, 1)
    per_token_bf16 = plan.full_kv_bytes(1, 1, dtype="bfloat16")
    dtype = plan.model.dtype
    bf16_token = "" if dtype == "bfloat16" else f", {per_token_bf16} B (bfloat16)"
    bf16_ctx = "" if dtype == "bfloat16" else f", {kv / full_bf16:.3f} x bfloat16 ({fmt_bytes(full_bf16)})"
    lines = [
        f"full-cache KV bytes/token   {per_token_full} B ({dtype}){bf16_token}",
        f"plan KV at context          {fmt_bytes(kv)}  = {kv / full:.3f} x full {dtype} "
        f"({fmt_bytes(full)}){bf16_ctx}",
        f"node memory                 {fmt_bytes(node_mem)} ({t.gpus} x {fmt_bytes(t.memory_bytes)}): "
        f"weights {fmt_bytes(weights)} + KV {fmt_bytes(kv)} = {(weights + kv) / node_mem:.1%} used",
        "fits                        " + ("yes" if free >= 0 else f"NO, short by {fmt_bytes(-free)}"),
    ]
    return "\n".join(lines)


def predicted_vs_measured(plan: Plan, view: View) -> str | None:
    """Scalar ``predicted`` values, side by side with ``measured`` ones when the plan has them."""
    measured = plan.measured or {}
    both = set(plan.predicted) | set(measured)
    keys = sorted(k for k in both if not _nested(plan.predicted.get(k, measured.get(k))))
    if not keys:
        return None
    if not measured:
        w = max(len(k) for k in keys)
        return "\n".join([f"{'predicted':<{w}}"] + [f"{k:<{w}}  {_fmt(plan.predicted[k]):>16}" for k in keys])
    w = max(len(k) for k in keys)
    lines = [f"{'quantity':<{w}}  {'predicted':>16}  {'measured':>16}"]
    for k in keys:
        p, m = plan.predicted.get(k, ""), measured.get(k, "")
        lines.append(f"{k:<{w}}  {_fmt(p):>16}  {_fmt(m):>16}")
    return "\n".join(lines)


def notes(plan: Plan, view: View) -> str | None:
    return "\n".join(f"note: {n}" for n in plan.notes) or None


def _nested(v: Any) -> bool:
    return isinstance(v, (dict, list))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return f"<{type(v).__name__} {len(v)}>"
    return str(v)


def render_placement(plan: Plan, view: View | None = None) -> str | None:
    """Parallelism and memory placement (``Plan.placement``, from the ``place_kv`` pass): TP degree,
    per-GPU memory (weights / KV / activations / free), where each layer's KV groups live, the batch,
    predicted tokens/s and the binding constraint. None when the plan has no placement."""
    pl = plan.placement
    if not pl or "tp" not in pl:
        return None
    g = pl["per_gpu"]
    bd = pl.get("time_breakdown_s", {})
    where: list[tuple[list[int], str]] = []  # consecutive layers with the same placement pattern
    for row in pl["placement"]:
        kinds = {grp["where"] for grp in row["groups"]}
        pat = kinds.pop() if len(kinds) == 1 else "mixed (" + ", ".join(
            f"heads {_ranges(grp['heads'])}: {grp['where']}" for grp in row["groups"]) + ")"
        if where and where[-1][1] == pat and where[-1][0][-1] == row["layer"] - 1:
            where[-1][0].append(row["layer"])
        else:
            where.append(([row["layer"]], pat))
    ranks = ", ".join(f"GPU{r}: {_ranges(list(h))}" for r, h in enumerate(pl["rank_heads"]))
    lines = [
        f"placement (objective {pl['objective']}, {pl['target']}, context {pl['context']})",
        f"  tensor parallel  TP={pl['tp']} of {pl['gpus']} GPUs"
        + (f" x {pl['replicas']} data-parallel replicas" if pl.get("replicas", 1) > 1 else "")
        + f"; KV heads {ranks}; {pl['kv_copies']} head caches per layer per replica",
        f"  batch            {pl['batch']} sequences per replica",
        f"  predicted        {pl.get('node_tokens_per_s', pl['tokens_per_s']):.1f} tokens/s per node "
        f"({pl['tokens_per_s']:.1f} per replica), step {pl['step_time_s'] * 1e3:.3f} ms ("
        + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in bd.items()) + ")",
        f"  per GPU memory   weights {fmt_bytes(g['weights'])} | KV {fmt_bytes(g['kv'])} | activations "
        f"{fmt_bytes(g['activations'])} | reserve {fmt_bytes(g['reserve'])} | free {fmt_bytes(g['free'])}"
        f"  (of {fmt_bytes(g['capacity'])})",
        f"  host memory KV   {fmt_bytes(pl['host_kv_bytes'])} (node)",
    ]
    for lo, pat in where:
        lines.append(f"  layer{'s' if len(lo) > 1 else ''} {_ranges(lo).replace('h', '')}: {pat}")
    lines.append(f"  why              {pl['binding']}")
    return "\n".join(lines)


Section = Callable[[Plan, View], "str | None"]
SECTIONS: list[tuple[str, Section]] = [
    ("header", header),
    ("layers", layer_table),
    ("totals", totals),
    ("predicted vs measured", predicted_vs_measured),
    ("placement", render_placement),
    ("notes", notes),
]


def render_inspect(plan: Plan, context: int | None = None, batch: int | None = None) -> str:
    """The full ``kvcompile inspect`` text: every non-empty section of ``SECTIONS``, in order."""
    view = View.of(plan, context, batch)
    parts = [text for _, fn in SECTIONS if (text := fn(plan, view))]
    return "\n\n".join(parts)


def heatmap(plan: Plan, path: str, context: int | None = None, batch: int | None = None) -> str:
    """Save a layer x KV-head heatmap of bytes at context relative to the full cache (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view = View.of(plan, context, batch)
    db = dtype_bytes(plan.model.dtype)
    per_head = head_bytes(plan, view)
    ratio = [
        [b / (view.context * (s.head_dim + s.v_head_dim) * db * view.batch) for b in row]
        for s, row in zip(plan.model.sites, per_head, strict=True)
    ]
    width = max(len(r) for r in ratio)
    grid = [r + [float("nan")] * (width - len(r)) for r in ratio]
    # at least 4.5 in wide: the two-line title must fit above a 3-KV-head grid
    fig, ax = plt.subplots(figsize=(max(4.5, 2 + 0.4 * width), 1.5 + 0.12 * len(grid)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1.0, max(max(r) for r in ratio)))
    ax.set_xticks(range(width))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{plan.model.name}\nKV bytes / full at {view.context} tokens", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def targets_table(names: list[str]) -> str:
    """``kvcompile targets``: one row per target file."""
    rows = []
    for name in names:
        t: Target = load_target(name)
        rows.append(
            (
                t.name,
                f"{t.memory_bytes / 2**30:.0f} GiB",
                f"{t.memory_bandwidth / 1e12:.2f} TB/s",
                f"{t.flops['bf16'] / 1e12:.0f}",
                "yes" if t.supports_fp8 else "no",
                t.description,
            )
        )
    head = ("target", "memory", "bandwidth", "bf16 TFLOP/s", "fp8 KV", "description")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head[:-1])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])


# ---- planner sections: head roles and the strategy heatmap (added by the planner) ---------------------
ROLE_LEGEND = (
    "R = retrieval head, every token kept (full / fp8 / quant / think / mikv); "
    "K = keyed selection (snapkv / heavy_hitter, alone or quantized); S = streaming (sinks + recent window)"
)


def head_role(spec: dict[str, Any]) -> str:
    """``R``, ``K`` or ``S`` for one head's strategy spec (see ``ROLE_LEGEND``)."""
    name = spec.get("name")
    if name == "compose":
        return head_role(spec.get("select", {}))
    if name == "sink_window":
        return "S"
    if name in ("snapkv", "heavy_hitter"):
        return "K"
    return "R"


def head_roles(plan: Plan, view: View) -> str | None:
    """Which heads the solve kept as retrieval heads vs streaming heads, per layer (10 layers a line)."""
    if all(h == {"name": "full", "dtype": "model"} for lp in plan.layers for h in lp.heads):
        return None
    roles = ["".join(head_role(h) for h in lp.heads) for lp in plan.layers]
    counts = {r: sum(x.count(r) for x in roles) for r in "RKS"}
    lines = [f"head roles  R {counts['R']}  K {counts['K']}  S {counts['S']}"]
    lines += [f"  {part.strip()}" for part in ROLE_LEGEND.split(";")]
    for start in range(0, len(roles), 10):
        chunk = roles[start : start + 10]
        lines.append(f"  layers {start:>3}-{start + len(chunk) - 1:<3} " + " ".join(chunk))
    return "\n".join(lines)


def strategy_family(spec: dict[str, Any]) -> str:
    """Short family label: ``full``, ``full:bfloat16``, ``quant4``, ``snapkv``, ``compose(snapkv+q2)``."""
    name = spec.get("name", "?")
    if name == "full":
        return "full" if spec.get("dtype", "model") == "model" else f"full:{spec['dtype']}"
    if name == "quant":
        return f"quant{spec.get('bits')}"
    if name == "compose":
        return f"compose({spec['select']['name']}+q{spec['quant'].get('bits')})"
    return str(name)


def strategy_heatmap(plan: Plan, path: str) -> str:
    """Save a layer x KV-head map of the chosen strategy family (categorical colours, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fams = [[strategy_family(h) for h in lp.heads] for lp in plan.layers]
    names = sorted({f for row in fams for f in row})
    index = {n: i for i, n in enumerate(names)}
    grid = [[index[f] for f in row] for row in fams]
    cmap = ListedColormap(plt.get_cmap("tab20").colors[: max(len(names), 1)])  # type: ignore[attr-defined]
    width = max(len(r) for r in grid)
    fig, ax = plt.subplots(figsize=(4 + 0.5 * width, 1.5 + 0.14 * len(grid)))
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
    for i, row in enumerate(plan.layers):
        for j, h in enumerate(row.heads):
            ax.text(j, i, head_role(h), ha="center", va="center", fontsize=6, color="white")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(index[n])) for n in names]
    ax.legend(handles, names, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    ax.set_xticks(range(width))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{plan.model.name}\nstrategy per head (R/K/S roles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


SECTIONS.insert(3, ("head roles", head_roles))
