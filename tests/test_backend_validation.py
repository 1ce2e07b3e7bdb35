"""What the CUSTOM backend accepts and refuses at startup, checked through vLLM's own
validate_configuration (the reasons vLLM prints when a user selects CUSTOM)."""

from types import SimpleNamespace

import pytest
import torch
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata

from vllm_blackwell_sparse.backend import (
    BlackwellSparseBackend,
    BlackwellSparseImpl,
    BlackwellSparseMetadataBuilder,
)

H200 = DeviceCapability(9, 0)
B200 = DeviceCapability(10, 0)


def reasons(**overrides):
    kw = dict(
        head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128, use_mla=False,
        has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
        device_capability=H200, attn_type=AttentionType.DECODER,
    )
    kw.update(overrides)
    return BlackwellSparseBackend.validate_configuration(**kw)


@pytest.mark.parametrize("head_size", [32, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256, None])
def test_supported_on_hopper(head_size, dtype, block_size):
    assert reasons(head_size=head_size, dtype=dtype, block_size=block_size) == []


@pytest.mark.parametrize("head_size", [64, 128])
def test_supported_on_blackwell(head_size):
    assert reasons(head_size=head_size, device_capability=B200) == []


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
        (dict(kv_cache_dtype="fp8_e4m3"), "kv_cache_dtype"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(head_size=84), "head_size 84"),
        (dict(head_size=264), "head_size 264"),
        (dict(head_size=16), "head_size 16"),
        (dict(head_size=256, device_capability=B200), "head_size 256 is not supported on sm10x"),
        (dict(kv_cache_dtype="float16", dtype=torch.bfloat16), "differs from the model dtype"),
        (dict(device_capability=DeviceCapability(8, 0)), "compute capability"),
        (dict(device_capability=DeviceCapability(12, 0)), "compute capability"),
        (dict(block_size=8), "block_size"),
        (dict(has_sink=True), "sinks"),
        (dict(use_mla=True), "MLA"),
        (dict(use_sparse=True), "sparse"),
        (dict(use_mm_prefix=True), "multimodal"),
        (dict(attn_type=AttentionType.ENCODER), "attention type"),
        (dict(attn_type=AttentionType.ENCODER_DECODER), "attention type"),
        (dict(has_sliding_window=True), "sliding window"),
        (dict(use_non_causal=True), "non-causal"),
    ],
)
def test_refused_with_a_reason(overrides, fragment):
    got = reasons(**overrides)
    assert got, f"{overrides} should be refused"
    assert any(fragment in r for r in got), got


def test_blasst_prefill_factor_without_kernel_is_refused_at_startup(monkeypatch):
    monkeypatch.setenv("VBS_PREFILL_THRESHOLD_SCALE_FACTOR", "20")
    got = reasons()
    assert any("prefill_threshold_scale_factor" in r and "no BLASST prefill kernel" in r for r in got), got


def test_blasst_decode_factor_is_accepted_for_its_shapes(monkeypatch):
    monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "20")
    for head_size in (64, 128):
        for dtype in (torch.float16, torch.bfloat16):
            assert reasons(head_size=head_size, dtype=dtype, block_size=16) == []


@pytest.mark.parametrize("head_size,dtype", [(96, torch.bfloat16), (256, torch.bfloat16), (128, torch.float32)])
def test_blasst_decode_factor_refuses_other_shapes(monkeypatch, head_size, dtype):
    monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "20")
    got = reasons(head_size=head_size, dtype=dtype)
    assert any("decode_threshold_scale_factor" in r and str(head_size) in r for r in got), got


def test_gvr_topk_is_accepted_with_our_backend(monkeypatch):
    # GVR acts in the DSA indexer (dsa.py), independently of the attention backend.
    monkeypatch.setenv("VBS_GVR_TOPK", "1")
    assert reasons() == []


def test_kv_cache_dtype_equal_to_model_dtype_is_fine():
    assert reasons(kv_cache_dtype="bfloat16", dtype=torch.bfloat16) == []
    assert reasons(kv_cache_dtype="float16", dtype=torch.float16) == []


