"""CUDA-event timing shared by the benchmarks.

Two ways to time one call of a wrapper that launches GPU work:

* :func:`event_us` with an idle GPU: the start event fires at once, the kernels start only
  when the host has run the wrapper's Python and launched them, so the time includes that
  host time ("with launch"). This is what an eager caller waits for.
* :func:`gpu_us`: a spin kernel queued first keeps the GPU busy while the host enqueues the
  call, so the start event fires right before the call's first kernel and the events
  bracket only the GPU's work (its kernels and the gaps between them). This is what a
  CUDA-graph replay, the way vLLM runs decode, costs; the benchmarks compare kernels on it.
"""

import time

import torch


def event_us(fn) -> float:
    """µs of one call of ``fn``, between CUDA events around it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def gpu_us(fn, spin_cycles: int) -> tuple[float, float]:
    """(GPU µs, host µs) of one call of ``fn``: the GPU spins ``spin_cycles`` clocks first,
    which must outlast the host µs (returned so that callers can check it did)."""
    torch.cuda._sleep(spin_cycles)
    host = []

    def host_timed():
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)

    return event_us(host_timed), host[0]
