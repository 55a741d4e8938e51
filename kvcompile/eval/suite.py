"""The one library of workload tasks and metrics: calibration, verification, ``kvcompile eval`` and the
planner benchmark all build their samples and score them here.

Families (question-agnostic: the context is compressed before the question is seen)
-----------------------------------------------------------------------------------
* ``single``: one fact in natural text, asked back; phrasings and answer formats (digits, a word, a
  mixed letters-digits code) vary.
* ``multi``: four facts of the same form about different people (distractors), one is asked.
* ``twohop``: "X is in place P" + "P has value V" for two people; the question names the person.
* ``followup``: two facts; turn 1 asks one, the model answers, turn 2 asks the other on the same cache
  (which now also holds turn 1). Scored on turn 2.
* ``lm``: language modelling: NLL of the last ``LM_TARGET`` tokens of a window of running text.

Splits: every family has disjoint phrasings, names and filler texts per split. ``calib`` (what the
planner calibrates on: ``single``, ``multi``, ``lm`` only), ``verify`` (what ``verify_plan`` measures:
all families) and ``test`` (benchmarks; never seen by the planner). Texts are in
``kvcompile/data/corpus/`` (written for this project, redistributable under the project's licence) and
``kvcompile/data/calibration/prose.txt`` (Debian license texts, verbatim copying permitted).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from .data import Sample, _boundaries, _chat_frame, _encode, _place

DATA = Path(__file__).resolve().parent.parent / "data"
FAMILIES = ("single", "multi", "twohop", "followup", "lm")
RETRIEVAL = ("single", "multi", "twohop", "followup")
SPLITS = ("calib", "verify", "test")
CALIB_FAMILIES = ("single", "multi", "lm")
VERSION = 3  # bump when samples change (calibration cache keys include it)
LM_TARGET = 128
MAX_NEW = 12

TEXTS = {
    "calib": ("calibration/prose.txt", "corpus/nature.txt"),
    "verify": ("corpus/cooking.txt", "corpus/travel.txt", "corpus/architecture.txt", "corpus/sports.txt",
               "corpus/medicine.txt"),
    "test": ("corpus/history.txt", "corpus/science.txt", "corpus/astronomy.txt", "corpus/music.txt",
             "corpus/economics.txt"),
}
INTRO = {
    "calib": "There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about it.\n\n",
    "verify": "Read the following notes carefully. Some details in them will be asked about later.\n\n",
    "test": "Below is a long document. Pay attention to any specific details, because you will be "
            "asked about them.\n\n",
}
# (fact sentence, question, answer prefix); {v} = the value
SINGLE = {
    "calib": [(" The pass key is {v}. Remember it. {v} is the pass key.", "What is the pass key?",
               "The pass key is"),
              (" The secret word for today is {v}.", "What is the secret word for today?",
               "The secret word for today is"),
              (" The shipment was logged under the label {v}.", "Under which label was the shipment logged?",
               "The shipment was logged under the label"),
              (" In the margin of the old map someone had pencilled {v}.",
               "What had someone pencilled in the margin of the old map?", "Someone had pencilled"),
              (" The guide mentioned that the trail marker reads {v}.", "What does the trail marker read?",
               "The trail marker reads")],
    "verify": [(" Note to self: the locker combination is {v}.", "What is the locker combination?",
                "The locker combination is"),
               (" The access code for the archive room is {v}. Keep it safe.",
                "What is the access code for the archive room?", "The access code for the archive room is")],
    "test": [(" Important: the vault number is {v}. Do not forget the vault number.", "What is the vault number?",
              "The vault number is"),
             (" By the way, my favourite password is {v}.", "What is my favourite password?",
              "Your favourite password is"),
             (" The reference code on the parcel was {v}.", "What was the reference code on the parcel?",
              "The reference code on the parcel was")],
}
# {n} = a name
MULTI = {
    "calib": [(" The pass key for {n} is {v}.", "What is the pass key for {n}?", "The pass key for {n} is"),
              (" {n} signed the guest book as {v}.", "How did {n} sign the guest book?",
               "{n} signed the guest book as"),
              (" The ticket issued to {n} carries the mark {v}.", "What mark does the ticket issued to {n} carry?",
               "The ticket issued to {n} carries the mark")],
    "verify": [(" {n}'s room number is {v}.", "What is {n}'s room number?", "{n}'s room number is")],
    "test": [(" The badge code assigned to {n} is {v}.", "What badge code is assigned to {n}?",
              "The badge code assigned to {n} is"),
             (" {n} parked the car in space {v}.", "In which space did {n} park the car?",
              "{n} parked the car in space")],
}
# (person -> place, place -> value, question, answer prefix, second-hop prefix); {p} = a place. The model
# first names the place (hop 1); its own answer is then put into the second-hop prefix and it must give
# that place's value (hop 2). Both facts must survive compression.
TWOHOP = {
    "calib": [(" {n} works in the {p} office.", " The phone extension of the {p} office is {v}.",
               "What is the phone extension of the office where {n} works?", "{n} works in the",
               " The phone extension of the {p} office is")],
    "verify": [(" {n} lives in the {p} house.", " The door code of the {p} house is {v}.",
                "What is the door code of the house where {n} lives?", "{n} lives in the",
                " The door code of the {p} house is")],
    "test": [(" {n} sails on the ship called {p}.", " The radio channel of the {p} is {v}.",
              "Which radio channel does the ship that {n} sails on use?", "{n} sails on the ship called",
              " The radio channel of the {p} is")],
}
NAMES = {
    "calib": ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro"),
    "verify": ("Ines", "Jonas", "Kira", "Lars", "Maya", "Nikolai", "Olga", "Pedro"),
    "test": ("Quentin", "Rosa", "Samir", "Tamara", "Umberto", "Vera", "Walter", "Yasmin"),
}
PLACES = {
    "calib": ("red", "blue", "green", "yellow"),
    "verify": ("white", "black", "orange", "purple"),
    "test": ("Aurora", "Bellwether", "Calypso", "Dauntless"),
}
WORDS = ("saffron", "velvet", "thistle", "juniper", "pebble", "cobalt", "glacier", "tulip", "lantern",
         "walnut", "falcon", "violin", "compass", "marmalade", "cinnamon", "parsnip", "harpoon", "quartz")
FORMATS = ("digits", "word", "code")


def value(rng: random.Random, fmt: str) -> str:
    if fmt == "digits":
        return str(rng.randint(10000, 99999))
    if fmt == "word":
        return rng.choice(WORDS)
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(100, 999)}"


@functools.lru_cache(maxsize=8)
def paragraphs(split: str) -> tuple[str, ...]:
    """Filler paragraphs of a split's texts (whitespace collapsed, >= 80 characters)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    out = []
    for rel in TEXTS[split]:
        for block in re.split(r"\n\s*\n", (DATA / rel).read_text()):
            text = re.sub(r"\s+", " ", block).strip()
            if len(text) >= 80:
                out.append(text)
    return tuple(out)


