"""CPU decode kernels: one C function per storage family, compiled once with the system C compiler.

The ``cpu`` backend of the runtime serves decode steps (one query token per row) with these kernels
instead of the stores' torch references, which dequantize the whole cache every step. Each kernel
reads the store's own tensors in place (no dequantized copy of the cache is ever made), one
(batch row, KV head) at a time, serving the ``G`` query heads of that KV head from one pass over its
bytes:

* :func:`decode_kivi` — KIVI codes (2/4/8 bits, keys per channel over token groups of ``group``,
  values per token over channel groups of ``v_group``) + an fp32 residual + the new token, with an
  optional ``pos`` row (compositions: -1 = empty slot) or a left-padding count ``lead``. Keys use
  ``s_t = sum_d code[t,d] * (q[d] * scale[g,d]) + sum_d q[d] * zero[g,d]``: the scaled query is
  formed once per token group, so a key costs one unpack and one dot per query head;
* :func:`decode_dense` — fp32 keys/values (the ``full`` and token-selection stores) with optional
  ``pos``/``lead`` validity.

Scores are exact float32 (two-pass softmax over a scratch row). The reference is
``codegen.reference.decode_quant`` / ``decode_compact`` / ``decode_full``; tests compare against it.

The source is compiled with ``cc -O3 -march=native`` into ``$KVCOMPILE_CACHE_DIR/cpu/<sha>.so`` (keyed by
source, flags and CPU model) and loaded with ctypes; :func:`available` says whether that worked (no C
compiler: the runtime's ``cpu`` backend refuses to start with a one-line error). Call overhead is a
few microseconds, and the GIL is released during the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-shared", "-fPIC", "-std=c11")  # fmt: skip

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

typedef _Float16 half;
#define NEG (-3.0e38f)
#define MAXG 64

/* validity of slot t of row b: pos (int32, -1 = empty) when given, else t >= lead[b] */
static inline int slot_ok(const int32_t* pos, long t, long lead) {
    return pos ? pos[t] >= 0 : t >= lead;
}

static inline float dot(const float* a, const float* b, int D) {
    float s0 = 0.f, s1 = 0.f;  /* two chains: half the FMA latency per row */
    int h = D / 2;
    for (int d = 0; d < h; d++) { s0 += a[d] * b[d]; s1 += a[h + d] * b[h + d]; }
    if (D & 1) s0 += a[D - 1] * b[D - 1];
    return s0 + s1;
}

/* planar unpack: c[p * row + i] = channel i * ppb + p of a packed row (contiguous, vectorizes) */
static inline __attribute__((always_inline)) void unpack(const uint8_t* r, float* c, int row, int bits) {
    int ppb = 8 / bits, mask = (1 << bits) - 1;
    for (int p = 0; p < ppb; p++)
        for (int i = 0; i < row; i++) c[p * row + i] = (float)((r[i] >> (bits * p)) & mask);
}

/* softmax over n scores per query head (s: [G][n]), in place; returns nothing, writes 1/sum to inv */
static void softmax_rows(float* s, int G, long n, float* inv) {
    for (int j = 0; j < G; j++) {
        float* r = s + (long)j * n;
        float m = NEG;
        for (long t = 0; t < n; t++) m = fmaxf(m, r[t]);
        float z = 0.f;
        for (long t = 0; t < n; t++) { float e = r[t] <= NEG ? 0.f : expf(r[t] - m); r[t] = e; z += e; }
        inv[j] = z > 0.f ? 1.f / z : 0.f;
    }
}

/* strides are in elements: sb (batch), sh (head); rows within a head are contiguous.
   Query/accumulator tiles are kept in the planar channel order of unpack(). */
static inline __attribute__((always_inline)) void kivi_body(
    int B, int H, int G, int D, const int bits, const int vbits, int group, int vgroup, long nq, long nr,
    float scale,
    const float* q,
    const uint8_t* kc, long kc_sb, long kc_sh, const half* ks, const half* kz, long ks_sb, long ks_sh,
    const uint8_t* vc, long vc_sb, long vc_sh, const half* vs, const half* vz, long vs_sb, long vs_sh,
    const float* kr, const float* vr, long r_sb, long r_sh,
    const float* kn, const float* vn,
    const int32_t* pos, long p_sb, long p_sh, const int64_t* lead,
    float* out)
{
    long n = nq + nr + 1;
    const int ppb = 8 / bits, vppb = 8 / vbits;
    int row = D / ppb, vrow_bytes = D / vppb, nvg = D / vgroup, vrow = vgroup / vppb;
    float* s = (float*)malloc(sizeof(float) * (size_t)G * n);
    float qs[MAXG][256], qp[MAXG][256], acc[MAXG][256], c[256], zf[256], zq[MAXG], inv[MAXG];
    for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) {
        const float* qh = q + ((long)b * H + h) * G * D;
        const int32_t* ph = pos ? pos + b * p_sb + h * p_sh : 0;
        long ld = lead ? lead[b] : 0;
        const uint8_t* kch = kc + b * kc_sb + h * kc_sh;
        const half* ksh = ks + b * ks_sb + h * ks_sh;
        const half* kzh = kz + b * ks_sb + h * ks_sh;
        for (int j = 0; j < G; j++)
            for (int p = 0; p < ppb; p++)
                for (int i = 0; i < row; i++) qp[j][p * row + i] = qh[j * D + i * ppb + p] * scale;
        for (long g0 = 0; g0 < nq; g0 += group) {
            const half* sg = ksh + (g0 / group) * D;
            const half* zg = kzh + (g0 / group) * D;
            for (int p = 0; p < ppb; p++)
                for (int i = 0; i < row; i++) c[p * row + i] = (float)sg[i * ppb + p];
            for (int d = 0; d < D; d++) zf[d] = (float)zg[d];
            for (int j = 0; j < G; j++) {
                for (int d = 0; d < D; d++) qs[j][d] = qp[j][d] * c[d];
                zq[j] = scale * dot(qh + j * D, zf, D);
            }
            for (long t = g0; t < g0 + group; t++) {
                if (!slot_ok(ph, t, ld)) { for (int j = 0; j < G; j++) s[j * n + t] = NEG; continue; }
                unpack(kch + t * row, c, row, bits);
                for (int j = 0; j < G; j++) s[j * n + t] = zq[j] + dot(c, qs[j], D);
            }
        }
        const float* krh = kr + b * r_sb + h * r_sh;
        const float* vrh = vr + b * r_sb + h * r_sh;
        for (long t = 0; t < nr; t++) {
            int ok = slot_ok(ph, nq + t, ld);
            for (int j = 0; j < G; j++) s[j * n + nq + t] = ok ? scale * dot(qh + j * D, krh + t * D, D) : NEG;
        }
        const float* knh = kn + ((long)b * H + h) * D;
        const float* vnh = vn + ((long)b * H + h) * D;
        for (int j = 0; j < G; j++) s[j * n + n - 1] = scale * dot(qh + j * D, knh, D);
        softmax_rows(s, G, n, inv);
        for (int j = 0; j < G; j++) memset(acc[j], 0, sizeof(float) * D);
        const uint8_t* vch = vc + b * vc_sb + h * vc_sh;
        const half* vsh = vs + b * vs_sb + h * vs_sh;
        const half* vzh = vz + b * vs_sb + h * vs_sh;
        for (long t = 0; t < nq; t++) {
            int any = 0;
            for (int j = 0; j < G; j++) any |= s[j * n + t] != 0.f;
            if (!any) continue;
            unpack(vch + t * vrow_bytes, c, vrow_bytes, vbits);
            for (int v = 0; v < nvg; v++) {  /* dequantize the row once (planar order) */
                float sc = (float)vsh[t * nvg + v], zz = (float)vzh[t * nvg + v];
                for (int p = 0; p < vppb; p++) {
                    float* cv = c + p * vrow_bytes + v * vrow;
                    for (int d = 0; d < vrow; d++) cv[d] = cv[d] * sc + zz;
                }
            }
            for (int j = 0; j < G; j++) {
                float pr = s[j * n + t];
                for (int d = 0; d < D; d++) acc[j][d] += pr * c[d];
            }
        }
        float* oh = out + ((long)b * H + h) * G * D;
        for (int j = 0; j < G; j++)  /* planar -> channel order */
            for (int p = 0; p < vppb; p++)
                for (int i = 0; i < vrow_bytes; i++) qs[j][i * vppb + p] = acc[j][p * vrow_bytes + i];
        for (long t = 0; t < nr + 1; t++) {
            const float* vt = t < nr ? vrh + t * D : vnh;
            for (int j = 0; j < G; j++) {
                float pr = s[j * n + nq + t];
                if (pr == 0.f) continue;
                for (int d = 0; d < D; d++) qs[j][d] += pr * vt[d];
            }
        }
        for (int j = 0; j < G; j++) for (int d = 0; d < D; d++) oh[j * D + d] = qs[j][d] * inv[j];
    }
    free(s);
}

#define KIVI_ARGS \
    int B, int H, int G, int D, int bits, int vbits, int group, int vgroup, long nq, long nr, float scale, \
    const float* q, \
    const uint8_t* kc, long kc_sb, long kc_sh, const half* ks, const half* kz, long ks_sb, long ks_sh, \
    const uint8_t* vc, long vc_sb, long vc_sh, const half* vs, const half* vz, long vs_sb, long vs_sh, \
    const float* kr, const float* vr, long r_sb, long r_sh, const float* kn, const float* vn, \
    const int32_t* pos, long p_sb, long p_sh, const int64_t* lead, float* out
#define KIVI_PASS(BITS, VBITS) B, H, G, D, BITS, VBITS, group, vgroup, nq, nr, scale, q, kc, kc_sb, kc_sh, ks, kz, \
    ks_sb, ks_sh, vc, vc_sb, vc_sh, vs, vz, vs_sb, vs_sh, kr, vr, r_sb, r_sh, kn, vn, pos, p_sb, p_sh, lead, out

#define KIVI_V(BITS) \
    if (vbits == 4) kivi_body(KIVI_PASS(BITS, 4)); \
    else if (vbits == 2) kivi_body(KIVI_PASS(BITS, 2)); \
    else kivi_body(KIVI_PASS(BITS, 8));

void kivi_decode(KIVI_ARGS) {
    if (bits == 4) { KIVI_V(4) }
    else if (bits == 2) { KIVI_V(2) }
    else { KIVI_V(8) }
}

/* fp32 keys/values [.., N, D] (+ the new token), validity from pos or lead; with fp8 != 0 the
   rows are float8 e4m3 codes decoded through lut[256] and scaled by ksc/vsc [B, H] */
static inline __attribute__((always_inline)) void dense_body(
    int B, int H, int G, int D, long N, float scale, const float* q,
    const void* k, const void* v, long sb, long sh, const float* kn, const float* vn,
    const int32_t* pos, long p_sb, long p_sh, const int64_t* lead,
    const float* lut, const float* ksc, const float* vsc, float* out, const int fp8)
{
    long n = N + 1;
    float* s = (float*)malloc(sizeof(float) * (size_t)G * n);
    float acc[MAXG][256], inv[MAXG], c[256];
    for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) {
        const float* qh = q + ((long)b * H + h) * G * D;
        const int32_t* ph = pos ? pos + b * p_sb + h * p_sh : 0;
        long ld = lead ? lead[b] : 0;
        float ks = fp8 ? ksc[b * H + h] : 1.f, vs = fp8 ? vsc[b * H + h] : 1.f;
        const float* kh = (const float*)k + b * sb + h * sh;
        const float* vh = (const float*)v + b * sb + h * sh;
        const uint8_t* k8 = (const uint8_t*)k + b * sb + h * sh;
        const uint8_t* v8 = (const uint8_t*)v + b * sb + h * sh;
        const float* knh = kn + ((long)b * H + h) * D;
        const float* vnh = vn + ((long)b * H + h) * D;
        for (long t = 0; t < N; t++) {
            int ok = slot_ok(ph, t, ld);
            const float* kt = kh + t * D;
            if (fp8 && ok) { for (int d = 0; d < D; d++) c[d] = lut[k8[t * D + d]]; kt = c; }
            for (int j = 0; j < G; j++) s[j * n + t] = ok ? scale * ks * dot(qh + j * D, kt, D) : NEG;
        }
        for (int j = 0; j < G; j++) s[j * n + N] = scale * dot(qh + j * D, knh, D);
        softmax_rows(s, G, n, inv);
        for (int j = 0; j < G; j++) memset(acc[j], 0, sizeof(float) * D);
        for (long t = 0; t < n; t++) {
            int any = 0;
            for (int j = 0; j < G; j++) any |= s[j * n + t] != 0.f;
            if (!any) continue;
            const float* vt = t < N ? vh + t * D : vnh;
            float w = t < N ? vs : 1.f;
            if (fp8 && t < N) { for (int d = 0; d < D; d++) c[d] = lut[v8[t * D + d]]; vt = c; }
            for (int j = 0; j < G; j++) {
                float p = s[j * n + t] * w;
                for (int d = 0; d < D; d++) acc[j][d] += p * vt[d];
            }
        }
        float* oh = out + ((long)b * H + h) * G * D;
        for (int j = 0; j < G; j++) for (int d = 0; d < D; d++) oh[j * D + d] = acc[j][d] * inv[j];
    }
    free(s);
}

void dense_decode(
    int B, int H, int G, int D, long N, float scale, const float* q,
    const float* k, const float* v, long sb, long sh, const float* kn, const float* vn,
    const int32_t* pos, long p_sb, long p_sh, const int64_t* lead, float* out)
{
    dense_body(B, H, G, D, N, scale, q, k, v, sb, sh, kn, vn, pos, p_sb, p_sh, lead, 0, 0, 0, out, 0);
}

void fp8_decode(
    int B, int H, int G, int D, long N, float scale, const float* q,
    const uint8_t* k, const uint8_t* v, long sb, long sh, const float* kn, const float* vn,
    const int64_t* lead, const float* lut, const float* ksc, const float* vsc, float* out)
{
    dense_body(B, H, G, D, N, scale, q, k, v, sb, sh, kn, vn, 0, 0, 0, lead, lut, ksc, vsc, out, 1);
}
"""

