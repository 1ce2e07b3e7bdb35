"""The request-only split rule (CPU): the kernel's arithmetic (``SplitRule``), the oracle's
(``rule_tile_ranges``) and what it guarantees, a request's ranges and decisions that do
not depend on the rest of the batch; and the decode wrapper's argument checks that need
no GPU."""

import random

import pytest
import torch

from vllm_blackwell_sparse import workloads as wl
from vllm_blackwell_sparse.kernels import blasst_decode as bd
from vllm_blackwell_sparse.reference.blasst import (
    blasst_attention_reference,
    paged_attention_dense,
    rule_tile_ranges,
)

RULES = [bd.DEFAULT_SPLIT_RULE, bd.SplitRule(16, 64), bd.SplitRule(32, 256), bd.SplitRule(1, 3), bd.SplitRule(64, 1)]


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_kernel_rule_and_oracle_ranges_agree(rule):
    for kv_len in list(range(0, 300)) + [511, 512, 513, 8191, 8192, 8193, 131072, 131073, 262144]:
        total = -(-kv_len // bd.KV_TILE)
        ranges = rule_tile_ranges(kv_len, total, bd.KV_TILE, *rule)
        assert len(ranges) == rule.split_count(total) <= rule.target_splits
        length = rule.tiles_per_split(total)
        assert all(t1 - t0 <= length for t0, t1 in ranges)
        # The ranges partition [0, total) in order, only the last may be short.
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(t1 - t0 == length for t0, t1 in ranges[:-1])
        # A row group whose causal range ends earlier keeps the request's ranges, clipped.
        if total > 1:
            clipped = rule_tile_ranges(kv_len, total - 1, bd.KV_TILE, *rule)
            assert [(min(t0, total - 1), min(t1, total - 1)) for t0, t1 in ranges] == clipped


def test_grid_covers_every_request_up_to_the_longest():
    """The grid's split count, from the longest length the call may see, covers every
    shorter request, although a request's own count does not grow monotonically with its
    length (which is why the grid is not sized by the longest request's count)."""
    for rule in RULES:
        counts = [rule.split_count(t) for t in range(0, 20000)]
        running_max = 0
        for t, c in enumerate(counts):
            running_max = max(running_max, c)
            assert rule.max_split_count(t) == running_max, (rule, t)
    assert bd.SplitRule(16, 64).split_count(1024) == 64 > bd.SplitRule(16, 64).split_count(1025) == 61


def test_bad_rules_are_refused():
    for rule, fragment in [(bd.SplitRule(0, 64), "min_tiles"), (bd.SplitRule(32, 0), "target_splits"),
                           (bd.SplitRule(32, bd.MAX_SPLITS + 1), "target_splits"), (bd.SplitRule(2.5, 4), "min_tiles")]:
        with pytest.raises(ValueError, match=fragment):
            rule.check()
    with pytest.raises(ValueError, match="min_tiles >= 1"):
        rule_tile_ranges(100, 7, 16, 0, 4)


def _case(seq_lens, seed, next_n=1, hq=8, hkv=2, d=32, bs=16):
    return wl.peaked_attention_case(seq_lens, [next_n] * len(seq_lens), hq, hkv, d, bs,
                                    wl.PeakedAttentionParams(peak=8.0, seed=seed))


def _oracle(case, factor, rule, rows=bd.Q_TILE_ROWS):
    return blasst_attention_reference(*[case[n] for n in wl.CASE_TENSORS], threshold_scale_factor=factor,
                                      kv_tile_size=bd.KV_TILE, q_tile_rows=rows, visit_order="ascending",
                                      split_rule=tuple(rule))


def test_oracle_with_the_rule_equals_dense_when_unset():
    case = _case([5, 300, 1000], seed=random.randrange(1 << 30), next_n=2)
    ref = _oracle(case, None, bd.SplitRule(4, 8))
    dense = paged_attention_dense(*[case[n] for n in wl.CASE_TENSORS])
    assert (ref.out - dense).abs().max().item() < 1e-5
    assert ref.skipped_tiles == 0 and ref.eligible_tiles > 0


def test_a_requests_decisions_do_not_depend_on_its_neighbours():
    """Under the rule, request 0's decisions and output are the same alone and next to a
    much longer request (with a batch-dependent split count they would not be)."""
    seed = random.randrange(1 << 30)
    rule = bd.SplitRule(4, 8)
    batch = _case([700, 3000], seed)
    alone = {n: batch[n] for n in wl.CASE_TENSORS}
    alone.update(q=batch["q"][:1], block_table=batch["block_table"][:1], seq_lens=batch["seq_lens"][:1],
                 cu_seqlens_q=batch["cu_seqlens_q"][:2])
    r_batch, r_alone = _oracle(batch, 3.0, rule), _oracle(alone, 3.0, rule)
    mine = r_batch.decisions.request == 0
    assert torch.equal(r_batch.decisions.skipped[mine], r_alone.decisions.skipped)
    assert torch.equal(r_batch.decisions.kv_tile[mine], r_alone.decisions.kv_tile)
    assert torch.equal(r_batch.out[:1], r_alone.out)
    assert 0 < r_alone.skipped_tiles < r_alone.eligible_tiles


def _wrapper_args(seq_lens=(100, 200), next_n=1):
    case = _case(list(seq_lens), seed=0, next_n=next_n, hq=32, hkv=8, d=128)
    return [case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(next_n=2), r"next_n=2 query tokens for each of the 2 requests make 4"),
    (dict(num_splits=4, split_rule=bd.SplitRule(32, 64)), "either split_rule or an explicit num_splits"),
    (dict(split_rule=bd.SplitRule(0, 64)), "min_tiles"),
    (dict(max_seq_len=-1), "max_seq_len must be an integer"),
    (dict(threshold_scale_factor=float("inf")), "finite number > 0"),
])
def test_wrapper_refuses_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        bd.blasst_decode(*_wrapper_args(), softmax_scale=0.1, **kwargs)


def test_wrapper_refuses_tensors_off_the_gpu_and_misshapen_out():
    q, kc, vc, bt, sl = _wrapper_args()
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        bd.blasst_decode(q, kc, vc, bt, sl, softmax_scale=0.1)
    with pytest.raises(ValueError, match="out must be"):
        bd.blasst_decode(q, kc, vc, bt, sl, softmax_scale=0.1, out=torch.empty(q.shape[0], q.shape[1], 64))
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        bd.blasst_decode(q, kc, vc, bt, sl.long(), softmax_scale=0.1)
