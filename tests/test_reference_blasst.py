"""The BLASST oracle against naive dense attention and against the rule's own consequences."""

import math
import random

import pytest
import torch

from vllm_blackwell_sparse.reference import (
    blasst_attention_reference,
    blasst_log_lambda,
    paged_attention_dense,
    split_tile_ranges,
)
from vllm_blackwell_sparse.workloads import CASE_TENSORS, PeakedAttentionParams, make_paged_kv, peaked_attention_case


def random_case(seed):
    """Fresh random varlen paged problem: GQA/MHA/MQA, decode and chunked-prefill rows."""
    rng = random.Random(seed)
    hkv = rng.choice([1, 2, 4])
    g = rng.choice([1, 2, 4, 8])
    d = rng.choice([16, 32, 64])
    bs = rng.choice([16, 32, 64])
    b = rng.randint(1, 4)
    seq_lens = [rng.randint(1, 700) for _ in range(b)]
    q_lens = [rng.choice([1, 1, 2, rng.randint(1, n)]) if n > 1 else 1 for n in seq_lens]
    q_lens = [min(q, n) for q, n in zip(q_lens, seq_lens)]
    k, v, table = make_paged_kv(seq_lens, hkv, d, bs, dtype=torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(sum(q_lens), hkv * g, d, generator=gen)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return dict(q=q, k_cache=k, v_cache=v, block_table=table, cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens)), rng


ARGS = CASE_TENSORS


def args_of(case):
    return [case[k] for k in ARGS]


@pytest.mark.parametrize("seed", range(25))
def test_factor_unset_equals_dense(seed):
    case, rng = random_case(seed)
    res = blasst_attention_reference(
        *args_of(case),
        kv_tile_size=rng.choice([16, 64, 128]),
        q_tile_rows=rng.choice([None, 1, 4, 64]),
        num_splits=rng.choice([1, 2, 3]),
        visit_order=rng.choice(["ascending", "descending"]),
    )
    torch.testing.assert_close(res.out, paged_attention_dense(*args_of(case)), rtol=1e-4, atol=1e-5)
    assert res.skipped_tiles == 0
    assert bool(torch.isnan(res.decisions.margin).all())


def test_non_causal_equals_dense():
    case, _ = random_case(3)
    res = blasst_attention_reference(*args_of(case), causal=False, kv_tile_size=32)
    torch.testing.assert_close(res.out, paged_attention_dense(*args_of(case), causal=False), rtol=1e-4, atol=1e-5)


def test_lse_matches_dense_logsumexp():
    case, _ = random_case(7)
    res = blasst_attention_reference(*args_of(case), kv_tile_size=64, num_splits=2)
    # Row 0 of request 0, head 0, directly.
    from vllm_blackwell_sparse.reference import gather_paged_kv

    n = int(case["seq_lens"][0])
    q_len = int(case["cu_seqlens_q"][1])
    keys = gather_paged_kv(case["k_cache"], case["block_table"][0], n)[: n - q_len + 1, 0]
    s = keys.float() @ case["q"][0, 0].float() / math.sqrt(case["q"].shape[-1])
    assert res.lse[0, 0].item() == pytest.approx(torch.logsumexp(s, 0).item(), rel=1e-5)


def test_lambda_at_least_one_never_skips():
    assert blasst_log_lambda(None, 100) is None
    assert blasst_log_lambda(100.0, 100) is None  # λ = 1
    assert blasst_log_lambda(500.0, 100) is None  # λ > 1
    assert blasst_log_lambda(1.0, 100) == pytest.approx(math.log(0.01))
    with pytest.raises(ValueError, match="threshold_scale_factor"):
        blasst_log_lambda(-1.0, 100)
    case = peaked_attention_case([300], [1], 4, 1, 32, 16)
    res = blasst_attention_reference(*args_of(case), threshold_scale_factor=300.0, kv_tile_size=16)
    assert res.skipped_tiles == 0 and res.eligible_tiles > 0 and res.per_request_lambda == [None]


def peaked(seed=0, peak=9.0, seq_lens=(4096, 3000), q_lens=(1, 1), g=4, hkv=2, d=64):
    return peaked_attention_case(list(seq_lens), list(q_lens), g * hkv, hkv, d, 16, PeakedAttentionParams(peak=peak, seed=seed))


