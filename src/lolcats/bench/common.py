"""Helpers shared by the benchmarks: timing, peak memory, out-of-memory handling, deadlines.

Every benchmark function returns a JSON-able dict ``{"config": {...}, "rows": [...], ...}`` and
reports each finished row to an optional ``on_row(section, row)`` callback (the CLI prints it and
rewrites the JSON file, so partial results survive a kill). Library code never prints.
"""
from __future__ import annotations

import gc
import math
import platform
import statistics
import time
from typing import Any, Callable

import torch

OnRow = Callable[[str, dict[str, Any]], None]

GIB = 1024**3
H200_BANDWIDTH = 4.3e12  # bytes/s reachable on an H200 (4.8 TB/s peak HBM3e)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or cuda when available, else cpu; an unavailable CUDA device is a ValueError."""
    from lolcats.validate import resolve_device as resolve

    return resolve(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 on CPU by default; names like 'bfloat16' accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated by PyTorch on `device` since the last reset (None on CPU)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def free_memory(device: torch.device | None = None) -> None:
    """Collect garbage and give cached CUDA blocks back (call after dropping the references)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    """Whether an exception means the device ran out of memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def timed_loop(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    """Seconds for n calls of fn, synchronised before and after (wall clock)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t0


def time_ms(fn: Callable[[], Any], device: torch.device, *, rep_ms: float = 200.0, cpu_reps: int = 3) -> float:
    """Median milliseconds of one call of fn.

    CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls) when Triton imports,
    else a CUDA-event loop. CPU: median of `cpu_reps` calls after one warm-up call.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
        for _ in range(3):
            fn()
        times = []
        for _ in range(max(5, int(rep_ms // 10))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(statistics.median(times))
    fn()
    times = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def past(deadline: float | None) -> bool:
    """Whether a `time.monotonic()` deadline has passed."""
    return deadline is not None and time.monotonic() >= deadline


def doubling(max_value: int, start: int = 1) -> list[int]:
    """start, 2 start, 4 start, ... <= max_value."""
    out, b = [], max(1, start)
    while b <= max_value:
        out.append(b)
        b *= 2
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the JSON `meta`."""
    import transformers

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(device),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "host": platform.node(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def token_clock():
    """A `generate(streamer=...)` that records the time of each chunk it is handed (the prompt
    first, then one token per step), for decode rates measured without the prefill."""
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return TokenClock()
