"""Synthetic workloads: the DSA trace reaches the two overlap regimes it is tuned for."""

import pytest
import torch

from vllm_blackwell_sparse.bench.topk import exact_against_torch, markdown_table
from vllm_blackwell_sparse.reference import topk_reference
from vllm_blackwell_sparse.workloads import (
    DSA_TRACE_PRESETS,
    DsaTraceParams,
    dsa_decode_trace,
    make_paged_kv,
    topk_overlap,
)


def overlap_of(preset, n=32768, k=2048, rows=2):
    prev, cur = dsa_decode_trace(rows, n, 2, DsaTraceParams(query_drift=DSA_TRACE_PRESETS[preset]))
    lens = torch.full((rows,), n)
    return topk_overlap(topk_reference(prev, lens, k), topk_reference(cur, lens, k))


def test_middle_layer_preset_overlaps_35_to_50_percent():
    assert 0.35 <= overlap_of("middle_layers") <= 0.55


def test_first_layer_preset_overlaps_a_few_percent():
    assert overlap_of("first_layers") < 0.1


def test_trace_is_deterministic_and_fp32():
    a = next(dsa_decode_trace(2, 1000, 1, DsaTraceParams(seed=3)))
    b = next(dsa_decode_trace(2, 1000, 1, DsaTraceParams(seed=3)))
    assert a.dtype == torch.float32 and a.shape == (2, 1000) and torch.equal(a, b)
    assert bool((a >= 0).all())  # weighted sums of ReLUs


def test_topk_overlap():
    assert topk_overlap(torch.tensor([[1, 2, 3, -1]]), torch.tensor([[3, 2, 9, 8]])) == 0.5


def test_paged_kv_block_table_is_a_permutation():
    k, v, table = make_paged_kv([40, 17], 2, 8, 16, seed=1)
    used = table[0, :3].tolist() + table[1, :2].tolist()
    assert len(set(used)) == 5 and all(0 <= b < k.shape[0] for b in used)


def test_bench_exactness_check_catches_wrong_answers():
    x = torch.randn(3, 500)
    good = torch.topk(x, 16, dim=1).indices.int()
    assert exact_against_torch(x, good, 16)
    bad = good.clone()
    bad[1, 0] = torch.topk(x[1], 17).indices[16]  # the 17th instead of one of the top 16
    assert not exact_against_torch(x, bad, 16)
    dup = good.clone()
    dup[0, 1] = dup[0, 0]
    assert not exact_against_torch(x, dup, 16)


def test_markdown_table_layout():
    res = {"results": [
        {"kernel": "a", "batch": 1, "n": 16384, "overlap": 0.4, "exact": True, "us_hot": 10.0},
        {"kernel": "b", "batch": 1, "n": 16384, "overlap": 0.4, "exact": False, "us_hot": 12.5},
    ]}
    table = markdown_table(res, "hot")
    assert "| 1 | 16K | 40% | 10.0 | 12.5 (inexact) |" in table


def test_inexact_reason_names_the_failed_check():
    from vllm_blackwell_sparse.bench.topk import inexact_reason

    x = torch.arange(40, dtype=torch.float32).repeat(2, 1)
    good = torch.arange(24, 40, dtype=torch.int32).repeat(2, 1)
    assert inexact_reason(x, good, 16) is None
    assert "outside" in inexact_reason(x, torch.where(good == 30, -1, good), 16)
    dup = good.clone()
    dup[1, 0] = dup[1, 1]
    assert "duplicate" in inexact_reason(x, dup, 16)
    low = good.clone()
    low[0, 0] = 0
    assert inexact_reason(x, low, 16) == "1 rows whose value multiset differs from torch.topk's"


def test_calibrated_factor_reaches_the_target_sparsity_and_is_minimal():
    from vllm_blackwell_sparse.reference import blasst_attention_reference
    from vllm_blackwell_sparse.workloads import (
        CASE_TENSORS,
        PeakedAttentionParams,
        calibrate_threshold_factor,
        peaked_attention_case,
    )

    case = peaked_attention_case([4096, 3000], [1, 1], 8, 2, 64, 16, PeakedAttentionParams(peak=9.0, seed=3))
    args = [case[n] for n in CASE_TENSORS]
    for target in (0.5, 0.7):
        factor, res = calibrate_threshold_factor(case, target, kv_tile_size=128)
        assert factor is not None and res.sparsity >= target
        again = blasst_attention_reference(*args, threshold_scale_factor=factor, kv_tile_size=128)
        assert again.skipped_tiles == res.skipped_tiles, "the returned result is the oracle's at that factor"
        below = blasst_attention_reference(*args, threshold_scale_factor=factor * 0.999, kv_tile_size=128)
        assert below.sparsity < target, "a slightly smaller factor must miss the target"
    # Unreachable: every eligible tile skipped is impossible with noise this strong.
    flat = peaked_attention_case([2048], [1], 4, 1, 64, 16, PeakedAttentionParams(peak=0.0, heavy_hitters=0, seed=1))
    factor, res = calibrate_threshold_factor(flat, 1.0)
    assert factor is None and res.sparsity < 1.0


