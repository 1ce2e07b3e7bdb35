"""The dispatcher's policy (CPU): GVR only inside the measured crossover, on the measured GPU."""

from vllm_blackwell_sparse.topk_dispatch import GVR_MIN_COLS, GVR_MIN_ROWS, prefer_gvr


def test_gvr_only_from_64_rows_of_64k_columns_on_hopper():
    h200 = (9, 0)
    assert prefer_gvr(GVR_MIN_ROWS, GVR_MIN_COLS, 2048, h200)
    assert prefer_gvr(128, 131072, 512, h200)
    assert not prefer_gvr(GVR_MIN_ROWS - 1, 131072, 2048, h200)
    assert not prefer_gvr(128, GVR_MIN_COLS - 1, 2048, h200)
    assert not prefer_gvr(128, 131072, 256, h200), "k outside GVR's compiled sizes"
    assert not prefer_gvr(128, 131072, 2048, (10, 0)), "no measurement on Blackwell"
