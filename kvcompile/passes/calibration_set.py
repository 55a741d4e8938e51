"""The shipped calibration sets (``kvcompile/data/calibration/<name>.json``) turned into token ids.

A set names a text file, a sample length in tokens, an observation window and a list of samples:

* ``passkey``: chat-framed filler prose with a 5-digit pass key at ``depth``, then the question, the
  assistant's answer prefix and the answer (scored). The prefix up to the question is the compressible
  *context*; the rest are the observation queries (question-agnostic: they arrive after compression).
* ``prose``: running prose; the last ``obs_window`` tokens are the observation queries.

Everything is deterministic for a given tokenizer: filler offsets and keys come from
``random.Random(seed)``. ``spec`` strings: ``NAME`` (a shipped set), ``NAME:N`` (its first N samples),
``NAME:NxT`` (N samples of T tokens), or a path to a set ``.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "calibration"

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nQuestion: What is the pass key? Answer with the number."
ANSWER_PREFIX = "The pass key is"


@dataclasses.dataclass(frozen=True)
class CalibrationSample:
    """``ids``: token ids; ``ids[:context_len]`` is compressed first; ``ids[answer_start:]`` are the
    scored tokens (the key's digits after the answer prefix, or the prose continuation); ``answer``:
    the key or ``""``. A model is prompted with ``ids[:answer_start]``."""

    kind: str
    ids: tuple[int, ...]
    context_len: int
    answer: str
    answer_start: int


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    name: str
    digest: str  # SHA-256 over the set definition and its text: part of the calibration cache key
    tokens: int
    obs_window: int
    samples: tuple[dict[str, Any], ...]
    heldout: tuple[dict[str, Any], ...]
    text: str


def available() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def load_set(spec: str | None = None) -> CalibrationSet:
    """Parse a calibration spec (module docstring); ``None`` means ``"default"``."""
    spec = spec or "default"
    name, _, size = spec.partition(":")
    path = Path(name) if name.endswith(".json") else DATA_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"calibration={spec!r}: no such set; shipped sets: {available()} (or a .json path)")
    raw = json.loads(path.read_text())
    text_path = path.parent / raw["text"]
    text = text_path.read_text()
    samples, tokens = list(raw["samples"]), int(raw["tokens"])
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
    digest = hashlib.sha256(
        json.dumps({"raw": raw, "samples": samples, "tokens": tokens}, sort_keys=True).encode()
        + text.encode()
    ).hexdigest()[:16]
    return CalibrationSet(
        name=spec, digest=digest, tokens=tokens, obs_window=int(raw["obs_window"]),
        samples=tuple(samples), heldout=tuple(raw.get("heldout", ())), text=text,
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _filler(tokenizer: Any, text: str, n: int, rng: random.Random) -> list[int]:
    paras = [p for p in text.split("\n\n") if p.strip()]
    i = rng.randrange(len(paras))
    out: list[int] = []
    while len(out) < n:
        out.extend(_encode(tokenizer, " " + paras[i % len(paras)].strip()))
        i += 1
    return out[:n]


def _chat_frame(tokenizer: Any) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n"
    mark = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(mark)
    return before, after


def build_sample(tokenizer: Any, cset: CalibrationSet, item: dict[str, Any], tokens: int | None = None
                 ) -> CalibrationSample:
    """Token ids of one sample of ``tokens`` tokens (default: the set's length)."""
    n = tokens or cset.tokens
    rng = random.Random(int(item["seed"]))
    if item["kind"] == "prose":
        ids = _filler(tokenizer, cset.text, n, rng)
        ctx = n - min(cset.obs_window, n // 4)
        return CalibrationSample("prose", tuple(ids), ctx, "", ctx + 1)
    if item["kind"] != "passkey":
        raise ValueError(f"calibration sample kind {item['kind']!r} unknown (passkey or prose)")
    key = f"{rng.randrange(10000, 100000)}"
    before, after = _chat_frame(tokenizer)
    head = _encode(tokenizer, before + INTRO)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    tail = _encode(tokenizer, QUESTION) + _encode(tokenizer, after + ANSWER_PREFIX)
    digits = _encode(tokenizer, f" {key}.")
    room = n - len(head) - len(needle) - len(tail) - len(digits)
    if room < 32:
        raise ValueError(f"calibration tokens={n} too short for the passkey frame")
    filler = _filler(tokenizer, cset.text, room, rng)
    cut = int(float(item.get("depth", 0.5)) * room)
    context = head + filler[:cut] + needle + filler[cut:]
    prompt = context + tail
    return CalibrationSample("passkey", tuple(prompt + digits), len(context), key, len(prompt))