MAX_G, MAX_D = 64, 256  # the kernels' stack tiles
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("KVCOMPILE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvcompile")
    return Path(root) / "cpu"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) on PATH")
    tag = hashlib.sha256("\0".join([SOURCE, *FLAGS, cc, _cpu_model()]).encode()).hexdigest()[:20]
    so = _cache_dir() / f"decode_{tag}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, tmp_so = Path(tmp) / "decode.c", Path(tmp) / "decode.so"
            src.write_text(SOURCE)
            r = subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp_so), "-lm"], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-400:]}")
            os.replace(tmp_so, so)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(so))
    i, n, f, p = ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_void_p
    # ctypes' argtypes typing rejects lists of these classes; the runtime accepts them
    lib.kivi_decode.argtypes = [i] * 8 + [n, n, f, p] + [p, n, n, p, p, n, n] * 2 + [p, p, n, n, p, p, p, n, n, p, p]  # type: ignore[assignment]  # noqa: E501
    lib.dense_decode.argtypes = [i] * 4 + [n, f, p, p, p, n, n, p, p, p, n, n, p, p]  # type: ignore[assignment]
    lib.fp8_decode.argtypes = [i] * 4 + [n, f, p, p, p, n, n, p, p, p, p, p, p, p]  # type: ignore[assignment]
    for fn in (lib.kivi_decode, lib.dense_decode, lib.fp8_decode):
        fn.restype = None
    return lib


