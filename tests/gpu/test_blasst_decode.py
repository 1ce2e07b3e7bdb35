"""BLASST decode kernel on the GPU against the torch oracle (reference/blasst.py).

Same tile size, row grouping, visit order and split count as the kernel, so every skip
decision is compared one by one: they must agree wherever the oracle's margin exceeds
1e-3 (the others are counted and reported). Fresh random inputs for every case.
"""

import math
import random

import pytest
import torch

from vllm_blackwell_sparse import workloads as wl
from vllm_blackwell_sparse.reference.blasst import AMBIGUOUS_MARGIN, blasst_attention_reference, paged_attention_dense

bd = pytest.importorskip("vllm_blackwell_sparse.kernels.blasst_decode")
DEV = "cuda"


def split_kwargs(splits, *, oracle=False):
    """``splits``: a ``bd.SplitRule`` (the request-only rule, the default path), a split
    count, or ``(num_splits, long_splits, long_split_ratio)``: the kernel's keyword
    arguments, or (``oracle``) the oracle's."""
    if isinstance(splits, bd.SplitRule):
        return {"split_rule": tuple(splits)} if oracle else {"split_rule": splits}
    n, long, ratio = splits if isinstance(splits, tuple) else (splits, 0, 1)
    return {"num_splits": n, "long_splits": long, "long_split_ratio": ratio}


