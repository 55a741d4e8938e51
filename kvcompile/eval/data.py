"""Offline, seeded evaluation samples built from English text already on the machine.

Text sources (no downloads; :func:`source_info` records files, SHA-256s and the Python version)
-------------------------------------------------------------------------------------------------
* ``ppl``: the prose paragraphs of CPython's ``pydoc_data/topics.py`` — the language-reference
  topics every CPython install carries for ``help()``. Only unindented, wrapped paragraphs that start
  with a capital letter and end with a period are kept (code, grammar rules and headings dropped):
  ~390 paragraphs, ~130 k characters (~29 k tokens).
* ``passkey``/``niah`` haystack filler: the Debian license texts in ``/usr/share/common-licenses``
  (GPL-3, GPL-2, LGPL-2.1, GFDL-1.3, Apache-2.0, MPL-2.0; package base-files), paragraphs that do not
  mention "pass"/"key" (~200 paragraphs, ~75 k characters). With the Python reference as filler
  SmolLM2 reads "pass key" as Python's ``pass``/dict keys (60 % full-cache passkey accuracy at 1k vs
  100 %); when the license files are missing the filtered pydoc prose is used instead.

Samples
-------
A :class:`Sample` holds token ids ``[1, N]`` built by concatenating separately tokenized pieces, so
``ids[:, :context_len]`` is *exactly* the compressible context (chat header, instruction, haystack)
and the rest is the question plus the assistant's answer prefix. The question-agnostic evaluation
prefills ``ids[:, :context_len]`` into the cache before the question is seen.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nQuestion: What is the pass key? Answer with the number."
PASSKEY_ANSWER_PREFIX = "The pass key is"
NIAH_NEEDLE = " The pass key for {name} is {key}."
NIAH_QUESTION = "\n\nQuestion: What is the pass key for {name}? Answer with the number."
NIAH_ANSWER_PREFIX = "The pass key for {name} is"
NIAH_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas")


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One evaluation input.

    ``ids``: int64 ``[1, N]``; ``context_len``: tokens ``ids[:, :context_len]`` are the context that
    is compressed before the question is seen; ``answer``: the expected answer (the key, as digits)
    or ``""`` for perplexity samples, where ``ids[:, context_len:]`` are the scored tokens;
    ``meta``: task-specific facts (key, depth, needle token position, seed ...).
    """

    task: str
    ids: torch.Tensor
    context_len: int
    answer: str
    meta: dict[str, Any]

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


_CONFUSERS = re.compile(r"\b(pass|passes|passed|key|keys|keyword|keywords)\b", re.IGNORECASE)
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3", "Apache-2.0", "MPL-2.0")


def _pydoc_path() -> Path:
    import pydoc_data.topics as mod

    return Path(mod.__file__)


