"""The dispatcher's measured crossover (CPU: the rule only)."""

from vllm_blackwell_sparse.topk_dispatch import GVR_SHORT_MAX_COLS, GVR_SHORT_MAX_ROWS, prefer_gvr


def test_gvr_everywhere_but_many_short_rows_on_hopper():
    h200 = (9, 0)
    for rows, cols in ((1, 16384), (1, 131072), (32, 65536), (GVR_SHORT_MAX_ROWS, GVR_SHORT_MAX_COLS), (128, 131072),
                       (4096, GVR_SHORT_MAX_COLS + 4)):
        assert prefer_gvr(rows, cols, 2048, h200), (rows, cols)
    assert prefer_gvr(128, 131072, 512, h200)
    assert not prefer_gvr(GVR_SHORT_MAX_ROWS + 1, GVR_SHORT_MAX_COLS, 2048, h200), "many short rows"
    assert not prefer_gvr(128, 16384, 2048, h200)
    assert not prefer_gvr(128, 131072, 256, h200), "k outside GVR's compiled sizes"
    assert not prefer_gvr(128, 131072, 2048, (10, 0)), "no measurement on Blackwell"
    assert not prefer_gvr(128, 131072, 2048, h200, aligned=False), "measured with aligned rows only"


def test_gvr_default_kernel_always_holds_the_row():
    """Every cluster variant the default picks has room for the row; other rows get one CTA."""
    from vllm_blackwell_sparse.kernels.gvr_topk import (
        cluster_columns_per_thread,
        default_kernel,
        default_kernels_for_width,
    )

    for rows in (1, 8, 9, 32, 33, 64, 65, 4096):
        for cols in (4, 2048, 16384, 32768, 32772, 65536, 65540, 131072, 200000, 262144, 262148, 1 << 20):
            ctas, threads, smem = default_kernel(rows, cols, True)
            if ctas > 1:
                per_thread = cluster_columns_per_thread(cols, ctas, threads)
                assert per_thread is not None, (rows, cols, ctas, threads)
                assert 2 * smem <= per_thread, (rows, cols, ctas, threads, smem)
            else:
                assert threads in (512, 1024) and smem == 0
            assert default_kernel(rows, cols, False)[0] == 1, "unaligned rows take one CTA per row"
    assert default_kernel(1, 262148, True)[0] == 1, "too wide for the cluster kernel"
    # What the DSA hook compiles at model load covers every choice for that width.
    for cols in (16384, 32768, 65536, 163840, 262144):
        assert {default_kernel(r, cols, True) for r in range(1, 300)} == set(default_kernels_for_width(cols)), cols
    assert default_kernel(65536, 4096, True)[0] == 1, "rows are the cluster kernel's grid y (at most 65535)"
    assert default_kernel(65535, 4096, True)[0] > 1


def test_bench_gvr_configs_parse_and_refuse_what_no_kernel_runs():
    import pytest

    from vllm_blackwell_sparse.bench.topk import parse_gvr_config

    assert parse_gvr_config("auto") == {}
    assert parse_gvr_config("c8") == {"ctas_per_row": 8}
    assert parse_gvr_config("c4t256") == {"ctas_per_row": 4, "threads": 256}
    assert parse_gvr_config("c8t256s32") == {"ctas_per_row": 8, "threads": 256, "smem_per_thread": 32}
    assert parse_gvr_config("1024x4x4") == {"ctas_per_row": 1, "threads": 1024, "loads_in_flight": 4, "vec_width": 4}
    assert parse_gvr_config("512x16")["vec_width"] is None
    for bad in ("c3", "c8t", "c8t1024", "c8s", "c8t256s8", "fast", "1x2x3x4"):
        with pytest.raises(ValueError, match="config"):
            parse_gvr_config(bad)