def test_head_major_cache_holds_the_same_values_in_head_major_pages():
    from vllm_blackwell_sparse.workloads import peaked_decode_batch, to_kv_layout

    nhd = peaked_decode_batch(2, 100, 8, 2, 64, 16, device="cpu")
    hnd = peaked_decode_batch(2, 100, 8, 2, 64, 16, device="cpu", layout="HND")
    for name in ("k_cache", "v_cache"):
        a, b = nhd[name], hnd[name]
        assert a.shape == b.shape == (2 * 7 + 1, 16, 2, 64)  # 7 pages per request and a spare
        assert torch.equal(a, b)
        assert a.is_contiguous() and b.stride() == (16 * 2 * 64, 64, 16 * 64, 1)  # head-major inside a page
    assert torch.equal(to_kv_layout(hnd["k_cache"], "NHD"), nhd["k_cache"])
    with pytest.raises(ValueError, match="layout must be one of"):
        to_kv_layout(nhd["k_cache"], "HDN")
    with pytest.raises(ValueError, match="layout must be one of"):
        peaked_decode_batch(1, 16, 8, 2, 64, 16, device="cpu", layout="nhd")


def test_calibrate_factors_bisects_the_kernel_counters_and_drops_unreached_targets():
    from vllm_blackwell_sparse.bench.decode import calibrate_factors

    counts = torch.zeros(2, 2, dtype=torch.int32)
    calls = []

    def run_counting(factor):  # a stand-in kernel: sparsity factor / (factor + 1000), 10000 eligible tiles
        calls.append(factor)
        counts.zero_()
        skipped = int(10000 * factor / (factor + 1000))
        counts[0] = torch.tensor([skipped // 2, 5000])
        counts[1] = torch.tensor([skipped - skipped // 2, 5000])

    found = calibrate_factors(run_counting, counts, [0.5, 0.95], hi=10000.0)
    assert list(found) == [0.5], "0.95 needs a factor of 19000, above hi"
    factor, sparsity = found[0.5]
    assert sparsity >= 0.5 and 1000 <= factor < 1000 * 1.01
    assert len(calls) == 2 * 14


def test_speedup_bar_is_the_issues():
    from vllm_blackwell_sparse.bench.decode import speedup_bar

    assert round(speedup_bar(0.73), 2) == 1.42 and round(speedup_bar(0.7), 3) == 1.385 and speedup_bar(0.0) == 0.9


def test_bench_timing_refuses_a_timing_that_includes_the_host_launch(monkeypatch):
    """checked_gpu_us (behind the decode and top-k benchmarks) keeps a time only when the
    GPU's spin outlasted the host's enqueueing of the inputs and the call."""
    from vllm_blackwell_sparse.bench import decode, timing

    monkeypatch.setattr(timing, "spin_us", lambda cycles: cycles / 2000)  # 2000 cycles per µs
    monkeypatch.setattr(timing, "gpu_us", lambda fn, cycles, before=None: (250.0, 400.0))  # (GPU µs, host µs)
    assert decode.gpu_call_us(lambda: None) == 250.0
    assert timing.checked_gpu_us(lambda: None, 2_000_000, before=lambda: None) == 250.0
    monkeypatch.setattr(timing, "gpu_us", lambda fn, cycles, before=None: (250.0, 950.0))
    with pytest.raises(RuntimeError, match="raise the caller's SPIN_CYCLES"):
        decode.gpu_call_us(lambda: None)
    assert timing.checked_gpu_us(lambda: None, 4_000_000) == 250.0  # a 2 ms spin covers it
    # One stalled launch is retried; only a persistent one is refused.
    hosts = iter([950.0, 400.0])
    monkeypatch.setattr(timing, "gpu_us", lambda fn, cycles, before=None: (260.0, next(hosts)))
    assert decode.gpu_call_us(lambda: None) == 260.0
