"""Quick start on the embedded SmolLM2-135M: optimize -> save -> load -> generate with the plan's cache.

Run: ``python examples/quickstart.py [OUT.kvplan]`` (CPU, about half a minute).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

import kvcompile
from kvcompile._compat import cache_kw
from kvcompile.models import load
from kvcompile.report import render_inspect

PROMPT = (
    "The pass key is 68301. Remember it. The grass is green. The sky is blue. The sun is bright.\n"
    "Question: What is the pass key? Answer with the number.\nThe pass key is"
)


def main(out: str = "out/quickstart.kvplan") -> int:
    torch.manual_seed(0)
    smol = load("smollm2-135m")
    plan = kvcompile.optimize(smol, target="h100", context=4096, progress=False)
    path = plan.save(out)
    plan = kvcompile.load(path)  # verifies schema and content hash
    print(render_inspect(plan))
    print(f"\nsaved and re-loaded {path} (hash {plan.content_hash[:12]})")

    if importlib.util.find_spec("kvcompile.runtime") is None:
        print("kvcompile.runtime is not installed: showing the plan only")
        return 0
    importlib.import_module("kvcompile.runtime")  # registers the runtime behind plan.make_cache

    tok, model = smol.tokenizer, smol.model
    ids = tok(PROMPT, return_tensors="pt")
    cache = plan.make_cache(model)
    with torch.no_grad():
        gen = model.generate(**ids, **cache_kw(cache), max_new_tokens=6, do_sample=False)
    answer = tok.decode(gen[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"generated with the plan's cache: {answer!r}")
    print(f"cache holds {cache.nbytes()} B for {cache.get_seq_length()} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
