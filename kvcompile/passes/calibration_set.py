"""The shipped calibration sets (``kvcompile/data/calibration/<name>.json``) turned into token ids.

Samples come from the shared task library :mod:`kvcompile.eval.suite` (the same code ``kvcompile eval``
and the benchmarks use): a set lists ``samples`` (what ``calibrate`` measures damage on, from the suite's
``split``, by default ``calib``) and ``heldout`` (what ``verify_plan`` measures, from ``heldout_split``,
by default ``verify``: disjoint phrasings, names and filler texts, and families never calibrated on).
Each item is ``{"kind": FAMILY, "seed": N}``:

* retrieval families (``single``, ``multi``, ``twohop``, ``followup``): the chat-framed context (filler
  text with the facts), then the question, the assistant's answer prefix and the answer (scored). The
  prefix up to the question is the compressible *context*; the rest are the observation queries
  (question-agnostic: they arrive after compression).
* ``lm``: running text; the last tokens (at most ``obs_window``) are the observation queries.
* ``{"kind": "multi", "ask": "all"}``: after the context, one turn per fact (the asked one last), every
  answer scored: what a question-agnostic cache must keep is every fact, not the one a sample asks.

Everything is deterministic for a given tokenizer. ``spec`` strings: ``NAME`` (a shipped set), ``NAME:N``
(its first N samples), ``NAME:NxT`` (N samples of T tokens), or a path to a set ``.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "calibration"


@dataclasses.dataclass(frozen=True)
class CalibrationSample:
    """``ids``: token ids; ``ids[:context_len]`` is compressed first; ``ids[answer_start:]`` are the
    scored tokens (the answer after the answer prefix, or the text continuation); ``answer``: the
    answer or ``""``. A model is prompted with ``ids[:answer_start]``."""

    kind: str
    ids: tuple[int, ...]
    context_len: int
    answer: str
    answer_start: int
    scored: tuple[tuple[int, int], ...] = ()  # [start, end) spans of scored ids; () = ids[answer_start:]

    def spans(self) -> tuple[tuple[int, int], ...]:
        return self.scored or ((self.answer_start, len(self.ids)),)


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    name: str
    digest: str  # SHA-256 over the set definition and the suite's texts: part of the calibration cache key
    tokens: int
    obs_window: int
    samples: tuple[dict[str, Any], ...]
    heldout: tuple[dict[str, Any], ...]
    split: str = "calib"
    heldout_split: str = "verify"


def available() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def load_set(spec: str | None = None) -> CalibrationSet:
    """Parse a calibration spec (module docstring); ``None`` means ``"default"``."""
    from ..eval import suite

    spec = spec or "default"
    name, _, size = spec.partition(":")
    path = Path(name) if name.endswith(".json") else DATA_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"calibration={spec!r}: no such set; shipped sets: {available()} (or a .json path)")
    raw = json.loads(path.read_text())
    samples, tokens = list(raw["samples"]), int(raw["tokens"])
    for item in samples + list(raw.get("heldout", ())):
        if item.get("kind") not in suite.FAMILIES:
            raise ValueError(f"calibration={spec!r}: sample kind {item.get('kind')!r} is not one of {suite.FAMILIES}")
    if size:
        m = re.fullmatch(r"(\d+)(?:x(\d+))?", size)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"calibration={spec!r}: size must be N or NxT (N samples of T tokens)")
        n = int(m.group(1))
        base = samples  # beyond the listed samples, cycle them with shifted seeds
        samples = [base[i % len(base)] | {"seed": base[i % len(base)]["seed"] + 1000 * (i // len(base))}
                   for i in range(n)]
        tokens = int(m.group(2)) if m.group(2) else tokens
    if tokens < 128:
        raise ValueError(f"calibration={spec!r}: samples need at least 128 tokens, got {tokens}")
    split, held_split = raw.get("split", "calib"), raw.get("heldout_split", "verify")
    texts = "".join(suite.paragraphs(split)) + "".join(suite.paragraphs(held_split))
    digest = hashlib.sha256(
        json.dumps({"raw": raw, "samples": samples, "tokens": tokens, "suite": suite.VERSION}, sort_keys=True).encode()
        + texts.encode()
    ).hexdigest()[:16]
    return CalibrationSet(
        name=spec, digest=digest, tokens=tokens, obs_window=int(raw["obs_window"]),
        samples=tuple(samples), heldout=tuple(raw.get("heldout", ())), split=split, heldout_split=held_split,
    )


def build_sample(tokenizer: Any, cset: CalibrationSet, item: dict[str, Any], tokens: int | None = None,
                 split: str | None = None) -> CalibrationSample:
    """Token ids of one sample of ``tokens`` tokens (default: the set's length) from ``split`` (default:
    the set's calibration split)."""
    from ..eval import suite

    n = tokens or cset.tokens
    s = suite.make_sample(tokenizer, item["kind"], split or cset.split, n, int(item["seed"]))
    ids = [int(t) for t in s.ids[0].tolist()]
    if item["kind"] == "lm":
        ctx = n - min(cset.obs_window, n // 4)
        return CalibrationSample("lm", tuple(ids), ctx, "", ctx + 1)
    answer = [int(t) for t in s.meta["answer_ids"]]
    if item.get("ask") == "all" and s.meta.get("all_questions"):
        return _ask_all(tokenizer, s, ids)
    return CalibrationSample(item["kind"], tuple(ids + answer), s.context_len, s.answer, len(ids))


def _ask_all(tokenizer: Any, s: Any, ids: list[int]) -> CalibrationSample:
    """A ``multi`` sample whose context is followed by a question about every fact, one turn each (the
    asked one last), every answer scored: a question-agnostic cache must keep all of them, and one
    forward pass measures that for four facts instead of one. ``ids`` ends with the last turn's prefix."""
    from ..eval.data import _chat_frame, _encode
    from ..eval.suite import _turn_separator

    sep, after = _turn_separator(tokenizer), _chat_frame(tokenizer)[1]
    qas = s.meta["all_questions"]
    out = list(ids[: s.context_len])
    scored = []
    for i, (question, prefix, value) in enumerate(qas):
        turn = ("\n\n" if i == 0 else sep) + question + " Answer briefly." + after + prefix
        out += _encode(tokenizer, turn)
        answer = _encode(tokenizer, " " + value + ".")
        scored.append((len(out), len(out) + len(answer)))
        out += answer
    last = scored[-1][0]
    return CalibrationSample("multi", tuple(out), s.context_len, str(qas[-1][2]), last, tuple(scored))