def filler(tokenizer: Any, split: str, n: int, rng: random.Random) -> list[int]:
    """``n`` tokens of running text: the split's paragraphs in a seeded order (cycled when needed)."""
    paras = list(paragraphs(split))
    rng.shuffle(paras)
    out: list[int] = []
    i = 0
    while len(out) < n:
        out.extend(_encode(tokenizer, " " + paras[i % len(paras)]))
        i += 1
    return out[:n]


@functools.lru_cache(maxsize=4)
def _turn_separator(tokenizer: Any) -> str:
    """Chat-template text between an assistant answer and the next user message."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    a, u = "\x00A\x00", "\x00U\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}, {"role": "user", "content": u}],
        tokenize=False)
    return text.split(a, 1)[1].split(u, 1)[0]


def make_sample(tokenizer: Any, family: str, split: str, length: int, seed: int) -> Sample:
    """One seeded sample of ``family`` from ``split`` with ``length`` tokens in total (module docstring).

    ``Sample.meta``: ``family``, ``split``, ``seed``, ``answer_ids`` (the answer's tokens as the model
    should continue the prompt, used for teacher-forced scoring), ``followup`` (token ids of the second
    turn's question + answer prefix) and ``answer2`` for ``followup``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} must be one of {FAMILIES}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    rng = random.Random(f"{family}:{split}:{seed}")
    meta: dict[str, Any] = {"family": family, "split": split, "seed": seed, "target_length": length}
    if family == "lm":
        ids = filler(tokenizer, split, length, rng)
        ctx = length - min(LM_TARGET, length // 4)
        return Sample("lm", torch.tensor([ids], dtype=torch.long), ctx, "", meta | {"answer_ids": ids[ctx:]})
    fmt = rng.choice(FORMATS)
    facts: list[str] = []
    if family == "single":
        fact, question, prefix = rng.choice(SINGLE[split])
        answer = value(rng, fmt)
        facts = [fact.format(v=answer)]
    elif family == "multi":
        fact, question, prefix = rng.choice(MULTI[split])
        names = rng.sample(NAMES[split], 4)
        vals = [value(rng, fmt) for _ in names]
        while len(set(vals)) < len(vals):
            vals = [value(rng, fmt) for _ in names]
        facts = [fact.format(n=n, v=v) for n, v in zip(names, vals, strict=True)]
        ask = rng.randrange(4)
        # every fact's (question, answer prefix, value), the asked one last: calibration may ask them all
        meta["all_questions"] = [(question.format(n=names[i]), prefix.format(n=names[i]), vals[i])
                                 for i in [*(j for j in range(4) if j != ask), ask]]
        answer, question, prefix = vals[ask], question.format(n=names[ask]), prefix.format(n=names[ask])
        meta["distractors"] = [v for i, v in enumerate(vals) if i != ask]
    elif family == "twohop":
        f1, f2, question, prefix, hop2 = rng.choice(TWOHOP[split])
        meta["hop2"] = hop2
        names, places = rng.sample(NAMES[split], 2), rng.sample(PLACES[split], 2)
        vals = [value(rng, fmt) for _ in names]
        while vals[0] == vals[1]:
            vals[1] = value(rng, fmt)
        facts = [f1.format(n=n, p=p) for n, p in zip(names, places, strict=True)]
        facts += [f2.format(p=p, v=v) for p, v in zip(places, vals, strict=True)]
        ask = rng.randrange(2)
        answer, question, prefix = vals[ask], question.format(n=names[ask]), prefix.format(n=names[ask])
        meta["distractors"] = [vals[1 - ask]]
    else:  # followup
        (fa, qa, pa), (fb, qb, pb) = rng.sample(SINGLE[split], 2)
        va, vb = value(rng, fmt), value(rng, rng.choice(FORMATS))
        facts = [fa.format(v=va), fb.format(v=vb)]
        answer, question, prefix = va, qa, pa
        meta["answer2"] = vb
        sep, after = _turn_separator(tokenizer), _chat_frame(tokenizer)[1]
        meta["followup"] = _encode(tokenizer, sep + qb + " Answer briefly." + after + pb)
    depths = [(i + rng.random()) / len(facts) for i in range(len(facts))]
    rng.shuffle(depths)
    s = _context_sample(tokenizer, family, split, length, facts, depths, question + " Answer briefly.",
                        prefix, answer, rng, meta)
    s.meta["answer_ids"] = _encode(tokenizer, " " + answer + ".")
    return s


def _context_sample(tokenizer: Any, family: str, split: str, length: int, facts: list[str], depths: list[float],
                    question: str, prefix: str, answer: str, rng: random.Random, meta: dict[str, Any]) -> Sample:
    before, after = _chat_frame(tokenizer)
    head = _encode(tokenizer, before + INTRO[split])
    tail = _encode(tokenizer, "\n\n" + question) + _encode(tokenizer, after + prefix)
    fact_ids = [_encode(tokenizer, f) for f in facts]
    room = length - len(head) - len(tail) - sum(map(len, fact_ids)) - 8  # 8: room for the answer
    if room < 16 * (len(facts) + 1):
        raise ValueError(f"length={length} is too short for a {family} sample")
    fill = filler(tokenizer, split, room, rng)
    bounds = _boundaries(tokenizer, fill)
    taken: set[int] = set()
    cuts = []
    for ids, d in zip(fact_ids, depths, strict=True):
        cut = _place(bounds, d * len(fill), taken, len(fill))
        taken.add(cut)
        cuts.append((cut, ids))
    hay: list[int] = []
    prev = 0
    for cut, ids in sorted(cuts, key=lambda c: c[0]):
        hay += fill[prev:cut] + ids
        prev = cut
    hay += fill[prev:]
    ids = head + hay + tail
    meta |= {"depths": depths, "needle_depths": depths}
    return Sample(family, torch.tensor([ids], dtype=torch.long), len(head) + len(hay), answer, meta)


def samples(tokenizer: Any, family: str, split: str, length: int, n: int, seed: int = 0) -> list[Sample]:
    return [make_sample(tokenizer, family, split, length, seed * 1000 + i) for i in range(n)]


# ---- metrics --------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def is_correct(generated: str, answer: str, distractors: Sequence[str] = ()) -> bool:
    """The answer (letters and digits only, case-insensitive) appears in the generated text and no
    distractor value does."""
    g = normalize(generated)
    return bool(answer) and normalize(answer) in g and not any(normalize(d) in g for d in distractors)


@torch.no_grad()
def run_sample(model: torch.nn.Module, tokenizer: Any, sample: Sample, cache: Any) -> dict[str, Any]:
    """Run one sample question-agnostically on ``cache`` (None = a fresh DynamicCache).

    Returns ``{"family", "correct"}`` for retrieval families (``followup``: turn 2; turn 1 in
    ``"turn1"``) and ``{"family", "nll", "tokens"}`` for ``lm``; ``kv_bytes`` the cache held at the end.
    """
    from transformers import DynamicCache

    from .tasks import cache_nbytes, continue_answer, prefill_context, sample_nll

    cache = DynamicCache(config=cast(Any, model).config) if cache is None else cache
    fam = sample.meta["family"]
    out: dict[str, Any] = {"family": fam, "seed": sample.meta["seed"]}
    if fam == "lm":
        nll, n = sample_nll(model, sample, cache)
        out.update(nll=nll, tokens=n)
    else:
        prefill_context(model, sample, cache)
        text, _ = continue_answer(model, tokenizer, sample, cache, max_new_tokens=MAX_NEW)
        out.update(answer=sample.answer, generated=text,
                   correct=is_correct(text, sample.answer, sample.meta.get("distractors", ())))
        turn = second_turn(tokenizer, sample, text)
        if turn is not None:
            more, extra = turn
            ids = torch.cat([sample.ids, torch.tensor([more], dtype=torch.long)], 1)
            text2, _ = continue_answer(model, tokenizer, dataclasses.replace(sample, ids=ids), cache,
                                       max_new_tokens=MAX_NEW)
            out.update(extra)
            score_second_turn(out, sample, text2)
    out["kv_bytes"] = cache_nbytes(cache)
    return out


def second_turn(tokenizer: Any, sample: Sample, generated: str) -> tuple[list[int], dict[str, Any]] | None:
    """What a two-turn family appends to ``sample.ids`` after the model's first answer ``generated`` (its
    tokens, then ``twohop``: the second hop with the model's own place name in it; ``followup``: the next
    question), with what to record; None for one-turn families. Shared by every runner of the suite."""
    fam = sample.meta["family"]
    first = _answer_tokens(tokenizer, generated)
    if fam == "twohop":
        place = re.split(r"[.,\n]", generated.strip(), maxsplit=1)[0].strip()
        place = re.sub(r"^the ", "", place, flags=re.IGNORECASE)
        sep = "" if generated.rstrip().endswith(".") else "."
        return first + _encode(tokenizer, sep + sample.meta["hop2"].format(p=place)), {"place": place}
    if fam == "followup":
        return first + list(sample.meta["followup"]), {}
    return None


def score_second_turn(row: dict[str, Any], sample: Sample, text2: str) -> None:
    """Score the second turn's answer into ``row`` (a ``followup`` row keeps turn 1 as ``turn1``)."""
    if sample.meta["family"] == "followup":
        row.update(turn1=row.pop("correct"), answer=sample.meta["answer2"], generated2=text2,
                   correct=is_correct(text2, sample.meta["answer2"]))
    else:
        row.update(generated2=text2, correct=is_correct(text2, sample.answer, sample.meta.get("distractors", ())))


def _answer_tokens(tokenizer: Any, text: str) -> list[int]:
    """Tokens of a generated answer up to its end of sequence (what the cache has seen of it: generate
    never feeds the last token, which is the end of sequence or gets fed with the next turn)."""
    ids = _encode(tokenizer, text)
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids[: ids.index(eos)] if eos in ids else ids


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per family: ``n`` and ``accuracy`` (retrieval) or ``ppl`` (lm, pooled over tokens)."""
    out: dict[str, Any] = {}
    for fam in FAMILIES:
        rs = [r for r in rows if r["family"] == fam]
        if not rs:
            continue
        if fam == "lm":
            tok = sum(r["tokens"] for r in rs)
            out[fam] = {"n": len(rs), "ppl": math.exp(sum(r["nll"] for r in rs) / tok), "nll_sum": sum(
                r["nll"] for r in rs), "tokens": tok}
        else:
            out[fam] = {"n": len(rs), "accuracy": sum(bool(r["correct"]) for r in rs) / len(rs)}
    accs = [v["accuracy"] for f, v in out.items() if f != "lm"]
    if accs:
        out["pooled"] = {"accuracy": sum(accs) / len(accs), "families": len(accs)}
    return out
