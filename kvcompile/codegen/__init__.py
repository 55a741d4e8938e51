"""Code generation: fused Triton kernels for the plan's storage formats (the only package importing triton).

Kernels (each with a pure-torch twin in :mod:`.reference`, which tests compare against):

* :mod:`.quant_append` — quantize-on-append: flush residual groups into packed KIVI int8/4/2 storage;
* :mod:`.decode_quant` — decode attention over packed codes + fp residual (dequantized in registers);
* :mod:`.decode_compact` — decode attention over full, fp8 and compacted (evicted/windowed) storage;
* :mod:`.decode_mixed` — one launch per layer serving KV heads of different formats.

All decode kernels share :mod:`._common`: GQA-aware tiles (one program serves the G query heads of a
KV head), online softmax in the log2 domain, split-K partials merged by one reduce launch.
:mod:`.keys` / :mod:`.cache` specialize and store rendered sources (content-hashed), :mod:`.lower`
turns a plan into the runtime schedule (``codegen/schedule.py``, run by ``runtime/interpreter.py``),
:mod:`.bench` is ``kvcompile bench`` and :mod:`.aot` compiles every kernel for sm_90 without a GPU.
See README.md in this folder for the add-a-kernel checklist.
"""
