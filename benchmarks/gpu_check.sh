#!/usr/bin/env bash
# GPU check in one command (issue 10 item 6): the GPU tests, the decode-attention benchmark
# (int4 / int2 / fp8 / mixed vs torch SDPA fp16 at 4k / 32k / 128k) and the end-to-end decode
# benchmark, each under its own time limit so the whole run stays under 8 minutes on one H100/H200.
# Writes benchmarks/results/{decode_attention,e2e_decode}_<device>.json (device name in the JSON too)
# and benchmarks/results/gpu_tests_<device>.log.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with .venv installed
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; nothing to do" >&2
  exit 2
fi
DEV=$("$PY" -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")
OUT=benchmarks/results
mkdir -p "$OUT"
status=0
echo "== [1/3] GPU tests (limit 180 s) on $DEV"
timeout 180 "$PY" -m pytest -q -m gpu tests/test_codegen_gpu.py tests/test_cuda_graph.py tests/test_runtime.py \
  2>&1 | tee "$OUT/gpu_tests_$DEV.log" | tail -5 || status=1
echo "== [2/3] decode attention vs SDPA fp16 at 4k/32k/128k (limit 150 s)"
timeout 150 "$PY" benchmarks/decode_attention.py --contexts 4096 32768 131072 --batches 1 \
  --head-dims 128 --formats int4 int2 fp8 mixed --out "$OUT/decode_attention_$DEV.json" | tail -20 || status=1
echo "== [3/3] end-to-end decode, 4k prompt (limit 150 s)"
timeout 150 "$PY" benchmarks/e2e_decode.py --prompt-tokens 4064 --new-tokens 32 \
  --configs dynamic_cache_sdpa,full,int4,mixed_int4_int2_fp8 --out "$OUT/e2e_decode_$DEV.json" | tail -8 || status=1
echo "gpu_check: done (status $status); results in $OUT/*_$DEV.json"
exit $status
