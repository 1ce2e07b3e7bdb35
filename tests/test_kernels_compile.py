"""CuTe-DSL kernels compile without a GPU, for Hopper (sm_90a, run on the H200) and
Blackwell (sm_100a, compile-checked only), against fake tensors."""

import subprocess
import sys

import pytest

COMPILE = """
from vllm_blackwell_sparse.kernels.gvr_topk import compile_gvr_topk
for k in (512, 1024, 2048):
    for has_hint, use_row_slot in ((True, False), (True, True), (False, False)):
        for vec_width in (1, 4):
            compile_gvr_topk(k, has_hint=has_hint, use_row_slot=use_row_slot, vec_width=vec_width)
print("compiled")
"""


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
def test_gvr_topk_compiles(arch):
    env = {**__import__("os").environ, "CUTE_DSL_ARCH": arch}
    out = subprocess.run([sys.executable, "-c", COMPILE.format(arch=arch)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, (out.stdout + out.stderr)[-4000:]


def test_gvr_topk_rejects_unsupported_k():
    from vllm_blackwell_sparse.kernels.gvr_topk import compile_gvr_topk

    with pytest.raises(ValueError, match="k must be one of"):
        compile_gvr_topk(100, has_hint=False, use_row_slot=False)
