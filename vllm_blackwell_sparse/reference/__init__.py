"""Torch oracles: the reference semantics every kernel of this project is tested against.

Plain PyTorch, no vLLM, runnable on CPU.
"""

from vllm_blackwell_sparse.reference.blasst import (
    BlasstDecisions,
    BlasstResult,
    blasst_attention_reference,
    blasst_log_lambda,
    gather_paged_kv,
    paged_attention_dense,
    rule_tile_ranges,
    split_tile_ranges,
)
from vllm_blackwell_sparse.reference.topk import (
    GvrRowTrace,
    gvr_topk_emulation,
    ordered_keys,
    topk_reference,
)

__all__ = [
    "BlasstDecisions",
    "BlasstResult",
    "GvrRowTrace",
    "blasst_attention_reference",
    "blasst_log_lambda",
    "gather_paged_kv",
    "gvr_topk_emulation",
    "ordered_keys",
    "paged_attention_dense",
    "rule_tile_ranges",
    "split_tile_ranges",
    "topk_reference",
]
