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

import functools
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


def gpu_us(fn, spin_cycles: int, before=None) -> tuple[float, float]:
    """(GPU µs, host µs) of one call of ``fn``: the GPU spins ``spin_cycles`` clocks first,
    which must outlast the host µs (returned so that callers can check it did). ``before``
    (untimed GPU work, e.g. writing the inputs) is enqueued between the spin and the start
    event; its host time counts in the host µs, since the spin must cover it too."""
    torch.cuda._sleep(spin_cycles)
    t0 = time.perf_counter()
    if before is not None:
        before()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    host = (time.perf_counter() - t0) * 1e6
    end.synchronize()
    return start.elapsed_time(end) * 1e3, host


@functools.cache
def spin_us(spin_cycles: int) -> float:
    """How long the GPU spins for ``spin_cycles`` clocks (µs), measured once per count."""
    return event_us(lambda: torch.cuda._sleep(spin_cycles))


def checked_gpu_us(fn, spin_cycles: int, before=None, attempts: int = 3) -> float:
    """:func:`gpu_us`, refusing a measurement in which the host took longer to enqueue
    ``before`` and launch the call than the GPU spent spinning: that one would include host
    time after all. Such a measurement is retried (a one-off host stall, e.g. the garbage
    collector, should not end a benchmark run); after ``attempts`` it raises."""
    for _ in range(attempts):
        t, host = gpu_us(fn, spin_cycles, before)
        if host <= 0.9 * spin_us(spin_cycles):
            return t
    raise RuntimeError(f"the host took {host:.0f} µs to launch the timed call, the GPU spun only "
                       f"{spin_us(spin_cycles):.0f} µs ({spin_cycles} cycles), {attempts} times in a row: "
                       "raise the caller's SPIN_CYCLES")
