"""CPU lane: one layer's FP4 routed experts computed on the CPU straight from host RAM.

During decode (a few tokens), experts that are not resident on the GPU are computed here from the
host copy (pinned or memory-mapped; read in place, never copied) instead of being sent over PCIe.
The kernel is our own C (cpu_experts.c, next to this file), compiled on first use with the system
C compiler (`$CC`, else `cc`, else `gcc`) into a shared library cached under the homeseek cache
directory and called through ctypes, which releases the GIL for the call: the Python decode loop
keeps running on other threads meanwhile.

Paths: "avx512" (AVX-512 F+BW), "avx2" (AVX2+FMA), "scalar" (portable C); the default is the
best one this CPU has, and `isa=` forces one (tests run every path the machine supports). Each
is its own library file, named by the path and a hash of the source, the flags and the compiler,
so an edited source rebuilds. "avx512-emu" (explicit only) runs the avx512 path's loop structure
on plain C lanes, so a machine without AVX-512 can test its layout logic.

Numerical definition: `fp4_experts_cpu_ref` below (and kernels/fp4_experts.py's
`fp4_experts_ref`, which it equals). The kernel sums in a different order, so it matches to fp32
rounding, not bit for bit; rounding steps on `a` (the activation dtype, act-quant) can then
land on the other side of a tie for a few elements.

    lane = CpuExperts(threads=7)
    out = lane.run(x, route_w, records, swiglu_limit, act_quant, torch.bfloat16)

One call at a time per CpuExperts (the C side serialises concurrent calls on one instance).
This module imports only torch and its sibling kernel modules (never homeseek).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ._formats import FP4_GROUP, act_quant_ref, dequant_fp4

__all__ = [
    "ISAS",
    "CpuExperts",
    "available",
    "build_library",
    "cpu_features",
    "fp4_experts_cpu_ref",
]

SOURCE = Path(__file__).with_name("cpu_experts.c")
ABI_VERSION = 2  # hs_abi_version() of cpu_experts.c

# Path -> compiler flags. -ffp-contract=off: the scalar roundings must not be fused (the SIMD
# FMAs are explicit intrinsics); -std=c11 also stops GCC's default contraction.
_COMMON_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-Wall", "-Wextra", "-ffp-contract=off"]
_ISA_FLAGS: dict[str, list[str]] = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
    "avx512-emu": ["-DHS_EMULATE_AVX512", "-Wno-psabi"],
}
ISAS = ("avx512", "avx2", "scalar")  # best first; "avx512-emu" is for tests only
# /proc/cpuinfo flags each path needs
_ISA_NEEDS = {"avx512": ("avx512f", "avx512bw"), "avx2": ("avx2", "fma"), "scalar": ()}
_ACT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_RECORD_KEYS = ("w13_q", "w13_s", "w2_q", "w2_s")
_MAX_T = 64  # the C side's bound on tokens per call
_NO_KERNEL_HINT = "install a C compiler (e.g. gcc) or run with --cpu-lane off"


# ------------------------------------------------------------------------------------------------
# CPU features and the build
# ------------------------------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo on Linux (which lists only what the OS enabled),
    else torch's own capability probe, mapped onto the same names."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return {"avx512f", "avx512bw", "avx2", "fma"}
    if cap == "AVX2":
        return {"avx2", "fma"}
    return set()


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _supported_isas() -> list[str]:
    flags = _cpu_flags() if _x86() else set()
    return [isa for isa in ISAS if all(f in flags for f in _ISA_NEEDS[isa])]


def cpu_features() -> dict:
    """What this CPU offers the CPU lane: the relevant flags found, the paths it can run (best
    first), the path chosen by default, and the core counts."""
    flags = _cpu_flags() if _x86() else set()
    wanted = (
        "avx512f",
        "avx512bw",
        "avx512vbmi",
        "avx512_bf16",
        "avx512_fp16",
        "avx2",
        "fma",
        "f16c",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
    )
    paths = _supported_isas()
    return {
        "flags": [f for f in wanted if f in flags],
        "paths": paths,
        "isa": paths[0],
        "cores": os.cpu_count() or 1,
        "usable_cores": usable_cores(),
        "default_threads": default_threads(),
    }


def default_threads() -> int:
    """All usable cores but one (left to the Python decode loop and the GPU driver), at least 1."""
    return max(1, usable_cores() - 1)


def _default_cache_root() -> Path:
    """Where builds go unless the caller says otherwise (kernels do not read homeseek's
    environment: homeseek points `cache_root` at its cache directory, homeseek/cpu_lane.py)."""
    return Path(tempfile.gettempdir()) / "homeseek"


# The directory whose cpu_experts/ folder holds the built libraries, asked at each build.
cache_root: Callable[[], Path] = _default_cache_root


def _cache_dir() -> Path:
    return cache_root()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    return shutil.which("cc") or shutil.which("gcc")


def _flags(isa: str) -> list[str]:
    return _COMMON_FLAGS + _ISA_FLAGS[isa]


def _library_path(isa: str, cc: str) -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update("\0".join([cc, *_flags(isa)]).encode())
    return _cache_dir() / "cpu_experts" / f"cpu_experts-{isa}-{key.hexdigest()[:16]}.so"


def build_library(isa: str, *, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the library for one path (if not cached) and return its file; raises RuntimeError
    with the compiler's message. Works for any path on any x86 machine (compiling needs no
    AVX-512 CPU). extra_flags (e.g. "-Werror") give an uncached build into a temporary file."""
    if isa not in _ISA_FLAGS:
        raise ValueError(f"isa must be one of {sorted(_ISA_FLAGS)}, got {isa!r}")
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"CPU lane: no C compiler found (set CC, or {_NO_KERNEL_HINT})")
    target = _library_path(isa, cc)
    if not extra_flags and target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary file in the same directory, then rename: two processes building at
    # once each rename a complete library over the other's, never a half-written one.
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    cmd = [cc, *_flags(isa), *extra_flags, "-o", tmp, str(SOURCE), "-lm", "-pthread"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise RuntimeError(f"CPU lane: could not run the C compiler {cc!r}: {e}") from e
    if proc.returncode != 0 or (extra_flags and proc.stderr.strip()):
        os.unlink(tmp)
        raise RuntimeError(
            f"CPU lane: building the {isa} kernel failed ({' '.join(cmd)}):\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    if extra_flags:
        return Path(tmp)  # the caller's to delete
    os.replace(tmp, target)
    return target


_LIBS: dict[str, ctypes.CDLL] = {}
_LIBS_LOCK = threading.Lock()


def _load(isa: str) -> ctypes.CDLL:
    with _LIBS_LOCK:
        lib = _LIBS.get(isa)
        if lib is not None:
            return lib
        lib = ctypes.CDLL(str(build_library(isa)))  # CDLL: calls release the GIL
        if lib.hs_abi_version() != ABI_VERSION:
            raise RuntimeError(f"CPU lane: {isa} library has ABI {lib.hs_abi_version()}")
        vp, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.hs_path.restype = ctypes.c_char_p
        lib.hs_create.argtypes, lib.hs_create.restype = [i], vp
        lib.hs_threads.argtypes, lib.hs_threads.restype = [vp], i
        lib.hs_resize.argtypes, lib.hs_resize.restype = [vp, i], i
        lib.hs_set_spin_us.argtypes, lib.hs_set_spin_us.restype = [vp, i], None
        lib.hs_destroy.argtypes, lib.hs_destroy.restype = [vp], None
        lib.hs_run.argtypes = [vp, i, i, i, i, vp, vp, vp, vp, vp, vp, vp, vp, f, i, i, vp, vp]
        lib.hs_run.restype = i
        lib.hs_copy.argtypes, lib.hs_copy.restype = [vp, i, vp, vp, vp, i], i
        lib.hs_read_xor.argtypes, lib.hs_read_xor.restype = (
            [vp, vp, ctypes.c_size_t],
            ctypes.c_uint64,
        )
        _LIBS[isa] = lib
        return lib


def _resolve_isa(isa: str | None) -> str:
    supported = _supported_isas()
    if isa is None:
        return supported[0]
    if isa not in _ISA_FLAGS:
        raise ValueError(f"isa must be one of {sorted(_ISA_FLAGS)} or None, got {isa!r}")
    if isa in _ISA_NEEDS and isa not in supported:
        missing = [f for f in _ISA_NEEDS[isa] if f not in (_cpu_flags() if _x86() else set())]
        raise RuntimeError(
            f"CPU lane: this CPU cannot run the {isa} path (missing: {', '.join(missing)}); "
            f"paths here: {', '.join(supported)}"
        )
    return isa


def available(isa: str | None = None) -> tuple[bool, str]:
    """Whether the CPU lane's kernel can be built and loaded here for `isa` (None: the best path
    of this CPU), and why not. Never raises."""
    try:
        name = _resolve_isa(isa)
        _load(name)
    except Exception as e:  # noqa: BLE001 - the point is to report any failure as text
        return False, str(e)
    return True, f"{name} kernel ready"


# ------------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------------


def _check_u8(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: must be a CPU tensor (host RAM), got {t.device}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected uint8 (packed FP4 / E8M0 bytes), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (the kernel reads it in place)")


Record = dict[str, "torch.Tensor | list[torch.Tensor]"]


def _parts(rec: Record, k: str) -> list[torch.Tensor]:
    v = rec[k]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _pointers(rec: Record, n_i: int) -> tuple[int, ...]:
    """(w13_q, w13_s, w3_q, w3_s, w2_q, w2_s) addresses: the up rows inside w13, or the
    separate w3 part."""
    out = []
    for k in ("w13_q", "w13_s"):
        parts = _parts(rec, k)
        gate = parts[0]
        up = parts[1].data_ptr() if len(parts) == 2 else gate[n_i:].data_ptr()
        out.append((gate.data_ptr(), up))
    (q, qu), (s, su) = out
    return q, s, qu, su, _parts(rec, "w2_q")[0].data_ptr(), _parts(rec, "w2_s")[0].data_ptr()


def _record_dims(records: list[Record], d: int) -> int:
    """Check every record against model dim d; return the expert width I."""
    if not records:
        raise ValueError("records: at least one expert record is needed")
    first = records[0]
    if not isinstance(first, dict) or any(k not in first for k in _RECORD_KEYS):
        raise ValueError(f"records[0]: expected a dict with keys {list(_RECORD_KEYS)}")
    n_i = _parts(first, "w2_q")[0].shape[-1] * 2
    if n_i < FP4_GROUP or n_i % FP4_GROUP or d % FP4_GROUP:
        raise ValueError(f"D={d} and I={n_i} must be multiples of {FP4_GROUP}")
    shapes = {
        "w13_q": (2 * n_i, d // 2),
        "w13_s": (2 * n_i, d // FP4_GROUP),
        "w2_q": (d, n_i // 2),
        "w2_s": (d, n_i // FP4_GROUP),
    }
    for j, rec in enumerate(records):
        if not isinstance(rec, dict) or any(k not in rec for k in _RECORD_KEYS):
            raise ValueError(f"records[{j}]: expected a dict with keys {list(_RECORD_KEYS)}")
        for k in _RECORD_KEYS:
            parts = _parts(rec, k)
            if len(parts) == 1:
                _check_u8(f"records[{j}][{k!r}]", parts[0], shapes[k])
            elif len(parts) == 2 and k in ("w13_q", "w13_s"):  # w1 and w3 apart
                half = (shapes[k][0] // 2, shapes[k][1])
                for name, t in zip(("w1", "w3"), parts, strict=True):
                    _check_u8(f"records[{j}][{k!r}] ({name} part)", t, half)
            else:
                raise ValueError(
                    f"records[{j}][{k!r}]: a tensor, or (w13 only) a [w1, w3] pair of parts"
                )
    return n_i


def _check_call(
    x: torch.Tensor, route_w: torch.Tensor, records: list, act_dtype: torch.dtype
) -> tuple[int, int, int]:
    """Validate run()'s inputs; return (T, D, I)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError("x: expected a float tensor [T, D]")
    if x.device.type != "cpu":
        raise ValueError(f"x: must be a CPU tensor, got {x.device}")
    n_t, d = x.shape
    if not 1 <= n_t <= _MAX_T:
        raise ValueError(f"x: T={n_t} tokens; the CPU lane takes 1..{_MAX_T}")
    n_i = _record_dims(records, d)
    if not isinstance(route_w, torch.Tensor) or tuple(route_w.shape) != (n_t, len(records)):
        got = list(route_w.shape) if isinstance(route_w, torch.Tensor) else type(route_w)
        raise ValueError(f"route_w: expected shape [T, n] = [{n_t}, {len(records)}], got {got}")
    if route_w.device.type != "cpu" or not route_w.is_floating_point():
        raise ValueError("route_w: expected a float CPU tensor")
    if act_dtype not in _ACT_CODES:
        raise ValueError(f"act_dtype: expected one of {list(_ACT_CODES)}, got {act_dtype}")
    return n_t, d, n_i


class CpuExperts:
    """The CPU lane's kernel with its thread pool (threads - 1 workers plus the calling thread).

    threads: compute threads (default: all usable cores but one). isa: force a path ("avx512",
    "avx2", "scalar"; None = the best this CPU has). One call at a time per instance: concurrent
    run() calls on one instance are serialised by the C side's mutex.
    """

    def __init__(self, threads: int | None = None, isa: str | None = None) -> None:
        try:
            self.isa = _resolve_isa(isa)
            self._lib = _load(self.isa)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n(CPU lane unavailable: {_NO_KERNEL_HINT})") from e
        n = default_threads() if threads is None else int(threads)
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        ctx = self._lib.hs_create(n)
        if not ctx:
            raise RuntimeError("CPU lane: hs_create failed (out of memory)")
        self._ctx: int | None = ctx
        # copy()'s stores: non-temporal unless told otherwise (see `copy`)
        self.stream_copies = True
        # Stop the workers when the object goes away without close() (also at interpreter exit).
        self._finalizer = weakref.finalize(self, self._lib.hs_destroy, ctx)

    @property
    def threads(self) -> int:
        """Compute threads in use (the calling thread included)."""
        return int(self._lib.hs_threads(self._live()))

    @threads.setter
    def threads(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        self._lib.hs_resize(self._live(), int(n))

    def set_spin_us(self, us: int) -> None:
        """How long idle workers spin for the next call before they sleep (default 100 us)."""
        self._lib.hs_set_spin_us(self._live(), int(us))

    def _live(self) -> int:
        if self._ctx is None:
            raise RuntimeError("CpuExperts: used after close()")
        return self._ctx

    def close(self) -> None:
        """Stop the worker threads and free the workspace; the instance is unusable after."""
        if self._ctx is not None:
            self._finalizer()
            self._ctx = None

    def __enter__(self) -> CpuExperts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        x: torch.Tensor,
        route_w: torch.Tensor,
        records: list[Record],
        swiglu_limit: float,
        act_quant: bool,
        act_dtype: torch.dtype,
        out: torch.Tensor | None = None,
        *,
        a_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out [T, D] fp32 = sum over the n records (in order) of each expert's output for the T
        tokens of x [T, D], with route weights route_w [T, n] (0 = the token did not choose the
        expert). a_out [n, T, I] fp32 (optional, for tests) receives the activations a after
        their rounding to act_dtype and act-quant."""
        n_t, d, n_i = _check_call(x, route_w, records, act_dtype)
        n = len(records)
        xf = x.detach().float().contiguous()
        wf = route_w.detach().float().contiguous()
        if out is None:
            out = torch.empty(n_t, d, dtype=torch.float32)
        elif (
            not isinstance(out, torch.Tensor)
            or out.dtype != torch.float32
            or tuple(out.shape) != (n_t, d)
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            raise ValueError(f"out: expected a contiguous fp32 CPU tensor [{n_t}, {d}]")
        if a_out is not None and (
            a_out.dtype != torch.float32
            or tuple(a_out.shape) != (n, n_t, n_i)
            or a_out.device.type != "cpu"
            or not a_out.is_contiguous()
        ):
            raise ValueError(f"a_out: expected a contiguous fp32 CPU tensor [{n}, {n_t}, {n_i}]")
        arrays = [_pointers(r, n_i) for r in records]  # per record: w13_q, w13_s, w3_q, ...
        ptrs = [(ctypes.c_void_p * n)(*(a[i] for a in arrays)) for i in range(6)]
        rc = self._lib.hs_run(
            self._live(),
            n_t,
            d,
            n_i,
            n,
            xf.data_ptr(),
            wf.data_ptr(),
            *ptrs,
            float(swiglu_limit),
            int(bool(act_quant)),
            _ACT_CODES[act_dtype],
            out.data_ptr(),
            a_out.data_ptr() if a_out is not None else None,
        )
        if rc != 0:
            why = "out of memory for the workspace" if rc == -2 else "sizes rejected"
            raise RuntimeError(f"CPU lane: hs_run failed ({why}, rc={rc})")
        return out

    def copy(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], streaming: bool | None = None
    ) -> None:
        """dst.copy_(src) for each (dst, src) pair of contiguous CPU tensors of the same byte
        size, on the pool (the expert store reads records of the tier below with it).
        streaming: stores that bypass the caches (default `stream_copies`): for a destination
        this CPU does not read next, such as a host slot the GPU copies from."""
        n = len(pairs)
        for i, (dst, src) in enumerate(pairs):
            for name, t in (("dst", dst), ("src", src)):
                if t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"copy: pair {i} {name} must be a contiguous CPU tensor")
            if dst.nbytes != src.nbytes:
                raise ValueError(f"copy: pair {i}: {dst.nbytes} bytes from {src.nbytes}")
        if not n:
            return
        vp = ctypes.c_void_p * n
        dsts = vp(*(d.data_ptr() for d, _ in pairs))
        srcs = vp(*(s.data_ptr() for _, s in pairs))
        sizes = (ctypes.c_size_t * n)(*(d.nbytes for d, _ in pairs))
        stream = self.stream_copies if streaming is None else streaming
        if self._lib.hs_copy(self._live(), n, dsts, srcs, sizes, int(stream)) != 0:
            raise RuntimeError("CPU lane: hs_copy ran out of memory")

    def read_xor(self, buf: torch.Tensor) -> int:
        """Read a contiguous CPU tensor with the pool (XOR of its 8-byte words): the memory read
        bandwidth probe of tools/cpu_expert_bench.py."""
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("buf: expected a contiguous CPU tensor")
        nbytes = buf.numel() * buf.element_size()
        return int(self._lib.hs_read_xor(self._live(), buf.data_ptr(), nbytes))


# ------------------------------------------------------------------------------------------------
# Plain-torch twin
# ------------------------------------------------------------------------------------------------


def fp4_experts_cpu_ref(
    x: torch.Tensor,
    route_w: torch.Tensor,
    records: list[dict[str, torch.Tensor]],
    swiglu_limit: float,
    act_quant: bool,
    act_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    float64: bool = False,
    a_in: torch.Tensor | None = None,
    a_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The numerical definition of CpuExperts.run (same arguments), in plain torch:

        xq = act_quant_ref(x) if act_quant else x
        g = min(xq @ w1^T, limit); v = clamp(xq @ w3^T, -limit, limit)
        a = ((w * silu(g)) * v).to(act_dtype); a = act_quant_ref(a) if act_quant
        out = sum_j a_j @ w2_j^T                               (fp32 [T, D])

    This is kernels/fp4_experts.py's fp4_experts_ref with every token routed to every record.
    float64: matmuls and the elementwise math in float64; the rounding steps of the definition
    (to act_dtype, act-quant) stay. a_in [n, T, I]: use these activations for the down
    projection instead of computing them (tests check the two halves separately). a_out
    [n, T, I] receives the activations used."""
    dt = torch.float64 if float64 else torch.float32
    _check_call(x, route_w, records, act_dtype)
    xq = (act_quant_ref(x) if act_quant else x.float()).to(dt)
    acc = torch.zeros(x.shape[0], x.shape[1], dtype=dt)
    for j, rec in enumerate(records):
        n_i = rec["w2_q"].shape[1] * 2
        if a_in is None:
            h = xq @ dequant_fp4(rec["w13_q"], rec["w13_s"]).to(dt).t()  # [T, 2I]
            g = h[:, :n_i].clamp(max=swiglu_limit)
            v = h[:, n_i:].clamp(-swiglu_limit, swiglu_limit)
            a = (route_w[:, j].to(dt)[:, None] * F.silu(g) * v).to(act_dtype)
            a = act_quant_ref(a) if act_quant else a.float()
        else:
            a = a_in[j].float()
        if a_out is not None:
            a_out[j].copy_(a)
        acc += a.to(dt) @ dequant_fp4(rec["w2_q"], rec["w2_s"]).to(dt).t()
    result = acc.float()
    if out is not None:
        out.copy_(result)
        return out
    return result
