"""The CUSTOM backend's impl (cache write + dense FA3 on sm90 / FA4 on sm100) against the
torch oracle, on the GPU."""

import random
from types import SimpleNamespace

import pytest
import torch

from vllm_blackwell_sparse.backend import BlackwellSparseImpl, BlackwellSparseMetadata
from vllm_blackwell_sparse.reference import blasst_attention_reference


def make_problem(seed, head_size, hq, hkv, block_size, dtype, query_lens, seq_lens, pad_tokens=0):
    """Random paged cache with the new tokens written through the impl, like a vLLM step."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 5
    perm = torch.randperm(num_blocks, device=dev, generator=g).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=dev)
    used = 0
    for b, nb in enumerate(blocks):
        table[b, :nb] = perm[used:used + nb]
        used += nb
    kv = torch.randn(2, num_blocks, block_size, hkv, head_size, generator=g, device=dev, dtype=dtype)
    n_tok = sum(query_lens)
    q = torch.randn(n_tok + pad_tokens, hq, head_size, generator=g, device=dev, dtype=dtype)
    k_new = torch.randn(n_tok + pad_tokens, hkv, head_size, generator=g, device=dev, dtype=dtype)
    v_new = torch.randn(n_tok + pad_tokens, hkv, head_size, generator=g, device=dev, dtype=dtype)
    slots = []
    for b, (ql, n) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(n - ql, n):
            slots.append(int(table[b, pos // block_size]) * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots + [-1] * pad_tokens, dtype=torch.int64, device=dev)
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    md = BlackwellSparseMetadata(
        num_actual_tokens=n_tok, max_query_len=max(query_lens), max_seq_len=max(seq_lens), query_start_loc=cu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_table=table, slot_mapping=slot_mapping,
    )
    return q, k_new, v_new, kv, md




def run_impl(impl, q, k_new, v_new, kv, md):
    layer = SimpleNamespace(_k_scale=torch.ones(1, device="cuda"), _v_scale=torch.ones(1, device="cuda"))
    impl.do_kv_cache_update(layer, k_new, v_new, kv, md.slot_mapping[: md.num_actual_tokens])
    out = torch.full_like(q, 3.0)
    impl.forward(layer, q, k_new, v_new, kv, md, out)
    return out


CASES = [
    # head, Hq, Hkv, block, dtype, query_lens, seq_lens
    (128, 8, 2, 128, torch.bfloat16, [1] * 6, [100, 129, 1000, 4096, 5000, 17]),  # decode
    (128, 8, 2, 16, torch.bfloat16, [1, 1, 7, 300], [4000, 129, 507, 300]),  # mixed + chunked prefill, 16-token pages
    (128, 32, 8, 128, torch.bfloat16, [1, 1, 1, 1], [32768, 20000, 9000, 31000]),  # long decode, split-KV
    (64, 8, 8, 64, torch.float16, [1, 5, 64], [333, 700, 64]),  # MHA, fp16
    (256, 4, 1, 128, torch.bfloat16, [1, 3, 130], [2000, 1500, 130]),  # MQA, d 256
    (96, 12, 4, 32, torch.bfloat16, [1, 40], [1200, 600]),
    (80, 8, 2, 128, torch.bfloat16, [1, 1, 33], [900, 4000, 33]),
    (192, 8, 2, 64, torch.float16, [1, 70], [3000, 700]),
    (32, 16, 4, 16, torch.bfloat16, [1, 9], [500, 250]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-h{c[1]}/{c[2]}-bs{c[3]}-{str(c[4])[6:]}-q{max(c[5])}")
def test_impl_matches_oracle_on_paged_kv(case):
    head, hq, hkv, bs, dtype, qls, sls = case
    seed = random.randrange(1 << 30)  # fresh inputs every run; printed on failure
    q, k_new, v_new, kv, md = make_problem(seed, head, hq, hkv, bs, dtype, qls, sls, pad_tokens=3)
    impl = BlackwellSparseImpl(num_heads=hq, head_size=head, scale=head**-0.5, num_kv_heads=hkv)
    out = run_impl(impl, q, k_new, v_new, kv, md)
    n = md.num_actual_tokens
    # The cache write put the new K/V where slot_mapping says.
    flat = kv.view(2, -1, hkv, head)
    assert torch.equal(flat[0][md.slot_mapping[:n]], k_new[:n]), f"seed {seed}"
    assert torch.equal(flat[1][md.slot_mapping[:n]], v_new[:n]), f"seed {seed}"
    want = blasst_attention_reference(q[:n], kv[0], kv[1], md.block_table, md.query_start_loc, md.seq_lens, head**-0.5).out
    torch.testing.assert_close(out[:n].float(), want, atol=2e-2, rtol=2e-2, msg=lambda m: f"seed {seed}: {m}")
    assert bool((out[n:] == 3.0).all()), "padding rows must be left alone"


def test_cuda_graph_capture_and_replay_with_new_inputs():
    """Decode under a captured CUDA graph: new queries, cache contents and lengths at replay."""
    head, hq, hkv, bs = 128, 16, 4, 128
    qls, sls = [1] * 8, [3000] * 8
    q, k_new, v_new, kv, md = make_problem(1, head, hq, hkv, bs, torch.bfloat16, qls, sls)
    md.max_seq_len = 8192  # what vLLM passes while capturing: an upper bound
    impl = BlackwellSparseImpl(num_heads=hq, head_size=head, scale=head**-0.5, num_kv_heads=hkv)
    layer = SimpleNamespace(_k_scale=torch.ones(1, device="cuda"), _v_scale=torch.ones(1, device="cuda"))
    out = torch.empty_like(q)
    impl.forward(layer, q, k_new, v_new, kv, md, out)  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.do_kv_cache_update(layer, k_new, v_new, kv, md.slot_mapping)
        impl.forward(layer, q, k_new, v_new, kv, md, out)
    for seed in (11, 12):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q.copy_(torch.randn(q.shape, generator=g, device="cuda"))
        kv.copy_(torch.randn(kv.shape, generator=g, device="cuda"))
        k_new.copy_(torch.randn(k_new.shape, generator=g, device="cuda"))
        new_lens = torch.randint(2000, 3000, (8,), generator=g, device="cuda", dtype=torch.int32)
        md.seq_lens.copy_(new_lens)
        # The new token sits at position len-1 of its request.
        pos = (new_lens - 1).long()
        md.slot_mapping.copy_(md.block_table.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs)
        graph.replay()
        torch.cuda.synchronize()
        want = blasst_attention_reference(q, kv[0], kv[1], md.block_table, md.query_start_loc, md.seq_lens, head**-0.5).out
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
        assert torch.equal(kv[0].reshape(-1, hkv, head)[md.slot_mapping], k_new)


def test_dense_path_runs_fa3_on_hopper_and_fa4_elsewhere():
    """The impl's dense output is bit-identical to vLLM's FA3 (sm90) / FA4 call on the same cache."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_blackwell_sparse.backend import dense_fa_version

    from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

    hopper = torch.cuda.get_device_capability()[0] == 9
    assert not hopper or is_fa_version_supported(3), "vLLM's FA3 is missing on this sm90 host"
    want_version = 3 if hopper else 4
    assert dense_fa_version() == want_version
    head, hq, hkv, bs = 128, 32, 8, 16
    seed = random.randrange(1 << 30)
    q, k_new, v_new, kv, md = make_problem(seed, head, hq, hkv, bs, torch.bfloat16, [1, 1, 1, 9], [20000, 700, 4096, 9])
    impl = BlackwellSparseImpl(num_heads=hq, head_size=head, scale=head**-0.5, num_kv_heads=hkv)
    out = run_impl(impl, q, k_new, v_new, kv, md)
    direct = torch.empty_like(q)
    flash_attn_varlen_func(
        q=q, k=kv[0], v=kv[1], out=direct, cu_seqlens_q=md.query_start_loc, max_seqlen_q=md.max_query_len,
        seqused_k=md.seq_lens, max_seqlen_k=md.max_seq_len, softmax_scale=head**-0.5, causal=True,
        block_table=md.block_table, num_splits=0, fa_version=want_version,
    )
    assert torch.equal(out, direct), f"seed {seed}"
    if want_version == 3:  # the check above can fail: FA4 differs from FA3 in the last bits
        other = torch.empty_like(q)
        flash_attn_varlen_func(
            q=q, k=kv[0], v=kv[1], out=other, cu_seqlens_q=md.query_start_loc, max_seqlen_q=md.max_query_len,
            seqused_k=md.seq_lens, max_seqlen_k=md.max_seq_len, softmax_scale=head**-0.5, causal=True,
            block_table=md.block_table, num_splits=0, fa_version=4,
        )
        assert not torch.equal(out, other), f"seed {seed}: FA3 and FA4 gave identical bits, the check proves nothing"
