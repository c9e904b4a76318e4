"""Fused float32/bfloat16 CPU kernels (cpu_ops.c), compiled on first use and called through ctypes.

The library is built once per source/compiler/CPU into ~/.cache/distinfer/kernels (a few seconds,
with the machine's C compiler and OpenMP; it shares torch's OpenMP runtime), so no torch headers or
build step at install time. Without a compiler, or with DISTINFER_CPU_KERNELS=0, `enabled_for`
is False and callers keep their plain-torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_ops.c")
_SOURCES = (_SOURCE, _SOURCE.with_name("cpu_ops_impl.h"))  # the .c includes the per-dtype bodies
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_LIBS = ["-lmvec", "-lm"]
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}  # element types the library is built for
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_bf16_gemv = False  # the build has the AVX512-BF16 small-batch linear
GEMV_MAX_ROWS = 4  # beyond this many rows torch's bfloat16 GEMM (AMX) is as fast

_i64, _f32, _ptr, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "di_rms_norm": (None, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32, _int]),
    "di_rope": (None, [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int]),
    "di_write_kv": (_int, [_ptr, _ptr, _i64, _i64, _i64, _ptr, _i64]),
    "di_silu_mul": (None, [_ptr, _ptr, _i64, _i64, _int]),
    "di_linear": (_int, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]),
    "di_paged_decode_attention": (_int, [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64,
                                         _i64, _i64, _f32, _int]),
    "di_paged_decode_attention_lse": (_int, [_ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64,
                                             _i64, _i64, _i64, _f32, _int]),
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build_key(cc: str) -> str:
    """Identifies a build: sources, flags, compiler version and the CPU (-march=native)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    parts = [*(src.read_text() for src in _SOURCES), " ".join(_FLAGS + _LIBS), version, _cpu_flags()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _build(cc: str) -> Path:
    """Compile into the cache (atomic rename, so concurrent processes never load a partial file)."""
    from distinfer.model.loader import cache_dir  # lazy: the loader imports the model, which imports us

    cache = cache_dir() / "kernels"
    target = cache / f"libdistinfer_cpu-{_build_key(cc)}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
        os.close(fd)
        cmd = [cc, *_FLAGS, str(_SOURCE), "-o", tmp, *_LIBS]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
        logger.info("built CPU kernels %s", target)
    return target


def load() -> ctypes.CDLL | None:
    """The kernel library, or None when disabled or it cannot be built (logged once)."""
    global _lib, _tried, _bf16_gemv
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("DISTINFER_CPU_KERNELS", "1") == "0":
            return None
        cc = _compiler()
        if cc is None:
            logger.warning("no C compiler found: using plain-torch CPU ops (slower)")
            return None
        try:
            torch.get_num_threads()  # torch's OpenMP runtime is loaded first; the library reuses it
            lib = ctypes.CDLL(str(_build(cc)))
        except (OSError, RuntimeError) as exc:
            logger.warning("CPU kernels unavailable, using plain-torch ops: %s", exc)
            return None
        for name, (restype, argtypes) in _SIGNATURES.items():
            for suffix in _SUFFIX.values():
                fn = getattr(lib, f"{name}_{suffix}", None)
                if fn is not None:
                    fn.restype, fn.argtypes = restype, argtypes
        _bf16_gemv = bool(lib.di_has_bf16_gemv())
        _lib = lib
    return _lib


def enabled_for(*tensors: torch.Tensor) -> bool:
    """True when the kernels are loaded and the tensors are all float32 or all bfloat16, on the CPU
    (called per op: kept lean)."""
    if _lib is None and (_tried or load() is None):
        return False
    dtype = tensors[0].dtype
    if dtype not in _SUFFIX:
        return False
    for t in tensors:
        if t.dtype is not dtype or not t.is_cpu:
            return False
    return True


def _kernel(name: str, dtype: torch.dtype):
    return getattr(_lib, f"{name}_{_SUFFIX[dtype]}")


def row_major(t: torch.Tensor) -> bool:
    """Rows may be strided, but each row's elements are contiguous."""
    expected = 1
    for dim in range(t.dim() - 1, 0, -1):
        if t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor:
    """norm(x) * weight; with `residual`, residual <- x + residual in place and the sum is normalized."""
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
    res_ptr = None
    if residual is not None:
        assert residual.is_contiguous() and residual.shape == x.shape
        res_ptr = residual.data_ptr()
    _kernel("di_rms_norm", x.dtype)(out.data_ptr(), x.data_ptr(), res_ptr, weight.data_ptr(), rows, hidden, eps,
                     torch.get_num_threads())
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place: x [T, H, D] (rows may be strided) <- x*cos + rotate_half(x)*sin; cos/sin [T, 1, D]."""
    t, h, d = x.shape
    assert row_major(x) and cos.is_contiguous() and sin.is_contiguous()
    _kernel("di_rope", x.dtype)(x.data_ptr(), t, h, d, x.stride(0), cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())
    return x


def write_kv(kv_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv [T, 2, Hkv, D] (rows may be strided) into the cache slots `slot_mapping` (int64)."""
    assert kv_cache.is_contiguous() and row_major(kv) and slot_mapping.dtype == torch.int64
    slot_mapping = slot_mapping.contiguous()
    num_slots = kv_cache.shape[0] * kv_cache.shape[1]
    if _kernel("di_write_kv", kv.dtype)(kv_cache.data_ptr(), kv.data_ptr(), kv.shape[0], kv.stride(0), kv[0].numel(),
                                        slot_mapping.data_ptr(), num_slots) != 0:
        raise IndexError(f"KV write: a slot in the slot mapping is outside the cache's {num_slots} slots")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:]."""
    x = x.contiguous()
    inter = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], inter)
    _kernel("di_silu_mul", x.dtype)(out.data_ptr(), x.data_ptr(), x.numel() // x.shape[-1], inter, torch.get_num_threads())
    return out


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (rows may be strided), block_tables [B, width] int64, seq_lens [B] int64 -> [B, Hq, D]."""
    b, hq, d = q.shape
    _, block_size, _, hkv, _ = kv_cache.shape
    assert row_major(q) and kv_cache.is_contiguous() and block_tables.is_contiguous()
    assert block_tables.dtype == seq_lens.dtype == torch.int64 and seq_lens.is_contiguous()
    out = q.new_empty(b, hq, d)
    status = _kernel("di_paged_decode_attention", q.dtype)(
        out.data_ptr(), q.data_ptr(), q.stride(0), kv_cache.data_ptr(), kv_cache.shape[0], block_tables.data_ptr(),
        block_tables.shape[1], seq_lens.data_ptr(), b, hq, hkv, d, block_size, scale, torch.get_num_threads())
    _check_decode_status(status)
    return out


