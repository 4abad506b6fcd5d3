"""This machine's physical ceilings, measured in-process in about a second.

A benchmark that prints raw milliseconds says little on a shared 2-core VM whose speed changes from
minute to minute; one that prints ``measured / roofline`` with the roofline measured *in the same run*
says how far a kernel is from what the hardware allows right now. The roofline of a kernel that does
``flops`` arithmetic and streams ``bytes`` from memory is ``max(flops / GEMM peak, bytes / bandwidth)``.

Measured here:

* **bandwidth**: a streaming read (``torch.sum``) over an array larger than the last-level cache
  (1 GiB by default), best of a few repeats;
* **GEMM peaks** for fp32, bf16 (AMX through oneDNN on CPUs that have it) and int8
  (``torch._int_mm``, AMX-INT8/VNNI) at a scoring-like shape: many candidate vectors × D × many query
  vectors, best of a few repeats.

Best-of (not median) because these are ceilings: a kernel timed by its median is then compared
against the most the machine delivered, which errs against the kernel, never for it.

Clocks: with one CPU thread every timing here (and in :mod:`metaembed.bench.scoring`) is the calling
thread's CPU time (``time.thread_time()``, clock ``"thread_cpu"``), which leaves out the time the thread
waited for a core: on a machine shared with other tenants, wall-clock ceilings fall 10–20× and move from
minute to minute, CPU-time ones stay near the hardware's. A bandwidth by CPU time is the bandwidth while
running (memory stalls count as CPU time; waits for a core do not). With more threads, or on CUDA, the
calling thread's CPU time does not cover the work, so the clock is ``"wall"`` (``time.perf_counter()``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from metaembed.errors import MetaEmbedError


class BenchError(MetaEmbedError, ValueError):
    """The bench room's root: a benchmark that cannot run as asked (too large for memory, bad sizes, unknown device)."""


class CeilingError(BenchError):
    """A ceiling that cannot be measured or looked up (unknown dtype, unusable device)."""


