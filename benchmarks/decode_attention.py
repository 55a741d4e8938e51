"""Decode-attention benchmark per storage format (see ``kvcompile.codegen.bench``).

python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_cpu.json   # CPU
python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_h100.json  # GPU
"""

from __future__ import annotations

import sys

from kvcompile.codegen.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
