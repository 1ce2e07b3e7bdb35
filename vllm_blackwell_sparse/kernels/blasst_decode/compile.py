"""Compilation of the BLASST decode and combine kernels: once per variant and target arch,
with fake tensors (no GPU needed); the DSL is imported only here."""


import torch

from vllm_blackwell_sparse.kernels import target_arch
from vllm_blackwell_sparse.kernels.blasst_decode.limits import (
    DEFAULT_K_STAGES, DEFAULT_MIN_WARPS_PER_SM, MAX_K_STAGES, check_static,
)

_COMPILED: dict[tuple, object] = {}


def _cute_dtype(dtype: torch.dtype):
    import cutlass

    return {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}[dtype]


def compile_blasst_decode(
    *,
    head_dim: int,
    group: int,
    next_n: int,
    block_size: int,
    dtype: torch.dtype,
    has_threshold: bool,
    count_skips: bool,
    final_output: bool,
    record_decisions: bool = False,
    min_warps_per_sm: int = DEFAULT_MIN_WARPS_PER_SM,
    k_stages: int = DEFAULT_K_STAGES,
    factor_per_request: bool = False,
    timeline: bool = False,
):
    """Compile (once per variant and target arch) the decode kernel; ``factor_per_request``:
    the factor comes from a float32 tensor ``[B]`` instead of the scalar argument;
    ``timeline`` (benchmarks; needs ``record_decisions``): per-CTA timestamps instead of
    skip decisions (``decode_kernel.BlasstDecode``).

    Fake tensors with symbolic sizes and strides: one compiled kernel serves every batch,
    cache size and split count, and no GPU is needed to build it (the target is
    ``CUTE_DSL_ARCH`` when set, else the current GPU's).
    """
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

    check_static(head_dim, group, next_n, block_size, dtype)
    if not 1 <= k_stages <= MAX_K_STAGES:
        raise ValueError(f"k_stages must be in [1, {MAX_K_STAGES}], got {k_stages}")
    factor_per_request = bool(factor_per_request and has_threshold)
    timeline = bool(timeline and record_decisions)
    key = ("decode", head_dim, group, next_n, block_size, dtype, has_threshold, count_skips, record_decisions,
           final_output, min_warps_per_sm, k_stages, factor_per_request, timeline, target_arch())
    if key in _COMPILED:
        return _COMPILED[key]
    from vllm_blackwell_sparse.kernels.blasst_decode.decode_kernel import BlasstDecode

    op = BlasstDecode(
        head_dim, group, next_n, block_size, _cute_dtype(dtype), has_threshold, count_skips, record_decisions, final_output,
        min_warps_per_sm, k_stages, factor_per_request, timeline,
    )
    el = _cute_dtype(dtype)

    def sym8():
        # 64-bit: a layer's cache easily exceeds 2^31 elements.
        return cute.sym_int(64, divisibility=8)

    tokens, hkv, nblocks, splits, batch, max_blocks = (cute.sym_int() for _ in range(6))
    hq = cute.sym_int()
    q = make_fake_tensor(el, (tokens, hq, head_dim), stride=(sym8(), sym8(), 1), assumed_align=16)
    kc = make_fake_tensor(el, (nblocks, block_size, hkv, head_dim), stride=(sym8(), sym8(), sym8(), 1), assumed_align=16)
    vc = make_fake_tensor(el, (nblocks, block_size, hkv, head_dim), stride=(sym8(), sym8(), sym8(), 1), assumed_align=16)
    bt = make_fake_tensor(cutlass.Int32, (batch, max_blocks), stride=(cute.sym_int(), 1), assumed_align=4)
    lens = make_fake_compact_tensor(cutlass.Int32, (batch,))
    out = make_fake_tensor(el, (tokens, hq, head_dim), stride=(sym8(), sym8(), 1), assumed_align=16)
    # Own symbols: with one split the kernel writes ``out`` and a small stand-in is passed.
    p_tokens, p_hq = cute.sym_int(), cute.sym_int()
    o_part = make_fake_compact_tensor(cutlass.Float32, (splits, p_tokens, p_hq, head_dim), stride_order=(3, 2, 1, 0), assumed_align=16)
    lse_part = make_fake_compact_tensor(cutlass.Float32, (splits, p_tokens, p_hq), stride_order=(2, 1, 0))
    counts = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),))  # [B, 2] flattened
    decisions = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(), cute.sym_int(), cute.sym_int()), stride_order=(2, 1, 0))
    factors = make_fake_compact_tensor(cutlass.Float32, (cute.sym_int(),))  # [B], or a 1-element stand-in
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    compiled = cute.compile(
        op, q, kc, vc, bt, lens, out, o_part, lse_part, counts, decisions, factors, cutlass.Float32(1.0), cutlass.Float32(0.0),
        cutlass.Int32(1), cutlass.Int32(0), cutlass.Int32(1), cutlass.Int32(0), cutlass.Int32(1), stream,
        options="--enable-tvm-ffi",
    )
    _COMPILED[key] = compiled
    return compiled


def compile_blasst_combine(*, head_dim: int, dtype: torch.dtype, use_pdl: bool = True):
    """Compile (once per variant and target arch) the split merge; ``use_pdl``: launched
    as a programmatic dependent of the decode kernel (see ``BlasstCombine``). The kernel
    takes at most ``MAX_SPLITS`` splits (one LSE per thread); :func:`blasst_decode` checks
    that, a direct caller must.

    Arguments of the compiled function: ``o_part, lse_part, out, seq_lens, next_n,
    rule_min_tiles, rule_target_splits``; with ``rule_min_tiles > 0`` the row of token
    ``t`` merges only the splits of request ``t // next_n`` under that :class:`SplitRule`,
    with 0 every split of ``o_part``."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

    key = ("combine", head_dim, dtype, use_pdl, target_arch())
    if key in _COMPILED:
        return _COMPILED[key]
    from vllm_blackwell_sparse.kernels.blasst_decode.combine_kernel import BlasstCombine

    op = BlasstCombine(head_dim, _cute_dtype(dtype), use_pdl)
    tokens, hq, splits = cute.sym_int(), cute.sym_int(), cute.sym_int()
    o_part = make_fake_compact_tensor(cutlass.Float32, (splits, tokens, hq, head_dim), stride_order=(3, 2, 1, 0),
                                      assumed_align=16)
    lse_part = make_fake_compact_tensor(cutlass.Float32, (splits, tokens, hq), stride_order=(2, 1, 0))
    out = make_fake_tensor(_cute_dtype(dtype), (tokens, hq, head_dim), stride=(cute.sym_int(), cute.sym_int(), 1))
    lens = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),))
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    compiled = cute.compile(op, o_part, lse_part, out, lens, cutlass.Int32(1), cutlass.Int32(0), cutlass.Int32(1), stream,
                            options="--enable-tvm-ffi")
    _COMPILED[key] = compiled
    return compiled