DTYPES = ("fp32", "bf16", "int8")
CLOCKS = ("wall", "thread_cpu")
"""``wall``: ``time.perf_counter()``; ``thread_cpu``: ``time.thread_time()``, the calling thread's CPU time."""
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise ``torch.float32``/"float32"/"fp32" (and bf16, int8, fp16) to a short name."""
    if isinstance(dtype, torch.dtype):
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8", torch.float16: "fp16"}
        if dtype not in names:
            raise CeilingError(f"no ceiling for dtype {dtype}; allowed: float32, bfloat16, float16, int8")
        return names[dtype]
    aliases = {
        "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32",
        "bf16": "bf16", "bfloat16": "bf16",
        "fp16": "fp16", "float16": "fp16", "half": "fp16",
        "int8": "int8", "i8": "int8",
    }  # fmt: skip
    key = str(dtype).lower()
    if key not in aliases:
        raise CeilingError(f"unknown dtype {dtype!r}; allowed: fp32, bf16, fp16, int8")
    return aliases[key]


def bytes_per_value(dtype: str | torch.dtype) -> int:
    """Bytes one stored value takes: fp32 4, bf16/fp16 2, int8 1."""
    return {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}[dtype_name(dtype)]


@dataclass(frozen=True)
class Ceilings:
    """Measured limits of one device: streaming read bandwidth and GEMM peaks per dtype."""

    device: str
    threads: int
    bandwidth_gbs: float
    """Streaming read bandwidth, GB/s (1e9 bytes per second)."""
    peak_gflops: dict[str, float] = field(default_factory=dict)
    """GEMM peak per dtype name ("fp32", "bf16", "int8"), GFLOP/s (int8: GOP/s)."""
    seconds: float = 0.0
    """How long the measurement took (wall clock)."""
    clock: str = "wall"
    """The clock the ceilings were timed by (one of :data:`CLOCKS`)."""

    def peak(self, dtype: str | torch.dtype) -> float:
        """GEMM peak in GFLOP/s for ``dtype``; fp16 has no fast path on CPU and uses the fp32 figure there."""
        name = dtype_name(dtype)
        if name == "fp16" and "fp16" not in self.peak_gflops:
            name = "fp32" if self.device == "cpu" else "bf16"
        if name not in self.peak_gflops:
            raise CeilingError(f"no {name} GEMM peak measured on {self.device}; measured: {sorted(self.peak_gflops)}")
        return self.peak_gflops[name]

    def roofline_ms(self, flops: float, nbytes: float, dtype: str | torch.dtype) -> float:
        """Lower bound on the time of a kernel: ``max(flops / peak(dtype), bytes / bandwidth)``, in ms."""
        compute = flops / (self.peak(dtype) * 1e9)
        memory = nbytes / (self.bandwidth_gbs * 1e9)
        return max(compute, memory) * 1e3

    def as_dict(self) -> dict:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_for(device: str | torch.device = "cpu", threads: int | None = None) -> str:
    """The clock that times work on ``device`` with ``threads`` (default ``torch.get_num_threads()``) honestly.

    ``thread_cpu`` where the calling thread does all the work (CPU, one thread), else ``wall``.
    """
    threads = torch.get_num_threads() if threads is None else threads
    return "thread_cpu" if torch.device(device).type == "cpu" and threads == 1 else "wall"


def _check_clock(clock: str, device: torch.device | None = None) -> None:
    if clock not in CLOCKS:
        raise BenchError(f"unknown clock {clock!r}; allowed: {', '.join(CLOCKS)}")
    if clock == "thread_cpu" and device is not None and device.type != "cpu":
        raise BenchError(f"clock thread_cpu cannot time work on {device} (the host thread waits); use wall")


def timed(fn: Callable[[], object], clock: str = "wall", device: torch.device | None = None) -> float:
    """Seconds one call of ``fn`` takes by ``clock`` (one of :data:`CLOCKS`); on CUDA, up to a synchronize."""
    _check_clock(clock, device)
    now = time.thread_time if clock == "thread_cpu" else time.perf_counter
    start = now()
    fn()
    if device is not None:
        _synchronize(device)
    return now() - start


def best_time(fn: Callable[[], object], device: torch.device, repeats: int, clock: str = "wall") -> float:
    """Fastest of ``repeats`` calls timed by ``clock`` after one warm-up call, in seconds."""
    _check_clock(clock, device)
    fn()
    _synchronize(device)
    return min(timed(fn, clock, device) for _ in range(repeats))


def measure_bandwidth(
    device: str | torch.device = "cpu", nbytes: int = 1 << 30, repeats: int = 4, clock: str = "wall"
) -> float:
    """Streaming read bandwidth in GB/s: ``torch.sum`` over an ``nbytes`` fp32 array, best of ``repeats``."""
    device = torch.device(device)
    data = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    seconds = best_time(lambda: data.sum(), device, repeats, clock)
    return data.numel() * 4 / seconds / 1e9


def measure_gemm_peak(
    dtype: str | torch.dtype,
    device: str | torch.device = "cpu",
    shape: tuple[int, int, int] = (8192, 1024, 1024),
    repeats: int = 3,
    clock: str = "wall",
) -> float:
    """GEMM throughput in GFLOP/s (int8: GOP/s) for an ``(m, k) @ (k, n)`` product, best of ``repeats``.

    The default shape is scoring-like: 8,192 candidate vectors × D = 1,024 × 1,024 query vectors.
    int8 uses ``torch._int_mm`` (int32 accumulation); raises CeilingError where it does not exist.
    """
    device = torch.device(device)
    name = dtype_name(dtype)
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    if name == "int8":
        if not hasattr(torch, "_int_mm"):
            raise CeilingError("this torch has no torch._int_mm: no int8 GEMM fast path")
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen).to(device)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen).to(device)
        out = torch.empty(m, n, dtype=torch.int32, device=device)

        def run() -> None:
            torch._int_mm(a, b, out=out)
    else:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=torch_dtype)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=torch_dtype)
        out = torch.empty(m, n, dtype=torch_dtype, device=device)

        def run() -> None:
            torch.matmul(a, b, out=out)

    try:
        seconds = best_time(run, device, repeats, clock)
    except (RuntimeError, NotImplementedError) as error:
        raise CeilingError(f"{name} GEMM does not run on {device}: {error}") from error
    return 2 * m * k * n / seconds / 1e9


def measure(
    device: str | torch.device = "cpu",
    dtypes: Sequence[str] = DTYPES,
    *,
    bandwidth_bytes: int = 1 << 30,
    gemm_shape: tuple[int, int, int] = (8192, 1024, 1024),
    repeats: int = 3,
    clock: str | None = None,
) -> Ceilings:
    """Measure bandwidth and the GEMM peak of each dtype on ``device`` (dtypes without a fast path are skipped).

    ``clock`` defaults to :func:`clock_for` the device and this process's thread count.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CeilingError("device cuda requested but torch.cuda.is_available() is False; use --device cpu")
    clock = clock_for(device) if clock is None else clock
    _check_clock(clock, device)
    start = time.perf_counter()
    bandwidth = measure_bandwidth(device, bandwidth_bytes, repeats + 1, clock)
    peaks: dict[str, float] = {}
    for name in dtypes:
        try:
            peaks[dtype_name(name)] = measure_gemm_peak(name, device, gemm_shape, repeats, clock)
        except CeilingError:
            if dtype_name(name) != "int8":
                raise
    return Ceilings(
        device=str(device),
        threads=torch.get_num_threads(),
        bandwidth_gbs=bandwidth,
        peak_gflops=peaks,
        seconds=time.perf_counter() - start,
        clock=clock,
    )


@functools.cache
def _cached(device: str, threads: int) -> Ceilings:
    return measure(device)


def ceilings(device: str | torch.device = "cpu") -> Ceilings:
    """This process's ceilings for ``device``, measured on first use and then reused (per thread count)."""
    return _cached(str(torch.device(device)), torch.get_num_threads())


def roofline_ms(flops: float, nbytes: float, dtype: str | torch.dtype, device: str | torch.device = "cpu") -> float:
    """``max(flops / GEMM peak(dtype), bytes / bandwidth)`` in ms, with ceilings measured in this process."""
    return ceilings(device).roofline_ms(flops, nbytes, dtype)