def decode_lse_applies(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """paged_decode_attention_lse takes these inputs (else callers use the torch reference)."""
    return (enabled_for(q, kv_cache) and q.dim() == 3 and kv_cache.dim() == 5 and kv_cache.is_contiguous()
            and row_major(q) and q.shape[2] == kv_cache.shape[4] and q.shape[1] % kv_cache.shape[3] == 0)


def paged_decode_attention_lse(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As paged_decode_attention, seq_lens may be 0 -> (out [B, Hq, D] float32, lse [B, Hq] float32): lse the
    natural log-sum-exp of the scaled scores; a seq_len 0 row gives zeros and -inf."""
    b, hq, d = q.shape
    _, block_size, _, hkv, _ = kv_cache.shape
    assert decode_lse_applies(q, kv_cache) and block_tables.dim() == 2 and block_tables.shape[0] == b
    block_tables = block_tables.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    out = torch.empty(b, hq, d, dtype=torch.float32)
    lse = torch.empty(b, hq, dtype=torch.float32)
    if b == 0:
        return out, lse
    status = _kernel("di_paged_decode_attention_lse", q.dtype)(
        out.data_ptr(), lse.data_ptr(), q.data_ptr(), q.stride(0), kv_cache.data_ptr(), kv_cache.shape[0],
        block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(), b, hq, hkv, d, block_size, scale,
        torch.get_num_threads())
    _check_decode_status(status)
    return out, lse


def _check_decode_status(status: int) -> None:
    if status == -2:
        raise IndexError("paged decode attention: a context length or block id is outside the block tables/cache")
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its score buffer")


def small_batch_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bfloat16 x of at most GEMV_MAX_ROWS rows on a CPU with AVX512-BF16, where torch's own
    bfloat16 matmul streams the weights at a fraction of memory bandwidth."""
    return (x.dtype is torch.bfloat16 and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS
            and weight.shape[1] % 32 == 0 and weight.is_contiguous() and enabled_for(x, weight) and _bf16_gemv)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for `small_batch_linear_applies` inputs: float32 accumulation, one rounding."""
    x = x.contiguous()
    n, k = x.shape
    out = x.new_empty(n, weight.shape[0])
    status = _lib.di_linear_bf16(out.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                 None if bias is None else bias.data_ptr(), n, k, weight.shape[0],
                                 torch.get_num_threads())
    if status != 0:
        raise ValueError(f"bfloat16 linear kernel cannot take x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return out
