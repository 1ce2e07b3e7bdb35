"""Exact top-k oracle vs torch.topk, and the GVR emulation vs the oracle, as sets."""

import random

import pytest
import torch

from vllm_blackwell_sparse.reference import gvr_topk_emulation, ordered_keys, topk_reference
from vllm_blackwell_sparse.workloads import ADVERSARIAL_KINDS, adversarial_topk_row


def as_set(row):
    return {int(i) for i in row if int(i) >= 0}


def check_against_torch_topk(logits, lens, k, got):
    """Values multiset equal to torch.topk's; indices valid, unique, inside the row."""
    for r in range(logits.shape[0]):
        n = int(lens[r])
        idx = [int(i) for i in got[r] if int(i) >= 0]
        assert len(idx) == min(n, k) and len(set(idx)) == len(idx)
        assert all(0 <= i < n for i in idx)
        assert all(int(i) == -1 for i in got[r][len(idx):])  # valid entries first, then -1
        if n:
            want = torch.topk(logits[r, :n], min(n, k)).values
            have = logits[r, torch.tensor(idx, dtype=torch.long)]
            torch.testing.assert_close(torch.sort(have).values, torch.sort(want).values, equal_nan=True)


def test_ordered_keys_follow_the_documented_order():
    x = torch.tensor([float("-inf"), -3.0, -0.0, 0.0, 1e-30, 2.5, float("inf"), float("nan")])
    k = ordered_keys(x)
    assert k[2] == k[3]  # -0.0 == +0.0
    assert bool((k[1:] >= k[:-1]).all()) and k[0] < k[1] and k[-1] > k[-2]
    assert ordered_keys(torch.tensor([float("nan"), -float("nan")])).unique().numel() == 1
    with pytest.raises(TypeError):
        ordered_keys(torch.zeros(3, dtype=torch.float16))


@pytest.mark.parametrize("seed", range(12))
def test_reference_matches_torch_topk(seed):
    rng = random.Random(seed)
    k = rng.choice([4, 16, 64])
    n = rng.randint(1, 600)
    rows = rng.randint(1, 6)
    logits = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed))
    lens = torch.tensor([rng.randint(0, n) for _ in range(rows)])
    check_against_torch_topk(logits, lens, k, topk_reference(logits, lens, k))


def test_tie_rule_lower_index_wins():
    row = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
    got = topk_reference(row, torch.tensor([7]), 3)
    assert as_set(got[0]) == {1, 2, 3}
    got = gvr_topk_emulation(row, torch.tensor([7]), 3)
    assert as_set(got[0]) == {1, 2, 3}


def test_nan_ranks_above_inf_and_garbage_columns_are_never_read():
    row = torch.tensor([[0.0, float("nan"), float("inf"), 5.0, float("nan"), 7.0, 9.0, 9.0]])
    lens = torch.tensor([6])  # columns 6, 7 are garbage (larger than everything valid)
    assert as_set(topk_reference(row, lens, 3)[0]) == {1, 2, 4}
    assert as_set(gvr_topk_emulation(row, lens, 3)[0]) == {1, 2, 4}


def test_short_rows_return_all_columns_then_minus_one():
    logits = torch.randn(3, 50)
    lens = torch.tensor([0, 5, 50])
    for got in (topk_reference(logits, lens, 8), gvr_topk_emulation(logits, lens, 8)):
        assert got.dtype == torch.int32 and got.shape == (3, 8)
        assert got[0].tolist() == [-1] * 8
        assert as_set(got[1]) == set(range(5)) and got[1, 5:].tolist() == [-1] * 3
        assert len(as_set(got[2])) == 8


def test_seq_lens_shaped_like_vllms_b_by_next_n():
    logits = torch.randn(6, 100)
    lens2d = torch.tensor([[98, 99], [60, 61], [10, 11]])
    a = topk_reference(logits, lens2d, 16)
    b = topk_reference(logits, lens2d.flatten(), 16)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rows"):
        topk_reference(logits, torch.tensor([5, 6]), 16)


def gvr_equals_reference(logits, lens, k, hint=None, **kw):
    got, traces = gvr_topk_emulation(logits, lens, k, hint=hint, return_trace=True, **kw)
    want = topk_reference(logits, lens, k)
    for r in range(logits.shape[0]):
        assert as_set(got[r]) == as_set(want[r]), f"row {r}: {traces[r]}"
    return traces


@pytest.mark.parametrize("seed", range(6))
def test_gvr_exact_on_random_rows_with_every_kind_of_hint(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, n, k = 4, 6000, 256
    logits = torch.randn(rows, n, generator=gen)
    lens = torch.tensor([n, n - 17, 3000, 257])
    prev = topk_reference(logits + 0.3 * torch.randn(rows, n, generator=gen), lens, k)  # correlated, like decode
    garbage = torch.randint(-5, 2 * n, (rows, k), generator=gen)  # -1s, out-of-row and duplicate indices
    for hint in (None, prev, garbage, torch.full((rows, k), -1), topk_reference(logits, lens, k)):
        traces = gvr_equals_reference(logits, lens, k, hint=hint)
    assert traces[0].guess_source == "hint"


@pytest.mark.parametrize("kind", ADVERSARIAL_KINDS)
@pytest.mark.parametrize("with_hint", [False, True])
def test_gvr_exact_on_adversarial_rows(kind, with_hint):
    n, k = 5000, 512
    logits = torch.stack([adversarial_topk_row(kind, n, seed=s) for s in range(3)])
    lens = torch.tensor([n, 4000, 600])
    hint = torch.randint(0, n, (3, k), generator=torch.Generator().manual_seed(1)) if with_hint else None
    traces = gvr_equals_reference(logits, lens, k, hint=hint)
    if kind in ("constant", "few_values"):
        assert any(t.overflow for t in traces)  # tie blocks cannot be thresholded under the cap


def test_gvr_exact_with_a_tiny_pass_budget():
    logits = torch.randn(3, 4000)
    gvr_equals_reference(logits, torch.tensor([4000, 4000, 4000]), 300, max_count_passes=1)


def test_gvr_good_hint_needs_few_passes():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 32768, generator=gen)
    lens = torch.tensor([32768, 32768])
    exact_hint = topk_reference(logits, lens, 2048)
    traces = gvr_equals_reference(logits, lens, 2048, hint=exact_hint)
    assert all(t.count_passes == 1 and t.candidates == 2048 for t in traces)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="float32"):
        topk_reference(torch.zeros(2, 4, dtype=torch.float16), torch.tensor([4, 4]), 2)
    with pytest.raises(ValueError, match="k must be"):
        topk_reference(torch.zeros(2, 4), torch.tensor([4, 4]), 0)
    with pytest.raises(ValueError, match="hint"):
        gvr_topk_emulation(torch.zeros(2, 4), torch.tensor([4, 4]), 2, hint=torch.zeros(3, 2))
