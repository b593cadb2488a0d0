"""What the benchmarks share: a stage clock, a CPU latency measure and the process's memory figures."""
from __future__ import annotations

import contextlib
import time

import torch


@contextlib.contextmanager
def clock(times: dict[str, float], stage: str):
    """Add the wall time of the ``with`` block to ``times[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - start


def latency(module: torch.nn.Module, inputs: tuple, kwargs: dict, repeats: int = 5) -> float:
    """Median seconds of a forward pass (after one warm-up run), without autograd."""
    samples = []
    with torch.no_grad():
        module(*inputs, **kwargs)
        for _ in range(repeats):
            start = time.perf_counter()
            module(*inputs, **kwargs)
            samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def status_kib(field: str) -> int | None:
    """A figure of this process's /proc/self/status in KiB (VmRSS, VmHWM, VmSize...), None off Linux."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