def test_peaked_attention_skips_and_error_is_bounded():
    """A skipped key has p < λ relative to the running max, and the final normaliser is >= 1,
    so the dropped probability mass of a row is < (#skipped keys) · λ and the output error
    is at most 2 · dropped mass · max|v|."""
    case = peaked()
    dense = paged_attention_dense(*args_of(case))
    factor = 50.0
    res = blasst_attention_reference(*args_of(case), threshold_scale_factor=factor, kv_tile_size=128)
    assert res.sparsity > 0.5, res.sparsity
    vmax = case["v_cache"].float().abs().max().item()
    for b, n in enumerate(case["seq_lens"].tolist()):
        lam = factor / n
        sel = res.decisions.request == b
        skipped_keys = int(res.decisions.skipped[sel].sum()) * 128  # per KV head, upper bound
        bound = 2 * skipped_keys * lam * vmax
        tok = slice(int(case["cu_seqlens_q"][b]), int(case["cu_seqlens_q"][b + 1]))
        err = (res.out[tok] - dense[tok]).abs().max().item()
        assert err <= bound, (b, err, bound)


def test_decisions_are_monotone_in_the_factor():
    """Skipping never changes the running max (a skipped tile is below it), so a larger λ
    skips a superset of the tiles a smaller λ skips."""
    case = peaked(seed=1, peak=7.0)
    prev = None
    for factor in (0.5, 2.0, 10.0, 60.0, 400.0):
        res = blasst_attention_reference(*args_of(case), threshold_scale_factor=factor, kv_tile_size=64, num_splits=2)
        if prev is not None:
            assert bool((prev.decisions.skipped <= res.decisions.skipped).all())
        prev = res
    assert prev.skipped_tiles > 0


def test_group_decision_is_the_and_of_row_decisions():
    """Rows that vote together skip iff every row alone would skip (running maxima evolve the
    same whether or not tiles are skipped)."""
    case = peaked(seed=2, peak=8.0, q_lens=(3, 2), g=4)
    kw = dict(threshold_scale_factor=30.0, kv_tile_size=64)
    group = blasst_attention_reference(*args_of(case), **kw)  # all packed rows of a request vote together
    rows = blasst_attention_reference(*args_of(case), q_tile_rows=1, **kw)  # every row alone
    assert group.skipped_tiles > 0
    gd, rd = group.decisions, rows.decisions
    for i in range(len(gd)):
        # The same (request, KV head, tile) for every row of the group.
        sel = (rd.request == gd.request[i]) & (rd.kv_head == gd.kv_head[i]) & (rd.kv_tile == gd.kv_tile[i])
        assert bool(gd.skipped[i]) == bool(rd.skipped[sel].all())


def test_padding_rows_do_not_vote():
    """One request with G = 4 live rows in a 64-row tile decides exactly like a 4-row tile."""
    case = peaked(seed=3, q_lens=(1, 1), g=4)
    a = blasst_attention_reference(*args_of(case), threshold_scale_factor=40.0, q_tile_rows=64)
    b = blasst_attention_reference(*args_of(case), threshold_scale_factor=40.0, q_tile_rows=4)
    assert a.skipped_tiles > 0
    assert torch.equal(a.decisions.skipped, b.decisions.skipped)
    torch.testing.assert_close(a.out, b.out)


