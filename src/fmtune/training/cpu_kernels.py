"""One fused optimizer step for bf16 training on CPU, built on the machine with its C compiler and loaded with ctypes.

With bf16 compute weights and fp32 master weights (mixed_precision.Bf16Copy), torch needs four passes over memory per
step: cast the bf16 gradients to fp32, sum their squares for clipping, run fused AdamW, and cast the new fp32 weights
back to bf16. All four are memory-bound, and together they read and write ~44 bytes per parameter. `adamw_bf16` does
the AdamW update straight from the bf16 gradient and writes the bf16 copy in the same pass (~28 bytes per parameter);
the clipping norm is one more read of the bf16 gradients (2 bytes). Measured on a 2-core Xeon for 14M parameters:
16.9 ms for torch's four passes, 10.1 ms here. torch has no fused AdamW that takes bf16 gradients for fp32 weights or
writes a bf16 copy (Intel's extension did, and no longer follows torch releases).

The update is torch's AdamW formula (decoupled weight decay, lerp for the first moment, bias corrections, eps outside
the square root), in fp32 like torch's fused CPU kernel; results agree with it to fp32 rounding. The bf16 copy is
round-to-nearest-even, as torch's `.to(torch.bfloat16)`.

The library is compiled once per machine (~0.1 s) into fmtune's cache (FMTUNE_CACHE), keyed by a hash of the source, the
compiler and the CPU's flags (it is built with -march=native), written to a temporary name and renamed, so concurrent
runs never load a half-written file. Without a C compiler, or where building fails, `library()` returns None and
training uses torch's passes; the report's levers say which ran and why. Two threads share the work (ctypes releases
the GIL), each over half of the elements.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <stddef.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

/* sum of squares of `count` bf16 segments */
double sumsq_bf16(int64_t count, uint16_t **g, const int64_t *n) {
    double total = 0.0;
    for (int64_t t = 0; t < count; t++) {
        float acc[16] = {0};
        const uint16_t *x = g[t];
        int64_t i = 0, len = n[t];
        for (; i + 16 <= len; i += 16)
            for (int j = 0; j < 16; j++) { float f = bf16_to_float(x[i + j]); acc[j] += f * f; }
        for (; i < len; i++) { float f = bf16_to_float(x[i]); total += (double)f * f; }
        for (int j = 0; j < 16; j++) total += acc[j];
    }
    return total;
}

/* AdamW on `count` segments: fp32 param/moments updated in place from the bf16 gradient times `coef`, the new param
   written to the bf16 copy. Per segment: lr*weight_decay, lr/bias_correction1, sqrt(bias_correction2). */
void adamw_bf16(int64_t count, float **p, uint16_t **g, float **m, float **v, uint16_t **c, const int64_t *n,
                const float *lr_wd, const float *step_size, const float *bc2_sqrt,
                float beta1, float beta2, float eps, float coef) {
    const float w1 = 1.0f - beta1, w2 = 1.0f - beta2;
    for (int64_t t = 0; t < count; t++) {
        float *restrict pp = p[t], *restrict mm = m[t], *restrict vv = v[t];
        const uint16_t *restrict gg = g[t];
        uint16_t *restrict cc = c[t];
        const float decay = lr_wd[t], size = step_size[t], root = bc2_sqrt[t];
        const int64_t len = n[t];
        for (int64_t i = 0; i < len; i++) {
            float grad = bf16_to_float(gg[i]) * coef;
            float param = pp[i] - pp[i] * decay;
            float mi = mm[i] + w1 * (grad - mm[i]);
            float vi = beta2 * vv[i] + w2 * grad * grad;
            param -= size * mi / (sqrtf(vi) / root + eps);
            pp[i] = param; mm[i] = mi; vv[i] = vi; cc[i] = float_to_bf16(param);
        }
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC"]
COMPILE_TIMEOUT_S = 120


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


class _Library:
    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        ptrs, i64 = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)
        f32p, f32 = ctypes.POINTER(ctypes.c_float), ctypes.c_float
        lib.sumsq_bf16.restype = ctypes.c_double
        lib.sumsq_bf16.argtypes = [ctypes.c_int64, ptrs, i64]
        lib.adamw_bf16.restype = None
        lib.adamw_bf16.argtypes = [ctypes.c_int64, ptrs, ptrs, ptrs, ptrs, ptrs, i64, f32p, f32p, f32p, f32, f32, f32, f32]
        self.lib = lib
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fmtune-kernel")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[_Library | None, str]:
    if os.environ.get("FMTUNE_NO_KERNELS"):
        return None, "FMTUNE_NO_KERNELS is set"
    if platform.system() != "Linux" and platform.system() != "Darwin":
        return None, f"no kernel build on {platform.system()}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (cc, gcc or clang): torch's separate passes run instead"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{cc} --version failed: {exc}"
    key = hashlib.sha256("\n".join([SOURCE, cc, version, " ".join(FLAGS), _cpu_signature()]).encode()).hexdigest()[:16]
    from fmtune.data.quickstart import cache_dir

    folder = cache_dir() / "kernels"
    target = folder / f"adamw_bf16-{key}.so"
    if not target.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = Path(tmp) / "kernels.c"
                src.write_text(SOURCE, encoding="utf-8")
                built = Path(tmp) / target.name
                proc = subprocess.run([cc, *FLAGS, "-o", str(built), str(src)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
                if proc.returncode != 0:
                    return None, f"building the fused optimizer kernel with {cc} failed: {proc.stderr.strip()[-300:]}"
                os.replace(built, target)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"building the fused optimizer kernel failed: {exc}"
    try:
        return _Library(target), f"built with {Path(cc).name} into {target}"
    except OSError as exc:
        return None, f"loading {target} failed: {exc}"


def library() -> _Library | None:
    return _load()[0]


def status() -> str:
    """Why the kernel is or is not in use (for the report's levers)."""
    return _load()[1]


def _halves(sizes: list[int]) -> list[list[tuple[int, int, int]]]:
    """Split the concatenation of segments of `sizes` into two parts of equal element count: per part, a list of
    (segment index, start, end)."""
    total = sum(sizes)
    cut = total // 2
    parts: list[list[tuple[int, int, int]]] = [[], []]
    offset = 0
    for i, n in enumerate(sizes):
        start, end = offset, offset + n
        if end <= cut:
            parts[0].append((i, 0, n))
        elif start >= cut:
            parts[1].append((i, 0, n))
        else:
            parts[0].append((i, 0, cut - start))
            parts[1].append((i, cut - start, n))
        offset = end
    return parts


def _pointers(values) -> ctypes.Array:
    return (ctypes.c_void_p * len(values))(*values)


def _in_two_threads(sizes: list[int], run) -> list:
    """`run(part)` on each half of `_halves(sizes)`, the second in the kernel's worker thread; their results."""
    parts = _halves(sizes)
    other = library().pool.submit(run, parts[1])
    return [run(parts[0]), other.result()]


def sum_of_squares(grads: list) -> float:
    """Sum of squares of bf16 CPU tensors (contiguous), in two threads."""
    lib = library().lib

    def run(part):
        if not part:
            return 0.0
        ptrs = _pointers([grads[i].data_ptr() + 2 * a for i, a, _ in part])
        lens = (ctypes.c_int64 * len(part))(*[b - a for _, a, b in part])
        return lib.sumsq_bf16(len(part), ptrs, lens)

    return sum(_in_two_threads([g.numel() for g in grads], run))


def adamw_bf16(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, copies: list, lr_wd: list[float], step_size: list[float],
               bc2_sqrt: list[float], beta1: float, beta2: float, eps: float, coef: float) -> None:
    """The AdamW step on fp32 `params` (and their moments) from bf16 `grads` scaled by `coef`, writing the new values
    to the bf16 `copies`; the per-tensor lists give lr * weight_decay, lr / bias_correction1 and sqrt(bias_correction2)."""
    lib = library().lib

    def run(part):
        if not part:
            return
        k = len(part)
        seg = lambda ts, size: _pointers([ts[i].data_ptr() + size * a for i, a, _ in part])  # noqa: E731
        floats = lambda xs: (ctypes.c_float * k)(*[xs[i] for i, _, _ in part])  # noqa: E731
        lens = (ctypes.c_int64 * k)(*[b - a for _, a, b in part])
        lib.adamw_bf16(k, seg(params, 4), seg(grads, 2), seg(exp_avgs, 4), seg(exp_avg_sqs, 4), seg(copies, 2), lens,
                       floats(lr_wd), floats(step_size), floats(bc2_sqrt), beta1, beta2, eps, coef)

    _in_two_threads([p.numel() for p in params], run)