def library() -> ctypes.CDLL:
    """The compiled kernels (built on first use). Raises RuntimeError naming why they are unavailable."""
    global _LIB, _ERROR
    if _LIB is None and _ERROR is None:
        try:
            _LIB = _compile()
        except (OSError, RuntimeError) as e:
            _ERROR = str(e)
    if _LIB is None:
        raise RuntimeError(f"kvcompile cpu kernels unavailable: {_ERROR}")
    return _LIB


def available() -> bool:
    try:
        library()
    except RuntimeError:
        return False
    return True


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bh(t: torch.Tensor | None) -> tuple[int, int]:
    """(batch, head) strides of a [B, H, N, ...] tensor whose rows are contiguous."""
    if t is None:
        return 0, 0
    if t.stride(-1) != 1 or (t.dim() == 4 and t.stride(2) != t.shape[3]):
        raise ValueError(f"cpu kernels need row-contiguous tensors, got strides {t.stride()}")
    return t.stride(0), t.stride(1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (a capacity-buffer view), else a contiguous copy."""
    return t if t.stride(-1) == 1 and t.stride(2) == t.shape[3] else t.contiguous()


def _check(q: torch.Tensor, H: int, D: int) -> tuple[int, int, int]:
    if q.dtype != torch.float32 or q.device.type != "cpu":
        raise ValueError(f"cpu kernels take float32 CPU tensors, got q {q.dtype} on {q.device}")
    B, Hq, T, Dq = q.shape
    if T != 1 or Dq != D or Hq % H:
        raise ValueError(f"q {tuple(q.shape)}: one decode token, head_dim {D}, query heads a multiple of {H}")
    G = Hq // H
    if G > MAX_G or D > MAX_D:
        raise ValueError(f"cpu kernels serve at most {MAX_G} query heads per KV head and head_dim {MAX_D}")
    return B, G, Hq


def _lead_pos(pos, lead):
    pos = None if pos is None else pos.to(torch.int32)
    lead = None if lead is None or pos is not None else lead.to(torch.int64).contiguous()
    return pos, lead


def decode_kivi(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, k_new, v_new, *,
                bits, group, v_group, nq, scale, pos=None, lead=None, v_bits=None) -> torch.Tensor:  # fmt: skip
    """Decode attention over ``nq`` quantized slots, the residual ``k_res``/``v_res`` [B, H, Nr, D]
    and the new token ``k_new``/``v_new`` [B, H, 1, D]; q [B, H*G, 1, D] float32. Codes/scales may
    be capacity buffers longer than ``nq`` (only the first ``nq`` slots / ``nq // group`` key groups
    are read). ``pos`` [B, H, >= nq+Nr] int32 (-1 = empty slot) or ``lead`` [B] (left padding)
    marks invalid slots; ``v_bits`` (default ``bits``) the value codes' bits. Returns [B, H*G, 1, D] float32."""
    H, D = k_new.shape[1], k_new.shape[3]
    B, G, Hq = _check(q, H, D)
    v_bits = bits if v_bits is None else v_bits
    if D % v_group or v_group > MAX_D or v_group % (8 // v_bits):
        raise ValueError(f"v_group={v_group} must divide head_dim={D} and hold whole bytes of {v_bits}-bit codes")
    pos, lead = _lead_pos(pos, lead)
    q, k_new, v_new = q.contiguous(), k_new.float().contiguous(), v_new.float().contiguous()
    k_res, v_res = _rows(k_res.float()), _rows(v_res.float())
    if k_res.stride() != v_res.stride():
        v_res = v_res.contiguous()
        k_res = k_res.contiguous()
    out = torch.empty(B, Hq, 1, D, dtype=torch.float32)
    lib = library()
    lib.kivi_decode(
        B, H, G, D, bits, v_bits, group, v_group, nq, k_res.shape[2], scale,
        _p(q),
        _p(k_codes), *_bh(k_codes), _p(k_scale), _p(k_zero), *_bh(k_scale),
        _p(v_codes), *_bh(v_codes), _p(v_scale), _p(v_zero), *_bh(v_scale),
        _p(k_res), _p(v_res), *_bh(k_res),
        _p(k_new), _p(v_new),
        _p(pos), *(pos.stride()[:2] if pos is not None else (0, 0)), _p(lead),
        _p(out),
    )  # fmt: skip
    return out


def decode_dense(q, k, v, k_new, v_new, *, scale, pos=None, lead=None, n=None) -> torch.Tensor:
    """Decode attention over fp32 ``k``/``v`` [B, H, >= n, D] (first ``n`` slots) plus the new token;
    ``pos``/``lead`` validity as in :func:`decode_kivi`. Returns [B, H*G, 1, D] float32."""
    H, D = k_new.shape[1], k_new.shape[3]
    B, G, Hq = _check(q, H, D)
    n = k.shape[2] if n is None else n
    pos, lead = _lead_pos(pos, lead)
    k, v = _rows(k.float()), _rows(v.float())
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    q, k_new, v_new = q.contiguous(), k_new.float().contiguous(), v_new.float().contiguous()
    out = torch.empty(B, Hq, 1, D, dtype=torch.float32)
    library().dense_decode(
        B, H, G, D, n, scale, _p(q), _p(k), _p(v), *_bh(k), _p(k_new), _p(v_new),
        _p(pos), *(pos.stride()[:2] if pos is not None else (0, 0)), _p(lead), _p(out),
    )  # fmt: skip
    return out


_LUT: torch.Tensor | None = None


def decode_fp8(q, k8, v8, k_scale, v_scale, k_new, v_new, *, scale, lead=None) -> torch.Tensor:
    """Decode attention over float8 e4m3 ``k8``/``v8`` [B, H, N, D] (uint8 or float8 storage) with
    float32 scales [B, H] plus the new token; ``lead`` [B] masks left padding. Returns [B, H*G, 1, D]."""
    global _LUT
    if _LUT is None:
        _LUT = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
        _LUT = torch.nan_to_num(_LUT, nan=0.0)  # e4m3fn's two NaN codes never come out of a clamp
    H, D = k_new.shape[1], k_new.shape[3]
    B, G, Hq = _check(q, H, D)
    k8, v8 = _rows(k8.view(torch.uint8)), _rows(v8.view(torch.uint8))
    if k8.stride() != v8.stride():
        k8, v8 = k8.contiguous(), v8.contiguous()
    _, lead = _lead_pos(None, lead)
    q, k_new, v_new = q.contiguous(), k_new.float().contiguous(), v_new.float().contiguous()
    ks, vs = k_scale.float().contiguous(), v_scale.float().contiguous()
    out = torch.empty(B, Hq, 1, D, dtype=torch.float32)
    library().fp8_decode(
        B, H, G, D, k8.shape[2], scale, _p(q), _p(k8), _p(v8), *_bh(k8), _p(k_new), _p(v_new), _p(lead),
        _p(_LUT), _p(ks), _p(vs), _p(out),
    )  # fmt: skip
    return out