@functools.lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """English prose paragraphs from ``pydoc_data/topics.py`` in sorted topic order (the ppl text)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.split("\n")
            if len(lines) < 2 or any(line.startswith(" ") for line in lines):
                continue  # one-line headings, indented code / grammar / lists
            if any(marker in block for marker in ("::=", ">>>", "***", "===", "---")):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) >= 150 and text[0].isupper() and text.endswith("."):
                out.append(re.sub(r"\s+", " ", text))
    if len(out) < 50:
        raise RuntimeError(f"{_pydoc_path()} yielded only {len(out)} prose paragraphs")
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _haystack() -> tuple[tuple[str, ...], tuple[Path, ...]]:
    files = tuple(LICENSE_DIR / f for f in LICENSE_FILES if (LICENSE_DIR / f).is_file())
    out = []
    for path in files:
        for block in re.split(r"\n\s*\n", path.read_text()):
            text = re.sub(r"\s+", " ", block).strip()
            if len(text) >= 150 and text[0].isupper():
                out.append(text)
    if len(out) < 50:
        out, files = list(prose_paragraphs()), (_pydoc_path(),)
    return tuple(p for p in out if not _CONFUSERS.search(p)), files


def haystack_paragraphs() -> tuple[str, ...]:
    """Filler paragraphs for passkey/niah: the Debian license texts, else (no such files) pydoc prose.

    Paragraphs mentioning "pass"/"key" are dropped: they compete with the needle. The Python
    reference is a poor filler for SmolLM2 (it reads "pass key" as Python's ``pass``/dict keys and
    answers "a special syntax ..."; 60 % passkey accuracy at 1k vs 100 % with the license texts).
    """
    return _haystack()[0]


def source_info() -> dict[str, Any]:
    """Which text was used: files, SHA-256s, Python version, paragraph and character counts."""
    pydoc = _pydoc_path()
    paras = prose_paragraphs()
    hay, files = _haystack()
    return {
        "ppl": {
            "file": str(pydoc),
            "sha256": hashlib.sha256(pydoc.read_bytes()).hexdigest(),
            "python": sys.version.split()[0],
            "description": "prose paragraphs of CPython's pydoc_data/topics.py (language reference topics)",
            "paragraphs": len(paras),
            "chars": sum(len(p) for p in paras),
        },
        "haystack": {
            "files": {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
            "description": "license texts / prose paragraphs that do not mention 'pass' or 'key'",
            "paragraphs": len(hay),
            "chars": sum(len(p) for p in hay),
        },
    }


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=4)
def _paragraph_tokens(tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    # each paragraph with a leading space, so concatenations read as running text
    return tuple(tuple(_encode(tokenizer, " " + p)) for p in haystack_paragraphs())


def _filler(tokenizer: Any, n_tokens: int, rng: random.Random) -> list[int]:
    """``n_tokens`` tokens of running prose from a random paragraph on (wrapping around)."""
    paras = _paragraph_tokens(tokenizer)
    i = rng.randrange(len(paras))
    out: list[int] = []
    while len(out) < n_tokens:
        out.extend(paras[i % len(paras)])
        i += 1
    return out[:n_tokens]


@functools.lru_cache(maxsize=4)
def _chat_frame(tokenizer: Any) -> tuple[str, str]:
    """The chat template's text before and after a user message (with the generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n"
    sentinel = "\x00USER\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(sentinel)
    return before, after


def _boundaries(tokenizer: Any, tokens: list[int]) -> tuple[list[int], list[int]]:
    """Indices ``i`` where a needle can go before ``tokens[i]``: after a sentence or clause end
    (".", ";", ":"), and before any word (fallback when no sentence end is near the target)."""
    pieces = tokenizer.convert_ids_to_tokens(tokens)
    ends = [0] + [i + 1 for i, p in enumerate(pieces) if p.endswith((".", ";", ":"))] + [len(tokens)]
    words = [i for i, p in enumerate(pieces) if p.startswith(("Ġ", "▁", " "))] + [len(tokens)]
    return ends, words


def _place(bounds: tuple[list[int], list[int]], target: float, taken: set[int], n: int) -> int:
    ends, words = bounds
    tolerance = 0.02 * n + 8
    for cands in (ends, words):
        free = [c for c in cands if c not in taken]
        if free:
            best = min(free, key=lambda c: abs(c - target))
            if abs(best - target) <= tolerance or cands is words:
                return best
    return round(target)


def _haystack_sample(
    tokenizer: Any,
    task: str,
    length: int,
    needles: list[tuple[str, float]],
    question: str,
    answer_prefix: str,
    answer: str,
    rng: random.Random,
    meta: dict[str, Any],
) -> Sample:
    """Chat-framed haystack of ``length`` tokens total with ``needles`` (text, depth in [0, 1])."""
    before, after = _chat_frame(tokenizer)
    head = _encode(tokenizer, before + INTRO)
    tail_q = _encode(tokenizer, question)
    tail_a = _encode(tokenizer, after + answer_prefix)
    needle_ids = [_encode(tokenizer, text) for text, _ in needles]
    budget = length - len(head) - len(tail_q) - len(tail_a) - sum(map(len, needle_ids))
    if budget < 16 * (len(needles) + 1):
        raise ValueError(f"length={length} is too short for the prompt frame and {len(needles)} needle(s)")
    filler = _filler(tokenizer, budget, rng)
    bounds = _boundaries(tokenizer, filler)
    cuts: list[tuple[int, list[int]]] = []
    taken: set[int] = set()
    for (_, depth), ids in zip(needles, needle_ids, strict=True):
        cut = _place(bounds, depth * len(filler), taken, len(filler))
        taken.add(cut)
        cuts.append((cut, ids))
    hay: list[int] = []
    positions: list[int] = []  # token offset of each needle inside the haystack, in needle order
    prev = 0
    order = sorted(range(len(cuts)), key=lambda j: cuts[j][0])
    pos_of: dict[int, int] = {}
    for j in order:
        cut, ids = cuts[j]
        hay.extend(filler[prev:cut])
        pos_of[j] = len(hay)
        hay.extend(ids)
        prev = cut
    hay.extend(filler[prev:])
    positions = [pos_of[j] for j in range(len(cuts))]
    ids = head + hay + tail_q + tail_a
    meta = dict(meta)
    meta.update(
        target_length=length,
        haystack_tokens=len(hay),
        needle_token_pos=positions,  # offsets within the haystack
        needle_depths=[p / len(hay) for p in positions],
        haystack_start=len(head),
    )
    return Sample(task, torch.tensor([ids], dtype=torch.long), len(head) + len(hay), answer, meta)