def test_missing_fa4_is_a_startup_reason(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cutlass" else real(name, *a))
    assert any("CuTe DSL" in r for r in reasons())


def test_invalid_config_is_a_startup_reason(monkeypatch):
    monkeypatch.setenv("VBS_GVR_TOPK", "perhaps")
    assert any("VBS_GVR_TOPK" in r for r in reasons())


def test_kv_cache_layout_is_kv_planar():
    shape = BlackwellSparseBackend.get_kv_cache_shape(100, 128, 8, 128)
    assert shape == (2, 100, 128, 8, 128)
    assert BlackwellSparseBackend.get_kv_cache_block_dim(128, 8, 128) == 1
    with pytest.raises(ValueError, match="multiple of 16"):
        BlackwellSparseBackend.get_kv_cache_shape(100, 8, 8, 128)


def test_prefers_128_token_blocks():
    assert BlackwellSparseBackend.get_preferred_block_size(16) == 128


def test_cudagraph_support_is_uniform_batch():
    from vllm.v1.attention.backend import AttentionCGSupport

    assert BlackwellSparseMetadataBuilder.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_BATCH


IMPL_ARGS = dict(num_heads=8, head_size=128, scale=128**-0.5, num_kv_heads=2)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (dict(alibi_slopes=[0.1] * 8), "ALiBi"),
        (dict(sliding_window=4096), "sliding-window"),
        (dict(logits_soft_cap=30.0), "soft-capping"),
        (dict(sinks=torch.zeros(8)), "sinks"),
        (dict(attn_type=AttentionType.ENCODER_ONLY), "attention type"),
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
        (dict(block_m=64), "block_m"),
    ],
)
def test_impl_refuses_unsupported_features(extra, fragment):
    with pytest.raises(NotImplementedError, match=fragment):
        BlackwellSparseImpl(**IMPL_ARGS, **extra)


def test_impl_accepts_plain_decoder_attention():
    impl = BlackwellSparseImpl(**IMPL_ARGS, logits_soft_cap=None)
    assert impl.num_kv_heads == 2 and impl.scale == pytest.approx(128**-0.5)


def test_impl_refuses_blasst_factor_without_kernel(monkeypatch):
    monkeypatch.setenv("VBS_PREFILL_THRESHOLD_SCALE_FACTOR", "1000")
    with pytest.raises(ValueError, match="prefill_threshold_scale_factor"):
        BlackwellSparseImpl(**IMPL_ARGS)


def test_profiling_run_returns_zeros():
    impl = BlackwellSparseImpl(**IMPL_ARGS)
    out = torch.full((4, 8, 128), 7.0)
    got = impl.forward(None, torch.randn(4, 8, 128), None, None, torch.empty(0), None, out)
    assert got is out and bool((out == 0).all())


def test_profiling_run_builds_the_decode_kernels_once(monkeypatch):
    """With the decode factor set, vLLM's profiling run (no metadata) builds the variants
    the layer will launch, so no eager step compiles in the middle of serving."""
    import vllm_blackwell_sparse.kernels.blasst_decode as bd

    monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "64")
    built = []
    monkeypatch.setattr(bd, "compile_blasst_decode", lambda **kw: built.append(("decode", kw)))
    monkeypatch.setattr(bd, "compile_blasst_combine", lambda **kw: built.append(("combine", kw)))
    impl = BlackwellSparseImpl(**IMPL_ARGS)
    impl.precompile_plan = (128, (1, 3))  # outside vLLM there is no config to plan from
    out = torch.zeros(4, 8, 128, dtype=torch.bfloat16)
    impl.forward(None, torch.randn(4, 8, 128, dtype=torch.bfloat16), None, None, torch.empty(0), None, out)
    impl.forward(None, torch.randn(4, 8, 128, dtype=torch.bfloat16), None, None, torch.empty(0), None, out)
    decodes = [kw for kind, kw in built if kind == "decode"]
    assert sorted((kw["next_n"], kw["final_output"]) for kw in decodes) == [(1, False), (1, True), (3, False), (3, True)]
    assert all(kw["block_size"] == 128 and kw["group"] == 4 and kw["has_threshold"] for kw in decodes)
    assert [kind for kind, _ in built].count("combine") == 1


def make_builder():
    vllm_config = SimpleNamespace(
        speculative_config=None, parallel_config=SimpleNamespace(decode_context_parallel_size=1)
    )
    return BlackwellSparseMetadataBuilder(kv_cache_spec=None, layer_names=["l0"], vllm_config=vllm_config, device="cpu")


def common_metadata(query_lens, seq_lens, causal=True):
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=len(query_lens), num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_table_tensor=torch.zeros(len(query_lens), 4, dtype=torch.int32),
        slot_mapping=torch.arange(int(qsl[-1])), causal=causal,
    )