def test_split_tile_ranges():
    # Equal splits: ceil(n / S) tiles each, the tail clipped, empty ranges kept.
    assert split_tile_ranges(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert split_tile_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert split_tile_ranges(10, 3, 2, 1) == split_tile_ranges(10, 3)
    # 2 long splits of 3 units and 2 short: unit = ceil(20 / 8) = 3.
    assert split_tile_ranges(20, 4, 2, 3) == [(0, 9), (9, 18), (18, 20), (20, 20)]
    assert split_tile_ranges(2048, 66, 33, 6)[:2] == [(0, 54), (54, 108)]
    rng = random.Random()
    for _ in range(300):
        n, splits = rng.randint(0, 5000), rng.randint(1, 300)
        long, ratio = rng.randint(0, splits), rng.randint(1, 8)
        r = split_tile_ranges(n, splits, long, ratio)
        assert len(r) == splits and r[0][0] == 0 and r[-1][1] == n  # contiguous cover of [0, n)
        assert all(a1 == b0 for (_, a1), (b0, _) in zip(r, r[1:])) and all(t0 <= t1 for t0, t1 in r)
        sizes = [t1 - t0 for t0, t1 in r]
        unit = -(-n // (ratio * long + splits - long))
        assert all(sz <= (ratio * unit if s < long else unit) for s, sz in enumerate(sizes))
    for bad in [dict(num_splits=0), dict(num_splits=2, long_splits=3), dict(num_splits=2, long_splits=1, long_split_ratio=0)]:
        with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else "long_split"):
            split_tile_ranges(10, **bad)


@pytest.mark.parametrize("splits", [(1, 0, 1), (2, 0, 1), (5, 0, 1), (5, 2, 3), (3, 3, 2)])
@pytest.mark.parametrize("visit_order", ["ascending", "descending"])
def test_first_tile_of_every_split_is_never_eligible(splits, visit_order):
    num_splits, long_splits, ratio = splits
    case = peaked(seed=4, seq_lens=(2048, 1000))
    tile = 128
    res = blasst_attention_reference(
        *args_of(case), threshold_scale_factor=50.0, kv_tile_size=tile, num_splits=num_splits, visit_order=visit_order,
        long_splits=long_splits, long_split_ratio=ratio,
    )
    hkv = case["k_cache"].shape[2]
    ranges = {n: split_tile_ranges(-(-n // tile), num_splits, long_splits, ratio) for n in case["seq_lens"].tolist()}
    expected = sum((t1 - t0 - 1) * hkv for r in ranges.values() for t0, t1 in r if t0 < t1)
    assert res.eligible_tiles == expected
    assert res.skipped_tiles > 0
    # Every decision's tile lies in its split's range, and the first visited tile of a
    # split never appears among the decisions of that split.
    for req, n in enumerate(case["seq_lens"].tolist()):
        for s, (t0, t1) in enumerate(ranges[n]):
            sel = (res.decisions.split == s) & (res.decisions.request == req)
            tiles = res.decisions.kv_tile[sel]
            assert bool(((tiles >= t0) & (tiles < t1)).all())
            if t0 < t1:
                f = t0 if visit_order == "ascending" else t1 - 1
                assert not bool((tiles == f).any())


@pytest.mark.parametrize("visit_order", ["ascending", "descending"])
def test_decisions_and_margins_match_an_independent_recomputation(visit_order):
    """Recompute every decision from dense scores: running max over the tiles visited
    before, tile max, worst row of the group, compared with ln λ."""
    from vllm_blackwell_sparse.reference import gather_paged_kv

    case = peaked(seed=5, q_lens=(2, 1), g=4, hkv=2)
    factor, tile = 20.0, 128
    res = blasst_attention_reference(*args_of(case), threshold_scale_factor=factor, kv_tile_size=tile, visit_order=visit_order)
    d = case["q"].shape[-1]
    checked = 0
    for i in range(len(res.decisions)):
        b, h, n = (int(res.decisions.request[i]), int(res.decisions.kv_head[i]), int(res.decisions.kv_tile[i]))
        L = int(case["seq_lens"][b])
        q0, q1 = int(case["cu_seqlens_q"][b]), int(case["cu_seqlens_q"][b + 1])
        keys = gather_paged_kv(case["k_cache"], case["block_table"][b], L)[:, h].float()
        q = case["q"][q0:q1, h * 4:(h + 1) * 4].float().reshape(-1, d)  # rows t*G+g
        s = q @ keys.T / math.sqrt(d)
        tok = torch.arange(q1 - q0).repeat_interleave(4)
        s = s.masked_fill(torch.arange(L)[None] > (L - (q1 - q0) + tok)[:, None], float("-inf"))
        n_tiles = -(-int((L - (q1 - q0) + tok + 1).max()) // tile)
        order = list(range(n_tiles)) if visit_order == "ascending" else list(range(n_tiles - 1, -1, -1))
        before = order[: order.index(n)]
        cols = torch.cat([torch.arange(t * tile, min((t + 1) * tile, L)) for t in before])
        m_run = s[:, cols].amax(1)
        m_loc = s[:, n * tile:min((n + 1) * tile, L)].amax(1)
        diff = torch.where(m_loc == float("-inf"), torch.full_like(m_loc, float("-inf")), m_loc - m_run)
        worst = diff.max().item()
        log_lam = math.log(factor / L)
        assert bool(res.decisions.skipped[i]) == (worst < log_lam)
        assert res.decisions.margin[i].item() == pytest.approx(abs(worst - log_lam), abs=1e-4)
        checked += 1
    assert checked > 20 and res.skipped_tiles > 0 and res.skipped_tiles < checked
    assert res.num_ambiguous(float("inf")) == checked and res.num_ambiguous(0.0) == 0


def test_sparsity_grows_with_peakedness():
    sp = [
        blasst_attention_reference(*args_of(peaked(seed=6, peak=p)), threshold_scale_factor=20.0).sparsity
        for p in (0.0, 6.0, 10.0)
    ]
    assert sp[0] < sp[1] < sp[2], sp


def test_bad_arguments_are_named():
    case = peaked()
    with pytest.raises(ValueError, match="visit_order"):
        blasst_attention_reference(*args_of(case), visit_order="random")
    with pytest.raises(ValueError, match="num_splits"):
        blasst_attention_reference(*args_of(case), num_splits=0)
    with pytest.raises(ValueError, match="kv_tile_size"):
        blasst_attention_reference(*args_of(case), kv_tile_size=0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        blasst_attention_reference(case["q"][:, :3], *args_of(case)[1:])