def run_case(seq_lens, next_n, hq, hkv, d, bs, splits, factor, *, seed, peak=8.0, dtype=torch.bfloat16,
             k_stages=bd.DEFAULT_K_STAGES):
    case = wl.peaked_attention_case(
        seq_lens, [next_n] * len(seq_lens), hq, hkv, d, bs, wl.PeakedAttentionParams(peak=peak, seed=seed),
        dtype=dtype, device=DEV,
    )
    args = [case[n] for n in wl.CASE_TENSORS]
    ref = blasst_attention_reference(
        *args, threshold_scale_factor=factor, kv_tile_size=bd.KV_TILE, q_tile_rows=bd.Q_TILE_ROWS,
        visit_order="ascending", **split_kwargs(splits, oracle=True),
    )
    b = len(seq_lens)
    row_tiles = -(-next_n * (hq // hkv) // bd.Q_TILE_ROWS)
    decisions = torch.zeros(b, hkv * row_tiles, -(-max(seq_lens) // bd.KV_TILE), dtype=torch.int32, device=DEV)
    counts = torch.zeros(b, 2, dtype=torch.int32, device=DEV)
    out = bd.blasst_decode(
        case["q"], case["k_cache"], case["v_cache"], case["block_table"], case["seq_lens"],
        softmax_scale=1 / math.sqrt(d), threshold_scale_factor=factor, **split_kwargs(splits),
        skip_counts=counts, decisions=decisions, k_stages=k_stages,
    )
    return case, args, ref, out, decisions, counts, row_tiles


def check_against_oracle(seq_lens, next_n, hq, hkv, d, bs, splits, factor, *, seed, dtype=torch.bfloat16,
                         k_stages=bd.DEFAULT_K_STAGES):
    case, args, ref, out, decisions, counts, row_tiles = run_case(
        seq_lens, next_n, hq, hkv, d, bs, splits, factor, seed=seed, dtype=dtype, k_stages=k_stages
    )
    # Output: the oracle is fp32; the kernel rounds P to 16 bits before P.V and writes 16-bit output.
    scale = max(1.0, ref.out.abs().max().item())
    err = (out.float() - ref.out).abs().max().item()
    assert err <= 2e-2 * scale, f"max abs error {err} vs oracle"
    ambiguous = 0
    if factor is not None and len(ref.decisions):
        dd = ref.decisions
        got = decisions[dd.request, dd.kv_head * row_tiles + dd.q_tile, dd.kv_tile]
        assert bool((got != 0).all()), "an eligible tile was not visited by the kernel"
        sure = ~(dd.margin <= AMBIGUOUS_MARGIN)
        wrong = ((got == 2) != dd.skipped) & sure
        assert not bool(wrong.any()), f"{int(wrong.sum())} skip decisions differ from the oracle"
        ambiguous = int((~sure).sum())
        skipped, eligible = counts.sum(0).tolist()
        assert eligible == ref.eligible_tiles
        assert abs(skipped - ref.skipped_tiles) <= ambiguous
    else:
        assert int(counts.abs().sum()) == 0
    return ref, ambiguous


CASES = [
    # seq_lens, next_n, Hq, Hkv, D, block, splits (or (splits, long splits, ratio)), factor
    ([1, 17, 300, 1000], 1, 32, 8, 128, 16, 1, None),
    ([1, 17, 300, 1000], 1, 32, 8, 128, 16, 3, None),
    ([33, 700, 2049], 1, 64, 8, 128, 64, 4, None),
    ([33, 700, 2049], 1, 32, 8, 64, 16, 2, None),
    ([5, 700, 1500], 2, 32, 8, 128, 16, 3, None),
    ([5, 700, 1500], 3, 64, 8, 128, 32, 2, None),
    ([2000, 3000], 1, 32, 8, 128, 16, 1, 3.0),
    ([2000, 3000], 2, 64, 8, 128, 16, 1, 30.0),
    ([300, 1000, 2000], 1, 32, 8, 128, 16, 3, 5.0),
    ([300, 1000, 2000], 1, 64, 8, 128, 64, 2, 20.0),
    ([300, 1000, 2000], 3, 64, 8, 64, 16, 3, 50.0),
    ([3000], 1, 8, 8, 128, 16, 1, 1.0),
    ([300, 1000, 2000], 1, 32, 4, 128, 128, 5, 0.5),
    ([1000, 2000], 1, 32, 8, 128, 16, 2, 1e5),  # λ >= 1 for every request: nothing skipped
    # long-then-short splits: some short ones empty (the 33-key request), all long, ratio 1
    ([33, 1500, 3000], 1, 32, 8, 128, 16, (9, 4, 4), 5.0),
    ([700, 3000], 2, 64, 8, 64, 64, (6, 6, 3), 20.0),
    ([700, 3000], 1, 32, 8, 128, 16, (5, 2, 1), None),
    # the request-only rule (the default path): the default, splits of 2-4 tiles, one split
    ([33, 1500, 3000], 1, 32, 8, 128, 16, bd.DEFAULT_SPLIT_RULE, 5.0),
    ([5, 700, 3000], 2, 64, 8, 64, 64, bd.SplitRule(2, 64), 20.0),
    ([300, 1000, 2000], 3, 32, 8, 128, 16, bd.SplitRule(4, 3), None),
    ([3000, 17], 1, 9, 3, 64, 128, bd.SplitRule(1024, 64), 8.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-n{c[1]}-{c[2]}/{c[3]}-d{c[4]}-bs{c[5]}-S{c[6]}-f{c[7]}")
def test_matches_oracle(case):
    ref, _ = check_against_oracle(*case, seed=random.randrange(1 << 30))
    if case[7] == 1e5:
        assert ref.skipped_tiles == 0 and ref.eligible_tiles > 0


def test_skipping_happens_and_is_bounded():
    """Guards the test itself: the peaked cases do reach substantial sparsity."""
    ref, _ = check_against_oracle([2000, 3000], 1, 32, 8, 128, 16, 1, 3.0, seed=random.randrange(1 << 30))
    assert 0.3 < ref.sparsity < 1.0


def test_fuzz_every_supported_shape():
    rng = random.Random()
    total_amb = 0
    for _ in range(24):
        d = rng.choice([64, 128])
        hkv = rng.choice([1, 2, 8])
        group = rng.choice([1, 4, 8, 16])
        next_n = rng.choice([1, 1, 2, 4])
        bs = rng.choice([16, 32, 64, 128])
        lens = [rng.randint(next_n, 2500) for _ in range(rng.randint(1, 4))]
        n_splits = rng.randint(1, 6)
        splits = (n_splits, rng.randint(0, n_splits), rng.choice([1, 2, 4, 6]))
        if rng.random() < 0.5:
            splits = bd.SplitRule(rng.choice([1, 2, 3, 8, 32]), rng.choice([1, 3, 8, 64]))
        factor = rng.choice([None, 0.5, 4.0, 40.0])
        dtype = rng.choice([torch.bfloat16, torch.float16])
        k_stages = rng.choice([1, 2, 3, 4, 6])  # the K ring depth: refills, wrap-around, splits shorter than it
        _, amb = check_against_oracle(lens, next_n, hkv * group, hkv, d, bs, splits, factor, seed=rng.randrange(1 << 30),
                                      dtype=dtype, k_stages=k_stages)
        total_amb += amb
    print(f"fuzz: {total_amb} decisions within {AMBIGUOUS_MARGIN} of the threshold (not compared)")


@pytest.mark.parametrize("d", [64, 128])
def test_factor_unset_equals_dense(d):
    case = wl.peaked_attention_case([777, 4096, 15], [1, 1, 1], 32, 8, d, 16, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    args = [case[n] for n in wl.CASE_TENSORS]
    dense = paged_attention_dense(*args)
    # MAX_SPLITS: every combine thread reads an LSE, most splits of the short requests are
    # empty, and (d 64: 16 groups of 16 threads) each group needs two rounds of loads.
    for splits in (1, 4, 33, bd.MAX_SPLITS):
        out = bd.blasst_decode(case["q"], case["k_cache"], case["v_cache"], case["block_table"], case["seq_lens"],
                               softmax_scale=d ** -0.5, num_splits=splits)
        assert (out.float() - dense).abs().max().item() < 1e-2


def test_zero_length_request_gives_zeros():
    case = wl.peaked_attention_case([300, 1], [1, 1], 32, 8, 128, 16, device=DEV)
    lens = case["seq_lens"].clone()
    lens[1] = 0
    out = bd.blasst_decode(case["q"], case["k_cache"], case["v_cache"], case["block_table"], lens,
                           softmax_scale=128 ** -0.5, num_splits=3, threshold_scale_factor=2.0)
    assert out[1].abs().max().item() == 0.0 and out[0].abs().max().item() > 0


def test_default_path_is_the_rule_and_the_heuristic_still_runs():
    """Without num_splits the wrapper runs DEFAULT_SPLIT_RULE (the backend's path):
    bit-identical to passing it explicitly and to the oracle's decisions (checked in
    test_matches_oracle); the batch-dependent heuristic's shape, kept as the benchmarks'
    baseline, still runs when passed explicitly."""
    b, ctx, hq, hkv, d, bs = 8, 32768, 32, 8, 128, 16
    w = wl.peaked_decode_batch(b, ctx, hq, hkv, d, bs, device=DEV,
                               params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    args = [w[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
    counts = {name: torch.zeros(b, 2, dtype=torch.int32, device=DEV) for name in ("auto", "rule", "heuristic")}
    auto = bd.blasst_decode(*args, softmax_scale=d ** -0.5, threshold_scale_factor=50.0, skip_counts=counts["auto"])
    rule = bd.blasst_decode(*args, softmax_scale=d ** -0.5, threshold_scale_factor=50.0, skip_counts=counts["rule"],
                            split_rule=bd.DEFAULT_SPLIT_RULE, max_seq_len=ctx)
    shape = bd.split_shape_heuristic(b, hkv, hq // hkv, ctx, DEV)
    heuristic = bd.blasst_decode(*args, softmax_scale=d ** -0.5, threshold_scale_factor=50.0,
                                 skip_counts=counts["heuristic"], **shape._asdict())
    assert torch.equal(auto, rule) and torch.equal(counts["auto"], counts["rule"])
    assert (heuristic.float() - auto.float()).abs().max().item() < 0.1
    eligible = -(-ctx // bd.KV_TILE) - bd.DEFAULT_SPLIT_RULE.split_count(-(-ctx // bd.KV_TILE))
    assert counts["auto"][:, 1].tolist() == [hkv * eligible] * b


def test_cuda_graph_capture_and_replay():
    b, hq, hkv, d, bs, splits = 4, 32, 8, 128, 16, 6
    w = wl.peaked_decode_batch(b, 3000, hq, hkv, d, bs, device=DEV)
    out = torch.empty_like(w["q"])
    ws = bd.decode_workspace(splits, b, hq, d, DEV)
    q = w["q"].clone()

    def call():
        bd.blasst_decode(q, w["k_cache"], w["v_cache"], w["block_table"], w["seq_lens"], softmax_scale=d ** -0.5,
                         threshold_scale_factor=50.0, num_splits=splits, out=out, workspace=ws)

    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        q.copy_(torch.randn_like(q))  # fresh inputs at the captured address
        graph.replay()
        torch.cuda.synchronize()
        eager = bd.blasst_decode(q, w["k_cache"], w["v_cache"], w["block_table"], w["seq_lens"],
                                 softmax_scale=d ** -0.5, threshold_scale_factor=50.0, num_splits=splits)
        assert torch.equal(out, eager)


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda a: a.update(seq_lens=a["seq_lens"].long()), "seq_lens must be int32"),
        (lambda a: a.update(q=a["q"].float()), "share one dtype"),
        (lambda a: a.update(q=a["q"][:1]), "not a multiple"),
    ],
)
def test_bad_input_is_refused(mutate, fragment):
    case = wl.peaked_attention_case([100, 200], [1, 1], 32, 8, 128, 16, device=DEV)
    a = {n: case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")}
    mutate(a)
    with pytest.raises(ValueError, match=fragment):
        bd.blasst_decode(a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["seq_lens"], softmax_scale=0.1)


def test_too_many_splits_and_bad_workspace_are_refused():
    case = wl.peaked_attention_case([100, 200], [1, 1], 32, 8, 128, 16, device=DEV)
    a = [case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
    with pytest.raises(ValueError, match="num_splits must be an integer in"):
        bd.blasst_decode(*a, softmax_scale=0.1, num_splits=bd.MAX_SPLITS + 1)
    o_part, lse_part = bd.decode_workspace(4, 2, 32, 128, DEV)
    for ws in ((o_part, lse_part[:, :1]), (o_part.transpose(1, 2).contiguous().transpose(1, 2), lse_part),
               (o_part.half(), lse_part)):
        with pytest.raises(ValueError, match="workspace must be"):
            bd.blasst_decode(*a, softmax_scale=0.1, num_splits=4, workspace=ws)


def test_combine_with_and_without_pdl_agree():
    """The merge launched as a programmatic dependent of the decode kernel (the default)
    and launched plainly give bit-identical outputs on fresh partials."""
    b, hq, hkv, d, bs, splits = 3, 32, 8, 128, 16, 57
    w = wl.peaked_decode_batch(b, 5000, hq, hkv, d, bs, device=DEV)
    ws = bd.decode_workspace(splits, b, hq, d, DEV)
    with_pdl = bd.blasst_decode(w["q"], w["k_cache"], w["v_cache"], w["block_table"], w["seq_lens"],
                                softmax_scale=d ** -0.5, threshold_scale_factor=30.0, num_splits=splits, workspace=ws)
    plain = torch.empty_like(with_pdl)
    bd.compile_blasst_combine(head_dim=d, dtype=w["q"].dtype, use_pdl=False)(ws[0], ws[1], plain, w["seq_lens"], 1, 0, 1)
    assert with_pdl.abs().max().item() > 0 and torch.equal(with_pdl, plain)


def _long_table(block_table, width):
    """``block_table`` widened to ``width`` columns (the extra ones point at block 0), as
    vLLM's table for max_model_len is wider than the batch needs."""
    wide = torch.zeros(block_table.shape[0], width, dtype=torch.int32, device=block_table.device)
    wide[:, :block_table.shape[1]] = block_table
    return wide


@pytest.mark.parametrize("factor", [None, 8.0])
def test_graph_captured_for_128k_equals_eager_bit_for_bit(factor):
    """A decode graph captured for requests up to 131,072 keys (vLLM captures with
    max_seq_len = max_model_len) and replayed on 2K-key requests gives the same output
    bits and skip counts as an eager call sized by the batch itself."""
    b, hq, hkv, d, bs = 3, 32, 8, 128, 16
    case = wl.peaked_attention_case([2048, 1999, 1500], [1] * b, hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    q, kc, vc, table, lens = (case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    wide = _long_table(table, 131072 // bs)
    grid = bd.DEFAULT_SPLIT_RULE.max_split_count(131072 // bd.KV_TILE)
    out = torch.empty_like(q)
    ws = bd.decode_workspace(grid, b, hq, d, DEV)
    graph_counts = torch.zeros(b, 2, dtype=torch.int32, device=DEV)

    def call():
        bd.blasst_decode(q, kc, vc, wide, lens, softmax_scale=d ** -0.5, threshold_scale_factor=factor,
                         max_seq_len=131072, out=out, workspace=ws, skip_counts=graph_counts)

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph_counts.zero_()
    graph.replay()
    torch.cuda.synchronize()
    eager_counts = torch.zeros(b, 2, dtype=torch.int32, device=DEV)
    eager = bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=d ** -0.5, threshold_scale_factor=factor,
                             max_seq_len=int(lens.max()), skip_counts=eager_counts)
    assert torch.equal(out, eager)
    assert torch.equal(graph_counts, eager_counts)
    if factor is not None:
        assert int(eager_counts[:, 0].sum()) > 0


def test_a_request_gets_the_same_bits_whatever_its_neighbours():
    """Request 0 alone, next to one longer request, and next to many: identical output
    bits and skip counts (the split ranges depend on its own length only)."""
    hq, hkv, d, bs = 32, 8, 128, 16
    seed = random.randrange(1 << 30)
    lens_list = [3000, 60000] + [20000] * 30
    case = wl.peaked_attention_case(lens_list, [1] * len(lens_list), hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=seed))
    q, kc, vc, table, lens = (case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    results = []
    for n in (1, 2, len(lens_list)):
        counts = torch.zeros(n, 2, dtype=torch.int32, device=DEV)
        out = bd.blasst_decode(q[:n], kc, vc, table[:n], lens[:n], softmax_scale=d ** -0.5, threshold_scale_factor=6.0,
                               max_seq_len=int(lens[:n].max()), skip_counts=counts)
        results.append((out[:1].clone(), counts[:1].clone()))
    for out, counts in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(counts, results[0][1])
    assert int(results[0][1][0, 0]) > 0


def _poison_past_lengths(cache, table, lens, value):
    """Write ``value`` into every slot of each request's last page past its length."""
    bs = cache.shape[1]
    for b, n in enumerate(lens.tolist()):
        if n % bs:
            cache[table[b, n // bs], n % bs:] = value


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("factor,splits", [(None, bd.DEFAULT_SPLIT_RULE), (6.0, bd.DEFAULT_SPLIT_RULE), (6.0, 3)])
def test_stale_non_finite_cache_past_seq_len_never_reaches_the_output(poison, factor, splits):
    """vLLM reuses freed blocks as they are: slots past a request's length may hold Inf or
    NaN from another request. With seq_len = 16 n + 5 the last tile holds 11 such keys."""
    hq, hkv, d, bs = 32, 8, 128, 16
    lens_list = [16 * 40 + 5, 16 * 200 + 5, 16 * 3 + 5]
    case = wl.peaked_attention_case(lens_list, [1] * 3, hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    args = [case[n] for n in wl.CASE_TENSORS]
    ref = blasst_attention_reference(*args, threshold_scale_factor=factor, kv_tile_size=bd.KV_TILE,
                                     q_tile_rows=bd.Q_TILE_ROWS, visit_order="ascending",
                                     **split_kwargs(splits, oracle=True))
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    for cache in (kc, vc):
        _poison_past_lengths(cache, case["block_table"], case["seq_lens"], poison)
    out = bd.blasst_decode(case["q"], kc, vc, case["block_table"], case["seq_lens"], softmax_scale=d ** -0.5,
                           threshold_scale_factor=factor, **split_kwargs(splits))
    assert bool(torch.isfinite(out).all())
    assert (out.float() - ref.out).abs().max().item() <= 2e-2 * max(1.0, ref.out.abs().max().item())


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_dense_flash_attention_on_poisoned_pages(poison):
    """What vLLM's FA3 and FA4 (the dense paths) do with the same poisoned pages: finite
    and equal to the dense oracle (recorded as an artifact either way)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    hq, hkv, d, bs = 32, 8, 128, 16
    lens_list = [16 * 40 + 5, 16 * 200 + 5, 16 * 3 + 5]
    case = wl.peaked_attention_case(lens_list, [1] * 3, hq, hkv, d, bs, device=DEV)
    dense = paged_attention_dense(*[case[n] for n in wl.CASE_TENSORS])
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    for cache in (kc, vc):
        _poison_past_lengths(cache, case["block_table"], case["seq_lens"], poison)
    seen = {}
    for version in (3, 4):
        out = flash_attn_varlen_func(q=case["q"], k=kc, v=vc, cu_seqlens_q=case["cu_seqlens_q"], max_seqlen_q=1,
                                     seqused_k=case["seq_lens"], max_seqlen_k=max(lens_list), softmax_scale=d ** -0.5,
                                     causal=True, block_table=case["block_table"], fa_version=version)
        seen[version] = {"finite": bool(torch.isfinite(out).all()),
                         "max_err": float((out.float() - dense).abs().nan_to_num(float("inf")).max())}
    print(f"dense FlashAttention on pages poisoned with {poison}: {seen}")
    assert all(v["finite"] and v["max_err"] < 2e-2 for v in seen.values()), seen


def test_next_n_is_taken_as_given_and_checked():
    case = wl.peaked_attention_case([300, 700], [2, 2], 32, 8, 128, 16, device=DEV)
    a = [case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
    ref = blasst_attention_reference(*[case[n] for n in wl.CASE_TENSORS])
    out = bd.blasst_decode(*a, softmax_scale=128 ** -0.5, next_n=2)
    assert (out.float() - ref.out).abs().max().item() < 2e-2
    with pytest.raises(ValueError, match="next_n=1 query tokens"):
        bd.blasst_decode(*a, softmax_scale=128 ** -0.5, next_n=1)


def test_misplaced_and_misaligned_tensors_are_refused():
    case = wl.peaked_attention_case([100, 200], [1, 1], 32, 8, 128, 16, device=DEV)
    q, kc, vc, table, lens = (case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    with pytest.raises(ValueError, match="seq_lens is on cpu"):
        bd.blasst_decode(q, kc, vc, table, lens.cpu(), softmax_scale=0.1)
    with pytest.raises(ValueError, match="block_table is on cpu"):
        bd.blasst_decode(q, kc, vc, table.cpu(), lens, softmax_scale=0.1)
    store = torch.empty(q.numel() + 4, dtype=q.dtype, device=DEV)
    shifted = store[4:].view(q.shape)  # 8 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="out must be 16-byte aligned"):
        bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=0.1, out=shifted)


def test_check_values_catches_what_the_metadata_cannot_show():
    case = wl.peaked_attention_case([100, 200], [1, 1], 32, 8, 128, 16, device=DEV)
    q, kc, vc, table, lens = (case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    too_long = lens.clone()
    too_long[1] = table.shape[1] * 16 + 1
    with pytest.raises(ValueError, match=r"seq_lens\[1\]="):
        bd.blasst_decode(q, kc, vc, table, too_long, softmax_scale=0.1, check_values=True)
    bad_ids = table.clone()
    bad_ids[0, 0] = kc.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[0\] holds block ids outside"):
        bd.blasst_decode(q, kc, vc, bad_ids, lens, softmax_scale=0.1, check_values=True)
    bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=0.1, check_values=True)


def test_per_request_factors_equal_each_request_alone_and_the_oracle():
    """A float32 tensor of factors (one per request, inf = no skipping): every request gets
    the output bits and skip counts of a scalar call on it alone, and the oracle's decisions."""
    hq, hkv, d, bs = 9, 3, 64, 128
    lens_list = [4000, 2500, 7000, 1200]
    factors = [2.0, math.inf, 64.0, 6.0]
    case = wl.peaked_attention_case(lens_list, [1] * 4, hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    q, kc, vc, table, lens = (case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    counts = torch.zeros(4, 2, dtype=torch.int32, device=DEV)
    factor_t = torch.tensor(factors, dtype=torch.float32, device=DEV)
    out = bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=d ** -0.5, threshold_scale_factor=factor_t,
                           skip_counts=counts)
    for i, f in enumerate(factors):
        alone_counts = torch.zeros(1, 2, dtype=torch.int32, device=DEV)
        alone = bd.blasst_decode(q[i:i + 1], kc, vc, table[i:i + 1], lens[i:i + 1], softmax_scale=d ** -0.5,
                                 threshold_scale_factor=f if f != math.inf else 1e30, skip_counts=alone_counts)
        assert torch.equal(out[i:i + 1], alone), f"request {i} (factor {f})"
        assert torch.equal(counts[i:i + 1], alone_counts), (i, counts[i].tolist(), alone_counts.tolist())
    assert int(counts[1, 0]) == 0 and int(counts[0, 0]) > 0 and int(counts[2, 0]) > 0
    ref = blasst_attention_reference(*[case[n] for n in wl.CASE_TENSORS], threshold_scale_factor=factors,
                                     kv_tile_size=bd.KV_TILE, q_tile_rows=bd.Q_TILE_ROWS, visit_order="ascending",
                                     split_rule=tuple(bd.DEFAULT_SPLIT_RULE))
    assert abs(int(counts[:, 0].sum()) - ref.skipped_tiles) <= ref.num_ambiguous()
    assert int(counts[:, 1].sum()) == ref.eligible_tiles


def test_a_captured_graph_follows_the_factor_tensor():
    """Capture with one set of factors, write others into the tensor, replay: the replay
    equals an eager call with the new factors (the factor is read at run time)."""
    hq, hkv, d, bs = 9, 3, 64, 128
    case = wl.peaked_attention_case([3000, 5000], [1, 1], hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    q, kc, vc, table, lens = (case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    factor_t = torch.tensor([math.inf, math.inf], dtype=torch.float32, device=DEV)
    out = torch.empty_like(q)
    ws = bd.decode_workspace(bd.DEFAULT_SPLIT_RULE.max_split_count(8192 // bd.KV_TILE), 2, hq, d, DEV)
    counts = torch.zeros(2, 2, dtype=torch.int32, device=DEV)

    def call():
        bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=d ** -0.5, threshold_scale_factor=factor_t,
                         max_seq_len=8192, out=out, workspace=ws, skip_counts=counts)

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for new in ([8.0, 32.0], [math.inf, 4.0]):
        factor_t.copy_(torch.tensor(new, device=DEV))
        counts.zero_()
        graph.replay()
        torch.cuda.synchronize()
        eager_counts = torch.zeros(2, 2, dtype=torch.int32, device=DEV)
        eager = bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=d ** -0.5,
                                 threshold_scale_factor=torch.tensor(new, dtype=torch.float32, device=DEV),
                                 skip_counts=eager_counts)
        assert torch.equal(out, eager) and torch.equal(counts, eager_counts), new
        assert int(counts[:, 0].sum()) > 0


def test_a_bad_factor_tensor_is_refused():
    case = wl.peaked_attention_case([300, 400], [1, 1], 32, 8, 128, 16, device=DEV)
    args = [case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
    for bad, fragment in ((torch.ones(3, device=DEV), r"float32 \[B=2\]"),
                          (torch.ones(2, dtype=torch.float64, device=DEV), "float32"),
                          (torch.ones(2), "threshold_scale_factor is on cpu")):
        with pytest.raises(ValueError, match=fragment):
            bd.blasst_decode(*args, softmax_scale=0.1, threshold_scale_factor=bad)


def test_the_timeline_variant_gives_the_same_output_and_stamps_every_active_cta():
    """benchmarks/decode_timeline.py's variant: per-CTA stamps through ``decisions``; the
    attention output is the normal call's, bit for bit."""
    hq, hkv, d, bs = 32, 8, 128, 16
    case = wl.peaked_attention_case([3000, 700], [1, 1], hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    args = [case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
    splits = 4
    normal = bd.blasst_decode(*args, softmax_scale=d ** -0.5, threshold_scale_factor=6.0, num_splits=splits)
    stamps = torch.zeros(2, hkv * -(-hq // hkv // bd.Q_TILE_ROWS), splits * bd.TIMELINE_STAMPS, dtype=torch.int32,
                         device=DEV)
    out = bd.blasst_decode(*args, softmax_scale=d ** -0.5, threshold_scale_factor=6.0, num_splits=splits,
                           decisions=stamps, timeline=True)
    assert torch.equal(out, normal)
    rows = stamps.view(-1, splits, bd.TIMELINE_STAMPS).reshape(-1, bd.TIMELINE_STAMPS).long() % (1 << 32)
    assert bool((rows[:, 7] != 0).all())  # every CTA of these requests has work
    assert bool((((rows[:, 7] - rows[:, 0]) % (1 << 32)) < 10**9).all())  # exit after entry, within a second
    assert bool((rows[:, 6] >= 0).all()) and int(rows[:, 6].max()) > 0  # kept eligible tiles