def test_builder_splits_decodes_from_prefills():
    b = make_builder()
    assert b.reorder_batch_threshold == 1
    md = b.build(0, common_metadata([1, 1, 1, 37, 5], [100, 200, 300, 37, 400]))
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills, md.num_prefill_tokens) == (3, 3, 2, 42)
    assert md.num_actual_tokens == 45 and md.max_query_len == 37 and md.max_seq_len == 400
    md = b.build(0, common_metadata([1, 1], [10, 20]))
    assert (md.num_decodes, md.num_prefills) == (2, 0)


def test_builder_refuses_non_causal():
    with pytest.raises(NotImplementedError, match="causal"):
        make_builder().build(0, common_metadata([3], [3], causal=False))


def test_update_block_table_returns_a_copy():
    """vLLM reuses one metadata object for several KV-cache groups: updating must not
    change what layers of the first group read."""
    b = make_builder()
    md = b.build(0, common_metadata([1, 1], [10, 20]))
    table0, slots0 = md.block_table, md.slot_mapping
    new_table, new_slots = torch.ones(2, 4, dtype=torch.int32), torch.arange(2) + 100
    md2 = b.update_block_table(md, new_table, new_slots)
    assert md2 is not md
    assert md.block_table is table0 and md.slot_mapping is slots0
    assert md2.block_table is new_table and md2.slot_mapping is new_slots
    assert md2.seq_lens is md.seq_lens and md2.num_decodes == md.num_decodes


def test_kv_cache_update_writes_k_to_plane_0_and_v_to_plane_1(monkeypatch):
    import vllm._custom_ops as ops

    seen = {}

    def fake_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
        seen.update(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slots=slot_mapping, dtype=kv_cache_dtype)

    monkeypatch.setattr(ops, "reshape_and_cache_flash", fake_reshape_and_cache_flash)
    impl = BlackwellSparseImpl(**IMPL_ARGS)
    kv = torch.zeros(2, 6, 16, 2, 128)
    key, value, slots = torch.randn(3, 2, 128), torch.randn(3, 2, 128), torch.tensor([5, 17, 40])
    layer = SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1))
    impl.do_kv_cache_update(layer, key, value, kv, slots)
    assert seen["key"] is key and seen["value"] is value and seen["slots"] is slots and seen["dtype"] == "auto"
    assert seen["key_cache"].data_ptr() == kv[0].data_ptr() and seen["key_cache"].shape == (6, 16, 2, 128)
    assert seen["value_cache"].data_ptr() == kv[1].data_ptr() and seen["value_cache"].shape == (6, 16, 2, 128)


def test_forward_hands_dense_attention_the_kv_planes_and_unpadded_slices(monkeypatch):
    """The glue passes dense attention K = plane 0, V = plane 1, the metadata, and only the real tokens."""
    import vllm_blackwell_sparse.backend as backend
    from vllm_blackwell_sparse.reference import paged_attention_dense

    def fake_fa4(q, k, v, *, out, cu_seqlens_q, seq_lens, block_table, max_query_len, max_seq_len, softmax_scale,
                 scheduler_metadata=None, num_splits=0):
        assert scheduler_metadata is None and num_splits == 0  # a CPU builder plans no FA3 schedule
        out.copy_(paged_attention_dense(q, k, v, block_table, cu_seqlens_q, seq_lens, softmax_scale).to(out.dtype))
        return out

    monkeypatch.setattr(backend, "dense_paged_attention", fake_fa4)
    g = torch.Generator().manual_seed(0)
    impl = BlackwellSparseImpl(**IMPL_ARGS)
    kv = torch.randn(2, 6, 16, 2, 128, generator=g)
    md = make_builder().build(0, common_metadata([1, 3], [20, 30]))
    md.block_table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    q = torch.randn(6, 8, 128, generator=g)  # 4 real tokens + 2 CUDA-graph padding rows
    out = torch.full((6, 8, 128), 5.0)
    impl.forward(None, q, None, None, kv, md, out)
    want = paged_attention_dense(q[:4], kv[0], kv[1], md.block_table, md.query_start_loc, md.seq_lens, impl.scale)
    torch.testing.assert_close(out[:4], want)
    assert bool((out[4:] == 5.0).all())  # padding rows untouched


