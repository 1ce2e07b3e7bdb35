"""``vbs bench serve``'s accounting on CPU, against a fake engine: the steady decode
window, TPOT from it, bytes and bounds, the ratios and the table."""

import math
from types import SimpleNamespace

import torch

from vllm_blackwell_sparse.bench import serve


class FakeEngine:
    """Requests prefill two per step (their first token comes with it), then decode one
    token per step each; one step costs ``dt`` seconds of a fake clock."""

    def __init__(self, ids, max_tokens, dt, monkeypatch):
        self.ids, self.max_tokens, self.dt = list(ids), max_tokens, dt
        self.got = dict.fromkeys(ids, 0)
        self.step_no = 0
        self.now = 100.0
        monkeypatch.setattr(serve.time, "perf_counter", lambda: self.now)

    def has_unfinished_requests(self):
        return any(n < self.max_tokens for n in self.got.values())

    def step(self):
        started = self.ids[: 2 * (self.step_no + 1)]
        outs = []
        for rid in started:
            if self.got[rid] < self.max_tokens:
                self.got[rid] += 1
                done = self.got[rid] == self.max_tokens
                metrics = SimpleNamespace(queued_ts=0.5, first_token_ts=1.0, last_token_ts=1.0 + 0.001 * (self.max_tokens - 1),
                                          num_generation_tokens=self.max_tokens)
                outs.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=[7])], finished=done,
                                            metrics=metrics, num_cached_tokens=0))
        self.step_no += 1
        self.now += self.dt
        return outs


def test_tpot_comes_from_the_window_where_every_request_decodes(monkeypatch):
    ids = [f"r{i}" for i in range(8)]
    eng = FakeEngine(ids, max_tokens=40, dt=0.003, monkeypatch=monkeypatch)
    cell = serve._step_cell(eng, ids, 40, torch, profile=False)
    assert math.isclose(cell["tpot_ms"], 3.0, rel_tol=1e-9)
    assert math.isclose(cell["median_decode_step_ms"], 3.0, rel_tol=1e-9)
    # The last pair had its first token at step 3: the window is every later step up to
    # the one in which the first requests finish (step 39).
    assert cell["window_steps"] == 36 and cell["pure_decode_steps"] == 36
    assert cell["window_token_range"] == [(4 + 4 + 3 + 3 + 2 + 2 + 1 + 1) / 8, (40 + 40 + 39 + 39 + 38 + 38 + 37 + 37) / 8]
    assert cell["generated_tokens"] == 8 * 40 and cell["cached_prompt_tokens"] == 0
    assert math.isclose(cell["engine_tpot_median_ms"], 1.0) and math.isclose(cell["ttft_median_ms"], 500.0)


def test_bytes_bound_and_table():
    shape = {"layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64, "dtype_bytes": 2}
    cell = {"batch": 64, "tpot_ms": 2.0, "window_token_range": [0, 128], "sparsity": 0.4}
    b = serve._bytes(cell, shape, 7000)
    per_step = 64 * (7000 + 64) * 30 * 3 * 64 * 2 * 2
    assert math.isclose(b["kv_bytes_per_step_dense"], per_step)
    assert math.isclose(b["kv_bytes_per_step_read"], per_step * 0.8)
    assert math.isclose(b["byte_bound_speedup"], 1 / (0.5 + 0.5 * 0.6))
    assert math.isclose(b["kv_tb_s"], per_step * 0.8 / 2e-3 / 1e12)

    def engine(name, tpot, factor=None, eager=False, sparsity=None):
        c = {"batch": 8, "prompt_tokens": 4096, "tpot_ms": tpot, "ttft_median_ms": 50.0, "decode_tokens_per_s": 8 / tpot * 1e3,
             "kv_tb_s": 3.0, "byte_bound_speedup": 1.0, "kv_bytes_per_step_read": 1e9, "cached_prompt_tokens": 0,
             "profile": {}}
        if sparsity is not None:
            c.update(sparsity=sparsity, eligible_tiles=1000)
        return {"spec": {"name": name, "enforce_eager": eager, "factor": factor}, "cells": [c]}

    result = {"engines": [engine("stock FLASH_ATTN", 3.0), engine("CUSTOM dense", 2.5),
                          engine("CUSTOM BLASST control", 2.4, 1e9, sparsity=0.0),
                          engine("CUSTOM BLASST f512", 2.0, 512.0, sparsity=0.3),
                          engine("stock FLASH_ATTN (eager)", 30.0, eager=True),
                          engine("CUSTOM BLASST f512 (eager)", 25.0, 512.0, eager=True, sparsity=0.3),
                          {"spec": {"name": "broken"}, "error": "exit 1"}]}
    result["summary"] = serve.summarize(result)
    rows = {r["engine"]: r for r in result["summary"]["rows"]}
    assert math.isclose(rows["CUSTOM BLASST f512"]["speedup_vs_flash_attn"], 1.5)
    assert math.isclose(rows["CUSTOM BLASST f512"]["speedup_vs_control"], 1.2)
    assert math.isclose(rows["CUSTOM BLASST f512 (eager)"]["speedup_vs_flash_attn"], 30 / 25)  # eager against eager
    assert rows["CUSTOM BLASST f512 (eager)"]["speedup_vs_control"] is None
    table = serve.markdown(result)
    assert "| CUSTOM BLASST f512 | 8 × 4096 | 2.000 | 1.50× |" in table and "30.0% (1,000)" in table


def test_engine_env_passes_the_factor_outside_the_compile_hash(monkeypatch):
    monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "7")
    dense = serve.EngineSpec("CUSTOM dense", "CUSTOM", None, model="/m", cells=[[8, 4096]])
    blasst = serve.EngineSpec("CUSTOM BLASST f512", "CUSTOM", 512.0, model="/m", cells=[[8, 4096]])
    assert "VBS_DECODE_THRESHOLD_SCALE_FACTOR" not in serve.engine_env(dense)  # a stray setting never leaks in
    env = serve.engine_env(blasst)
    assert env["VBS_DECODE_THRESHOLD_SCALE_FACTOR"] == "512.0" and env["VBS_BLASST_STATS"] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    names = [s.name for s in serve.engine_specs("/m", [[8, 4096]], (64.0, 512.0), 128, eager_cell=(8, 4096))]
    assert names[:5] == ["stock FLASH_ATTN", "CUSTOM dense", "CUSTOM BLASST control", "CUSTOM BLASST f64",
                         "CUSTOM BLASST f512"]
    assert names[5:] == [n + " (eager)" for n in ("stock FLASH_ATTN", "CUSTOM dense", "CUSTOM BLASST f512")]


def test_stats_snapshots_never_overlap_a_graph_capture(monkeypatch):
    """The stats thread's copy waits while a CUDA graph is being captured (CPU: a fake graph class)."""
    from vllm_blackwell_sparse import blasst_stats

    class FakeGraph:
        def capture_begin(self, *a, **k):
            assert blasst_stats._REGISTRY.snapshot(wait_for_device=False) is None  # held off during the capture

        def capture_end(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setitem(blasst_stats._capture, "wrapped", False)
    blasst_stats._guard_graph_capture()
    g = FakeGraph()
    g.capture_begin()
    assert blasst_stats._capture["active"] == 1
    g.capture_end()
    assert blasst_stats._capture["active"] == 0
    assert blasst_stats._REGISTRY.snapshot(wait_for_device=False) == {"counters": [], "deltas": {}}
