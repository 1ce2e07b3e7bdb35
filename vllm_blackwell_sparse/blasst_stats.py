"""BLASST skip counters in serving (``VBS_BLASST_STATS=1``): vLLM glue.

Each attention layer that runs the BLASST kernel owns an int32 ``[rows, 2]`` tensor on
its GPU, allocated when the layer is built (before vLLM captures CUDA graphs, so every
captured launch adds into a fixed address). The kernel *adds* each request's (skipped,
eligible) tile counts into row ``request index``: the counters only grow, rows are
summed when read, nothing is reset on the hot path and nothing there waits for the GPU.

A daemon thread of the worker process copies the counters on a side stream every
``VBS_BLASST_STATS_INTERVAL`` seconds (the copy may land between two kernels' atomics:
a snapshot, not a barrier) and logs the interval's share of skipped tiles through
vLLM's logger, per phase, and per layer at DEBUG. The stream and the pinned host
buffers are made with the counters, on the main thread, so the thread allocates
nothing; and it never copies while a CUDA graph is being captured (vLLM captures in
CUDA's global mode, where another thread's CUDA calls can invalidate the capture):
``torch.cuda.CUDAGraph.capture_begin`` / ``capture_end`` are wrapped to wait for a copy
in progress and to hold the thread off until the capture ends. :func:`blasst_stats` returns the
totals since start-up, synchronously (tests, ``vbs bench serve`` with the engine in
process). Per-row int32 counters wrap after 2^32 tiles; totals are kept from wrapped
differences of consecutive snapshots, which is exact while a (layer, row) grows by less
than 2^32 between two snapshots (at 10 s, > 100x the H200's decode rate).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from vllm_blackwell_sparse.envs import env_bool, env_seconds
from vllm_blackwell_sparse.util import get_logger

logger = get_logger(__name__)

PHASES = ("decode",)  # prefill joins when its kernel exists
_WRAP = 1 << 32


def stats_enabled() -> bool:
    return env_bool("VBS_BLASST_STATS")


@dataclass
class _Counter:
    phase: str
    device_counts: torch.Tensor  # int32 [rows, 2], added to by the kernel
    host_counts: torch.Tensor  # pinned int32 [rows, 2], the snapshot's landing place
    layer: str = "?"  # the layer's name, set at its first forward
    last_rows: torch.Tensor | None = None  # int64 [rows, 2]: the last snapshot, as unsigned 32-bit values
    total: list[int] = field(default_factory=lambda: [0, 0])  # (skipped, eligible) since start-up


_capture = {"lock": threading.Lock(), "active": 0, "wrapped": False}


def _guard_graph_capture() -> None:
    """Wrap CUDAGraph.capture_begin / capture_end so that no snapshot overlaps a capture."""
    if _capture["wrapped"]:
        return
    graph_cls = torch.cuda.CUDAGraph
    begin, end = graph_cls.capture_begin, graph_cls.capture_end

    def capture_begin(self, *args, **kwargs):
        with _capture["lock"]:  # waits for a snapshot in progress
            _capture["active"] += 1
        try:
            return begin(self, *args, **kwargs)
        except BaseException:
            with _capture["lock"]:
                _capture["active"] -= 1
            raise

    def capture_end(self, *args, **kwargs):
        try:
            return end(self, *args, **kwargs)
        finally:
            with _capture["lock"]:
                _capture["active"] -= 1

    graph_cls.capture_begin, graph_cls.capture_end = capture_begin, capture_end
    _capture["wrapped"] = True


class _Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters: list[_Counter] = []
        self.thread: threading.Thread | None = None
        self.stream: dict[int, torch.cuda.Stream] = {}

    def add(self, phase: str, rows: int, device) -> _Counter:
        _guard_graph_capture()
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        counter = _Counter(phase, torch.zeros(rows, 2, dtype=torch.int32, device=dev),
                           torch.zeros(rows, 2, dtype=torch.int32, device="cpu", pin_memory=True))
        with self.lock:
            if dev.index not in self.stream:
                self.stream[dev.index] = torch.cuda.Stream(device=dev)
            self.counters.append(counter)
            if self.thread is None and env_seconds("VBS_BLASST_STATS_INTERVAL") > 0:
                self.thread = threading.Thread(target=self._log_forever, name="vbs-blasst-stats", daemon=True)
                self.thread.start()
        return counter

    def snapshot(self, *, wait_for_device: bool) -> dict | None:
        """Fold the counters' current values into the totals; returns the interval's
        deltas, or None while a CUDA graph is being captured (nothing read)."""
        with self.lock, _capture["lock"]:
            if _capture["active"]:
                return None
            counters = list(self.counters)
            if wait_for_device:
                for c in counters:
                    torch.cuda.synchronize(c.device_counts.device)
            deltas = {}
            for c in counters:
                side = self.stream[c.device_counts.device.index]
                with torch.cuda.stream(side):
                    c.host_counts.copy_(c.device_counts, non_blocking=True)
                side.synchronize()
                rows = c.host_counts.to(torch.int64) % _WRAP
                prev = c.last_rows if c.last_rows is not None else torch.zeros_like(rows)
                step = ((rows - prev) % _WRAP).sum(0).tolist()
                c.last_rows = rows
                c.total = [c.total[0] + step[0], c.total[1] + step[1]]
                deltas[id(c)] = step
            return {"counters": counters, "deltas": deltas}

    def _log_forever(self):
        interval = env_seconds("VBS_BLASST_STATS_INTERVAL")
        while True:
            time.sleep(interval)
            try:
                snap = self.snapshot(wait_for_device=False)
            except Exception as e:  # noqa: BLE001 - a stats thread must never take the worker down
                logger.warning("vllm-blackwell-sparse: reading the BLASST skip counters failed: %s", e)
                continue
            if snap is None:  # a CUDA graph is being captured: next time
                continue
            for phase in PHASES:
                mine = [c for c in snap["counters"] if c.phase == phase]
                skipped = sum(snap["deltas"][id(c)][0] for c in mine)
                eligible = sum(snap["deltas"][id(c)][1] for c in mine)
                if not eligible:
                    continue
                total_s, total_e = sum(c.total[0] for c in mine), sum(c.total[1] for c in mine)
                logger.info("BLASST %s: %.1f%% of %d eligible tiles skipped in the last %.0f s (%d layers; "
                            "%.1f%% since start)", phase, 100.0 * skipped / eligible, eligible, interval, len(mine),
                            100.0 * total_s / max(total_e, 1))
                for c in mine:
                    s, e = snap["deltas"][id(c)]
                    logger.debug("BLASST %s %s: %d / %d tiles skipped", phase, c.layer, s, e)


_REGISTRY = _Registry()


def new_counter(phase: str, rows: int, device) -> _Counter:
    """Counters for one layer (the kernel's ``skip_counts`` is ``counter.device_counts[:B]``)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return _REGISTRY.add(phase, rows, device)


def blasst_stats() -> dict:
    """Totals since start-up in this process, after waiting for the GPU:
    ``{phase: {"skipped", "eligible", "sparsity", "layers": {name: (skipped, eligible)}}}``."""
    snap = _REGISTRY.snapshot(wait_for_device=True)
    if snap is None:
        raise RuntimeError("blasst_stats() was called while a CUDA graph is being captured")
    out = {}
    for phase in PHASES:
        mine = [c for c in snap["counters"] if c.phase == phase]
        skipped, eligible = sum(c.total[0] for c in mine), sum(c.total[1] for c in mine)
        out[phase] = {"skipped": skipped, "eligible": eligible, "sparsity": skipped / eligible if eligible else 0.0,
                      "layers": {c.layer: tuple(c.total) for c in mine}}
    return out