@pytest.mark.parametrize("major,fa3,want", [(9, True, 3), (9, False, 4), (10, True, 4), (10, False, 4)])
def test_dense_attention_is_fa3_on_hopper_only_where_vllm_ships_it(monkeypatch, major, fa3, want):
    """dense_fa_version's rule, on CPU: vLLM's FlashAttention modules replaced by stand-ins."""
    import sys
    import types

    import vllm_blackwell_sparse.backend as backend

    pkg = types.ModuleType("vllm.vllm_flash_attn")
    iface = types.ModuleType("vllm.vllm_flash_attn.flash_attn_interface")
    iface.is_fa_version_supported = lambda v: fa3 if v == 3 else True
    pkg.flash_attn_interface = iface
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn.flash_attn_interface", iface)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (major, 0))
    backend.dense_fa_version.cache_clear()
    try:
        assert backend.dense_fa_version() == want
    finally:
        backend.dense_fa_version.cache_clear()


def make_spec_builder(num_speculative_tokens, monkeypatch, factor=None):
    if factor is not None:
        monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", str(factor))
    vllm_config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=num_speculative_tokens, parallel_drafting=False),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
    )
    return BlackwellSparseMetadataBuilder(kv_cache_spec=None, layer_names=["l0"], vllm_config=vllm_config, device="cpu")


def test_non_uniform_decode_query_lengths_are_routed_dense_never_misread(monkeypatch):
    """Query lengths [1, 3] at B = 2 with 2 speculative tokens: both rows are decodes of
    different lengths, whose 4 tokens the kernel (uniform next_n) would misread as 2 x 2;
    the builder marks the batch dense instead. Uniform [3, 3] runs the kernel."""
    b = make_spec_builder(2, monkeypatch, factor=20)
    md = b.build(0, common_metadata([1, 3], [100, 200]))
    assert (md.num_decodes, md.decode_query_len, md.blasst_decode) == (2, 0, False)
    md = b.build(0, common_metadata([3, 3], [100, 200]))
    assert (md.num_decodes, md.decode_query_len, md.blasst_decode) == (2, 3, True)
    # Without speculative tokens a 3-token row is a prefill: the decode row alone runs the kernel.
    md = make_spec_builder(None, monkeypatch, factor=20).build(0, common_metadata([1, 3], [100, 200]))
    assert (md.num_decodes, md.num_prefills, md.decode_query_len, md.blasst_decode) == (1, 1, 1, True)


def test_dense_impl_refuses_a_batch_marked_dense_for_the_kernel(monkeypatch):
    """The impl keeps such a batch dense (and says why once) even with the factor set."""
    import vllm_blackwell_sparse.backend as backend

    monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "20")
    calls = []
    monkeypatch.setattr(backend, "dense_paged_attention", lambda q, k, v, **kw: calls.append(kw["seq_lens"]))
    impl = BlackwellSparseImpl(**IMPL_ARGS)
    md = make_spec_builder(2, monkeypatch).build(0, common_metadata([1, 3], [100, 200]))
    impl.forward(None, torch.randn(4, 8, 128), None, None, torch.zeros(2, 20, 16, 2, 128), md, torch.empty(4, 8, 128))
    assert len(calls) == 1 and calls[0].tolist() == [100, 200]


def test_blasst_on_blackwell_needs_the_explicit_opt_in(monkeypatch):
    import vllm_blackwell_sparse.backend as backend

    monkeypatch.setattr(backend, "fa4_unavailable_reason", lambda: None)
    monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "20")
    refused = reasons(device_capability=B200)
    assert any("VBS_ENABLE_UNVERIFIED_SM100=1" in r and "never run on sm_100" in r for r in refused), refused
    monkeypatch.setenv("VBS_ENABLE_UNVERIFIED_SM100", "1")
    assert not reasons(device_capability=B200)
    monkeypatch.delenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR")
    monkeypatch.delenv("VBS_ENABLE_UNVERIFIED_SM100")
    assert not reasons(device_capability=B200)  # dense FA4 needs no opt-in


def test_the_builder_says_why_decode_rows_run_dense(monkeypatch):
    b = make_spec_builder(2, monkeypatch, factor=20)
    assert b.build(0, common_metadata([1, 3], [100, 200])).dense_decode_reason == (
        "decode requests with different query lengths in one batch")
    assert b.build(0, common_metadata([3, 3], [100, 200])).dense_decode_reason is None
    monkeypatch.delenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR")
    b = make_spec_builder(2, monkeypatch)
    assert b.build(0, common_metadata([1, 3], [100, 200])).dense_decode_reason is None  # factor unset: nothing to explain
