"""CuTe-DSL kernels compile without a GPU, for Hopper (sm_90a, run on the H200) and
Blackwell (sm_100a, compile-checked only), against fake tensors."""

import subprocess
import sys

import pytest

COMPILE = """
from vllm_blackwell_sparse.kernels.gvr_topk import CLUSTER_COLUMNS_PER_THREAD, compile_gvr_topk, compile_gvr_topk_cluster
for k in (512, 1024, 2048):
    for has_hint, use_row_slot in ((True, False), (True, True), (False, False)):
        for vec_width in (1, 4):
            compile_gvr_topk(k, has_hint=has_hint, use_row_slot=use_row_slot, vec_width=vec_width)
# The cluster kernel: every register share size, both CTA sizes, every hint variant and k.
for per_thread in CLUSTER_COLUMNS_PER_THREAD:
    compile_gvr_topk_cluster(2048, has_hint=True, use_row_slot=True, per_thread=per_thread)
for k, ctas, threads in ((512, 8, 256), (1024, 4, 512), (2048, 2, 256)):
    for has_hint, use_row_slot in ((True, False), (False, False)):
        compile_gvr_topk_cluster(k, has_hint=has_hint, use_row_slot=use_row_slot, per_thread=16, ctas_per_row=ctas,
                                 threads=threads)
# The defaults at 128K (8 x 256 x 64 columns, all in registers or 32 in shared memory), a
# 16-CTA (non-portable) cluster, and the other shared-memory shares.
for ctas, threads, per_thread, smem in ((8, 256, 64, 0), (8, 256, 64, 32), (16, 256, 32, 0), (8, 256, 48, 16),
                                        (8, 512, 32, 16)):
    for has_hint, use_row_slot in ((True, False), (True, True), (False, False)) if smem else ((True, False),):
        compile_gvr_topk_cluster(2048, has_hint=has_hint, use_row_slot=use_row_slot, per_thread=per_thread,
                                 ctas_per_row=ctas, threads=threads, smem_per_thread=smem)
print("compiled")
"""


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
def test_gvr_topk_compiles(arch):
    env = {**__import__("os").environ, "CUTE_DSL_ARCH": arch}
    out = subprocess.run([sys.executable, "-c", COMPILE.format(arch=arch)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, (out.stdout + out.stderr)[-4000:]


def test_gvr_topk_rejects_unsupported_k_and_cluster_shapes():
    from vllm_blackwell_sparse.kernels.gvr_topk import compile_gvr_topk, compile_gvr_topk_cluster

    with pytest.raises(ValueError, match="k must be one of"):
        compile_gvr_topk(100, has_hint=False, use_row_slot=False)
    with pytest.raises(ValueError, match="k must be one of"):
        compile_gvr_topk_cluster(100, has_hint=False, use_row_slot=False, per_thread=16)
    with pytest.raises(ValueError, match="ctas_per_row must be one of"):
        compile_gvr_topk_cluster(2048, has_hint=False, use_row_slot=False, per_thread=16, ctas_per_row=32)
    with pytest.raises(ValueError, match="threads one of"):
        compile_gvr_topk_cluster(2048, has_hint=False, use_row_slot=False, per_thread=16, threads=1024)
    with pytest.raises(ValueError, match="per_thread one of"):
        compile_gvr_topk_cluster(2048, has_hint=False, use_row_slot=False, per_thread=12)
    with pytest.raises(ValueError, match="smem_per_thread must be one of"):
        compile_gvr_topk_cluster(2048, has_hint=False, use_row_slot=False, per_thread=32, smem_per_thread=8)
    with pytest.raises(ValueError, match="at most half of per_thread"):
        compile_gvr_topk_cluster(2048, has_hint=False, use_row_slot=False, per_thread=32, smem_per_thread=32)


COMPILE_DECODE = """
import torch
from vllm_blackwell_sparse.kernels.blasst_decode import compile_blasst_combine, compile_blasst_decode
for head_dim, group, next_n, block_size, dtype in (
    (128, 4, 1, 16, torch.bfloat16), (128, 8, 1, 64, torch.bfloat16), (64, 4, 2, 16, torch.float16),
    (128, 8, 3, 128, torch.float16),
):
    for has_threshold, count, final, per_request in ((False, False, False, False), (True, True, False, False),
                                                     (True, False, True, False), (True, True, False, True)):
        compile_blasst_decode(head_dim=head_dim, group=group, next_n=next_n, block_size=block_size, dtype=dtype,
                              has_threshold=has_threshold, count_skips=count, final_output=final,
                              record_decisions=count, factor_per_request=per_request)
    compile_blasst_combine(head_dim=head_dim, dtype=dtype)
compile_blasst_combine(head_dim=64, dtype=torch.bfloat16, use_pdl=False)
compile_blasst_decode(head_dim=64, group=3, next_n=1, block_size=128, dtype=torch.bfloat16, has_threshold=True,
                      count_skips=False, final_output=False, record_decisions=True, timeline=True)  # benchmarks'
for k_stages in (1, 8):  # the K ring's extremes
    compile_blasst_decode(head_dim=128, group=4, next_n=1, block_size=16, dtype=torch.bfloat16, has_threshold=True,
                          count_skips=False, final_output=False, k_stages=k_stages)
print("compiled")
"""


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
def test_blasst_decode_compiles(arch):
    env = {**__import__("os").environ, "CUTE_DSL_ARCH": arch}
    out = subprocess.run([sys.executable, "-c", COMPILE_DECODE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, (out.stdout + out.stderr)[-4000:]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(head_dim=96), "head_dim must be one of"),
        (dict(dtype=__import__("torch").float32), "dtype must be one of"),
        (dict(next_n=9), "next_n"),
        (dict(block_size=24), "block_size must be a multiple of 16"),
        (dict(k_stages=0), "k_stages must be in"),
    ],
)
def test_blasst_decode_rejects_unsupported_shapes(kwargs, fragment):
    import torch

    from vllm_blackwell_sparse.kernels.blasst_decode import compile_blasst_decode

    args = dict(head_dim=128, group=4, next_n=1, block_size=16, dtype=torch.bfloat16, has_threshold=False,
                count_skips=False, final_output=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        compile_blasst_decode(**args)


def test_decode_split_heuristic_rules(monkeypatch):
    """The split heuristic's rules on a 132-SM GPU (the H200), without a GPU."""
    from vllm_blackwell_sparse.kernels import blasst_decode as bd

    from vllm_blackwell_sparse.kernels.blasst_decode import heuristic

    monkeypatch.setitem(heuristic._SM_COUNT, 0, 132)

    def shape(batch, ctx, rows=4, hkv=8):
        return bd.split_shape_heuristic(batch, hkv, rows, ctx, "cuda:0")

    def tapered(long):
        return bd.SplitShape(long + long // 2, long, bd.LONG_SPLIT_RATIO)

    slots = 132 * bd.RESIDENT_WARPS_PER_SM
    # B = 1: equal 16-tile splits that still fit in one wave.
    assert shape(1, 32768) == bd.SplitShape(32768 // (16 * bd.MIN_TILES_PER_SPLIT_ONE_WAVE))
    assert 8 * shape(1, 32768).num_splits <= slots
    # B = 8 (64 warps per split, fewer than the SMs): long splits filling 2 whole waves,
    # rounded down, then half as many short ones.
    assert shape(8, 65536) == tapered(slots * bd.LONG_SPLIT_WAVES_SMALL_BATCH // 64) == bd.SplitShape(49, 33, 4)
    # B = 64: long splits filling 4 waves.
    assert shape(64, 131072) == tapered(slots * bd.LONG_SPLIT_WAVES_LARGE_BATCH // 512)
    assert shape(32, 131072) == tapered(slots * bd.LONG_SPLIT_WAVES_LARGE_BATCH // 256) == bd.SplitShape(24, 16, 4)
    # Short contexts: short splits of 8 tiles (< MIN_TILES_PER_SHORT_SPLIT) -> equal splits
    # of MIN_TILES_PER_SPLIT tiles; B = 64's are 15 tiles long: long-then-short.
    assert shape(32, 8192) == shape(8, 8192) == bd.SplitShape(8192 // (16 * bd.MIN_TILES_PER_SPLIT))
    assert shape(64, 8192) == tapered(slots * bd.LONG_SPLIT_WAVES_LARGE_BATCH // 512)
    assert shape(8, 32768) == bd.SplitShape(49, 33, 4)  # 14-tile short splits
    assert shape(64, 1) == shape(1, 1) == bd.SplitShape(1)
    # Fewer than 2 long splits (huge batches): equal splits, 5 waves' worth.
    assert shape(512, 131072) == bd.SplitShape(slots * bd.WAVES_LARGE_BATCH // 4096)
    assert shape(2048, 131072) == bd.SplitShape(1)
    # GQA 64/8 packs 8 rows per KV head into one row tile, like 32/8.
    assert shape(8, 65536, rows=8) == shape(8, 65536, rows=4)
    assert shape(8, 65536, rows=16) == tapered(slots * bd.LONG_SPLIT_WAVES_SMALL_BATCH // 128)  # 2 row tiles: 128 < 132 SMs


def test_decode_split_shape_arguments_are_checked():
    """The wrapper refuses bad split shapes before compiling anything (CPU tensors suffice)."""
    from vllm_blackwell_sparse import workloads as wl
    from vllm_blackwell_sparse.kernels import blasst_decode as bd

    case = wl.peaked_attention_case([100, 200], [1, 1], 32, 8, 128, 16)
    a = [case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
    for kwargs, fragment in [
        (dict(num_splits=4, long_splits=5), "long_splits must be an integer in"),
        (dict(num_splits=4, long_splits=-1), "long_splits must be an integer in"),
        (dict(num_splits=4, long_splits=1.5), "long_splits must be an integer in"),
        (dict(num_splits=4, long_splits=2, long_split_ratio=0), "long_split_ratio must be an integer in"),
        (dict(num_splits=4, long_splits=2, long_split_ratio=2.5), "long_split_ratio must be an integer in"),
        (dict(num_splits=4, long_splits=2, long_split_ratio=bd.MAX_LONG_SPLIT_RATIO + 1), "long_split_ratio"),
        (dict(long_splits=2), "need num_splits"),
        (dict(num_splits=2.5), "num_splits must be an integer in"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            bd.blasst_decode(*a, softmax_scale=0.1, **kwargs)


def test_kernel_classes_are_importable_at_module_level():
    from vllm_blackwell_sparse.kernels.blasst_decode import limits
    from vllm_blackwell_sparse.kernels.blasst_decode.combine_kernel import BlasstCombine
    from vllm_blackwell_sparse.kernels.blasst_decode.decode_kernel import BlasstDecode

    assert callable(BlasstDecode) and callable(BlasstCombine)
    import torch

    assert limits.can_implement(64, 3, 1, 128, torch.bfloat16) is None
    assert "head_dim must be one of" in limits.can_implement(96, 3, 1, 128, torch.bfloat16)