def make_passkey_sample(tokenizer: Any, length: int, seed: int, depth: float | None = None) -> Sample:
    """A passkey-retrieval prompt of ``length`` tokens with a 5-digit key at ``depth`` of the haystack.

    ``depth`` in [0, 1] (fraction of the haystack before the needle; drawn from ``seed`` when None).
    The needle is inserted at the sentence boundary nearest the requested depth. Deterministic for
    ``(tokenizer, length, seed, depth)``.

    >>> s = make_passkey_sample(tok, 1024, seed=0)        # doctest: +SKIP
    >>> s.answer, s.meta["needle_depths"], s.length       # doctest: +SKIP
    ('52378', [0.41...], 1024)
    """
    if length <= 0:
        raise ValueError(f"length={length} must be positive")
    rng = random.Random(f"passkey:{seed}")
    key = str(rng.randint(10000, 99999))
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    needle = PASSKEY_NEEDLE.format(key=key)
    return _haystack_sample(
        tokenizer,
        "passkey",
        length,
        [(needle, depth)],
        PASSKEY_QUESTION,
        PASSKEY_ANSWER_PREFIX,
        key,
        rng,
        {"key": key, "depth": depth, "seed": seed},
    )


def make_niah_sample(tokenizer: Any, length: int, seed: int, needles: int = 4) -> Sample:
    """Multi-key needle-in-a-haystack: ``needles`` lines "The pass key for <name> is NNNNN." at
    random depths; the question asks for one of them (seeded). Same framing as passkey."""
    if not 2 <= needles <= len(NIAH_NAMES):
        raise ValueError(f"needles={needles} must be in [2, {len(NIAH_NAMES)}]")
    rng = random.Random(f"niah:{seed}")
    names = rng.sample(NIAH_NAMES, needles)
    keys = rng.sample(range(10000, 100000), needles)
    depths = [(i + rng.random()) / needles for i in range(needles)]  # one per stratum, spread out
    rng.shuffle(depths)
    ask = rng.randrange(needles)
    texts = [(NIAH_NEEDLE.format(name=n, key=k), d) for n, k, d in zip(names, keys, depths, strict=True)]
    name = names[ask]
    return _haystack_sample(
        tokenizer,
        "niah",
        length,
        texts,
        NIAH_QUESTION.format(name=name),
        NIAH_ANSWER_PREFIX.format(name=name),
        str(keys[ask]),
        rng,
        {"names": names, "keys": [str(k) for k in keys], "asked": name, "asked_index": ask, "seed": seed},
    )


def make_ppl_sample(tokenizer: Any, context: int = 3584, target: int = 512, seed: int = 0) -> Sample:
    """``context + target`` tokens of running prose (no chat frame) from a seeded paragraph;
    the last ``target`` tokens are scored given the first ``context``."""
    if context < 1 or target < 1:
        raise ValueError(f"context={context} and target={target} must be >= 1")
    rng = random.Random(f"ppl:{seed}")
    paras = prose_paragraphs()
    start = rng.randrange(len(paras))
    ids: list[int] = []
    i = start
    while len(ids) < context + target:
        ids.extend(_encode(tokenizer, ("\n\n" if ids else "") + paras[i % len(paras)]))
        i += 1
    ids = ids[: context + target]
    return Sample(
        "ppl", torch.tensor([ids], dtype=torch.long), context, "", {"seed": seed, "first_paragraph": start}
    )


_NUMBER = re.compile(r"\d+")


def extract_number(text: str) -> str | None:
    """The first run of digits in ``text`` (``None`` when there is none)."""
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def is_correct(generated: str, answer: str) -> bool:
    """Exact match: the first number in the generated continuation equals the key."""
    return extract_number(generated) == answer
