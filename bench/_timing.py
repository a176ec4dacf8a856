"""Wall-clock timing for the benchmarks (CUDA work is synchronised before and after)."""
import statistics
import time

import torch


def timed(fn, device) -> float:
    """Seconds one call of ``fn`` takes on ``device``."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_time(fn, reps: int, device) -> float:
    """Median of ``reps`` timed calls."""
    return statistics.median(timed(fn, device) for _ in range(reps))
