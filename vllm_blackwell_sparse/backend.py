"""vLLM glue: the attention backend registered as ``CUSTOM``.

Backend / metadata builder / impl, in vLLM 0.26's shape. This layer knows vLLM's
backend API and configuration and launches kernels; it contains no kernel code.
Dense attention (prefill, and decode unless ``decode_threshold_scale_factor`` is set)
runs the fastest FlashAttention vLLM ships for the GPU on the paged KV cache: FA3 on
Hopper (sm90), where it beats FA4 on paged KV (docs/BENCHMARKS.md), and FlashAttention-4
(CuTe DSL, vendored by vLLM as ``vllm.vllm_flash_attn.cute``) elsewhere. With the factor
set, the decode rows run our BLASST decode kernel (``kernels/blasst_decode/``) on the
same cache.

GPU-only modules are imported inside the functions that need them: this module is
imported in vLLM's API-server process and on machines without CUDA.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_blackwell_sparse.config import ConfigError, load_config
from vllm_blackwell_sparse.envs import env_bool
from vllm_blackwell_sparse.features import unavailable_feature_reasons
from vllm_blackwell_sparse.kernels.blasst_decode import limits as blasst_limits
from vllm_blackwell_sparse.util import get_logger, warn_once

logger = get_logger(__name__)

# Head sizes for d == dv, per architecture family (major capability): multiples of 8
# from 32 (FA4 itself accepts 8 and up; 32 is the smallest the GPU tests run) to 256 on
# sm90 and to 128 on sm100 (its 192/128 and 256/256 are MLA / dedicated-kernel shapes
# this backend does not route).
SUPPORTED_HEAD_SIZES = {9: tuple(range(32, 257, 8)), 10: tuple(range(32, 129, 8))}
# FA4 (the dense path on Blackwell) reads paged KV with TMA when the page equals its KV
# tile (128 keys for head sizes up to 128) and with a slower cp.async path otherwise
# (13-29% behind FA3 at 16-token pages on the H200, docs/BENCHMARKS.md), so 128-token
# blocks are preferred; FA3, the dense path on Hopper, is as fast at 128 as at 16.
PREFERRED_BLOCK_SIZE = 128
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
# The BLASST decode kernel's shapes, as its package states them (plain constants; importing
# them builds no kernel and needs no GPU).
BLASST_DECODE_HEAD_SIZES = blasst_limits.SUPPORTED_HEAD_DIMS
BLASST_DECODE_DTYPES = blasst_limits.SUPPORTED_DTYPES
BLASST_DECODE_MAX_QUERY_LEN = blasst_limits.MAX_NEXT_N


class BlackwellSparseBackend(AttentionBackend):
    """Decoder self-attention on a K/V-planar paged cache: dense FA3 / FA4, BLASST decode."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)
    # The cache write is a separate op (vllm::unified_kv_cache_update), as in FLASH_ATTN.
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # vLLM 0.26 maps the backend class back to its enum member by this name.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["BlackwellSparseImpl"]:
        return BlackwellSparseImpl

    @staticmethod
    def get_builder_cls() -> type["BlackwellSparseMetadataBuilder"]:
        return BlackwellSparseMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # Only consulted when the user did not pass --block-size.
        return PREFERRED_BLOCK_SIZE

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        # K and V in separate planes, each [num_blocks, block_size, Hkv, D]. FA3 / FA4 read
        # both as (num_pages, page_size, Hkv, D); a BLASST decode kernel that skips a
        # KV tile then touches no byte of its V (with FLASH_ATTN's layout K and V of a
        # token sit side by side in one row).
        if block_size % 16 != 0:
            raise ValueError(f"block_size must be a multiple of 16, got {block_size}")
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return sorted({h for sizes in SUPPORTED_HEAD_SIZES.values() for h in sizes})

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major in SUPPORTED_HEAD_SIZES

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability,
    ) -> str | None:
        reasons = []
        fa4_missing = fa4_unavailable_reason()
        if fa4_missing:
            reasons.append(fa4_missing)
        if kv_cache_dtype not in (None, "auto") and kv_cache_dtype != str(dtype).removeprefix("torch."):
            reasons.append(f"kv_cache_dtype={kv_cache_dtype!r} differs from the model dtype {dtype} (the dense FlashAttention path needs them equal)")
        sizes = SUPPORTED_HEAD_SIZES.get(device_capability.major)
        if sizes is None:
            reasons.append(
                f"compute capability {device_capability.major}.{device_capability.minor} is not supported "
                "(sm90 / sm100 only)"
            )
        elif head_size not in sizes:
            reasons.append(
                f"head_size {head_size} is not supported on sm{device_capability.major}x; "
                f"supported: multiples of 8 from {sizes[0]} to {sizes[-1]}"
            )
        try:
            cfg = load_config()
            reasons += unavailable_feature_reasons(cfg)
            if cfg.decode_threshold_scale_factor is not None:
                if head_size not in BLASST_DECODE_HEAD_SIZES or dtype not in BLASST_DECODE_DTYPES:
                    reasons.append(
                        f"decode_threshold_scale_factor is set, but the BLASST decode kernel supports head_size "
                        f"{BLASST_DECODE_HEAD_SIZES} and dtype float16/bfloat16, got {head_size} / {dtype}"
                    )
                if device_capability.major == 10 and not env_bool("VBS_ENABLE_UNVERIFIED_SM100"):
                    reasons.append(
                        "decode_threshold_scale_factor is set, but the BLASST decode kernel has never run on sm_100 "
                        "(Blackwell; compile-checked only): unset the factor for dense FA4, or set "
                        "VBS_ENABLE_UNVERIFIED_SM100=1 to run it unverified"
                    )
        except ConfigError as e:
            reasons.append(str(e))
        return "; ".join(reasons) or None


@dataclass
class BlackwellSparseMetadata:
    """Per-batch metadata, shared by all layers of a KV-cache group."""

    num_actual_tokens: int  # tokens excluding CUDA-graph padding
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, KV length including this step's tokens
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    # The batch is reordered decode-first (query_len <= reorder threshold).
    num_decodes: int = 0
    num_decode_tokens: int = 0
    num_prefills: int = 0
    num_prefill_tokens: int = 0
    # Query tokens of every decode request when they are all equal (the BLASST decode
    # kernel's uniform ``next_n``), else 0.
    decode_query_len: int = 0
    # Whether the decode rows run the BLASST kernel (else the whole batch is dense), and
    # when the factor is set but they do not, why.
    blasst_decode: bool = False
    dense_decode_reason: str | None = None
    # FA3's ahead-of-time schedule for a whole-batch dense call (vLLM's FLASH_ATTN
    # recipe, see Fa3Schedule), and the split cap it was planned with (0: FA3 decides).
    scheduler_metadata: torch.Tensor | None = None
    max_num_splits: int = 0


class BlackwellSparseMetadataBuilder(AttentionMetadataBuilder[BlackwellSparseMetadata]):
    # Captured for uniform batches (all decode, same query length), as vLLM's own FA4
    # path declares: FA4's launch configuration depends on max_seqlen_q, so a graph
    # captured for one query length is not valid for a mixed batch (kept on Hopper too,
    # where dense attention is FA3).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    supports_update_block_table: bool = True

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes (and spec-decode verification rows) first, then prefills.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        self._blasst_factor_set = load_config(vllm_config).decode_threshold_scale_factor is not None
        self._fa3_schedule = Fa3Schedule.for_builder(kv_cache_spec, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> BlackwellSparseMetadata:
        cm = common_attn_metadata
        if cm.causal is not True:
            raise NotImplementedError("the CUSTOM (blackwell_sparse) backend supports causal decoder attention only")
        num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = split_decodes_and_prefills(
            cm, decode_threshold=self.reorder_batch_threshold
        )
        decode_query_len = 0
        if num_decodes:
            # Under full CUDA graphs vLLM pads the batch with requests of 0 query tokens
            # and seq_len 0 at the end; the kernel writes zeros for those.
            lens = cm.query_start_loc_cpu[1:num_decodes + 1] - cm.query_start_loc_cpu[:num_decodes]
            real = int((lens > 0).sum())
            if real and bool((lens[:real] == lens[0]).all()) and (real == num_decodes or not num_prefills):
                decode_query_len = int(lens[0])
        reason = None
        if decode_query_len == 0:
            reason = "decode requests with different query lengths in one batch"
        elif decode_query_len > BLASST_DECODE_MAX_QUERY_LEN:
            reason = f"{decode_query_len} query tokens per decode request (at most {BLASST_DECODE_MAX_QUERY_LEN})"
        blasst = self._blasst_factor_set and num_decodes > 0 and reason is None
        scheduler_metadata, max_num_splits = None, 0
        if self._fa3_schedule is not None and not blasst:
            scheduler_metadata, max_num_splits = self._fa3_schedule.plan(cm, fast_build)
        return BlackwellSparseMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            num_prefill_tokens=num_prefill_tokens,
            decode_query_len=decode_query_len,
            blasst_decode=blasst,
            dense_decode_reason=reason if self._blasst_factor_set and num_decodes else None,
            scheduler_metadata=scheduler_metadata,
            max_num_splits=max_num_splits,
        )

    def update_block_table(self, metadata, blk_table, slot_mapping):
        # A copy: vLLM hands the same metadata object to every KV-cache group with this
        # spec, and layers of earlier groups still hold it.
        new = copy.copy(metadata)
        new.block_table = blk_table
        new.slot_mapping = slot_mapping
        return new


class BlackwellSparseImpl(AttentionImpl[BlackwellSparseMetadata]):
    """Per-layer attention: cache write + FA3 / FA4 (or BLASST decode) over the paged cache."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unsupported_kwargs,
    ) -> None:
        refused = []
        if alibi_slopes is not None:
            refused.append("ALiBi")
        if sliding_window is not None:
            refused.append("sliding-window attention")
        if logits_soft_cap:
            refused.append("logits soft-capping")
        if sinks is not None:
            refused.append("attention sinks")
        if attn_type != AttentionType.DECODER:
            refused.append(f"attention type {attn_type!r} (decoder self-attention only)")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            refused.append(f"kv_cache_dtype={kv_cache_dtype!r} (accepted: {list(KV_CACHE_DTYPES)})")
        if unsupported_kwargs:
            refused.append(f"options {sorted(unsupported_kwargs)}")
        if refused:
            raise NotImplementedError(
                "the CUSTOM (blackwell_sparse) attention backend does not support: " + ", ".join(refused)
                + ". Use another --attention-backend for this model."
            )
        cfg = load_config()
        reasons = unavailable_feature_reasons(cfg)
        if reasons:
            raise ValueError("; ".join(reasons))
        self.config = cfg
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # Debugging: the kernel inputs' values checked before every eager BLASST launch.
        self.check_inputs = env_bool("VBS_CHECK_INPUTS")
        # VBS_BLASST_STATS: this layer's skip counters, allocated now (before vLLM captures
        # CUDA graphs) so that captured launches add into a fixed address.
        self.skip_counter = None
        self.largest_decode_workspace = None  # (splits, tokens) of the largest decode call, for memory profiling
        # Each decode row's factor, read by the kernel at run time (decode_factors.py).
        self.decode_factors = None
        self.precompile_plan = None  # (block_size, query lengths) of the decode kernels to build before serving
        if cfg.decode_threshold_scale_factor is not None:
            from vllm_blackwell_sparse import blasst_stats
            from vllm_blackwell_sparse.decode_factors import buffer_key, decode_factor_buffer, max_decode_requests

            rows = max_decode_requests()
            if torch.cuda.is_available():  # (unit tests build impls on machines without a GPU)
                self.decode_factors = decode_factor_buffer(buffer_key(
                    torch.cuda.current_device(), rows, cfg.decode_threshold_scale_factor))
            if blasst_stats.stats_enabled():
                self.skip_counter = blasst_stats.new_counter("decode", rows, torch.cuda.current_device())
            self.largest_decode_workspace = _largest_decode_workspace(rows)
            self.precompile_plan = _decode_precompile_plan()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        from vllm._custom_ops import reshape_and_cache_flash

        key_cache, value_cache = kv_cache.unbind(0)
        # key/value may be padded for CUDA graphs; the op writes slot_mapping.numel()
        # tokens and skips slots of -1.
        reshape_and_cache_flash(
            key, value, key_cache, value_cache, slot_mapping, self.kv_cache_dtype, layer._k_scale, layer._v_scale
        )

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: BlackwellSparseMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[num_tokens, Hq, D]``, kv_cache ``[2, num_blocks, block_size, Hkv, D]``,
        output ``[num_tokens, Hq, D]`` (written in place and returned)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the CUSTOM backend")
        if attn_metadata is None:  # vLLM's memory-profiling run
            if self.largest_decode_workspace is not None and query.is_cuda:
                self._touch_decode_workspace(query)
            if self.precompile_plan is not None:
                self._precompile_decode_kernels(query.dtype)
            return output.fill_(0)
        m = attn_metadata
        n = m.num_actual_tokens
        key_cache, value_cache = kv_cache.unbind(0)
        if self.config.decode_threshold_scale_factor is not None and m.num_decodes:
            if self._blasst_decode_ok(m, query.dtype, query.shape[0]):
                return self._forward_blasst_decode(layer, query, key_cache, value_cache, m, output)
        dense_paged_attention(
            query[:n],
            key_cache,
            value_cache,
            out=output[:n],
            cu_seqlens_q=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            softmax_scale=self.scale,
            scheduler_metadata=m.scheduler_metadata,
            num_splits=m.max_num_splits,
        )
        return output

    def _touch_decode_workspace(self, query: torch.Tensor) -> None:
        """Allocate (and free) the largest split workspace a decode call can take, so that
        vLLM's memory profiling, which runs with no metadata, counts it before sizing the
        KV cache: each call allocates its workspace from torch's caching allocator."""
        from vllm_blackwell_sparse.kernels.blasst_decode import decode_workspace

        splits, tokens = self.largest_decode_workspace
        if splits > 1:
            workspace = decode_workspace(splits, tokens, self.num_heads, self.head_size, query.device)
            del workspace

    def _precompile_decode_kernels(self, dtype: torch.dtype) -> None:
        """Build the BLASST decode variants this layer will launch (one split and several,
        each query length) now, during vLLM's profiling run: otherwise the first eager call
        of each variant (every mixed prefill+decode batch runs attention eagerly, and
        --enforce-eager every step) compiles it in the middle of serving, seconds long.
        The DSL's compile cache is per process, so the first layer pays for all."""
        plan, self.precompile_plan = self.precompile_plan, None
        if self.head_size not in BLASST_DECODE_HEAD_SIZES or dtype not in BLASST_DECODE_DTYPES:
            return
        from vllm_blackwell_sparse.kernels.blasst_decode import compile_blasst_combine, compile_blasst_decode

        block_size, query_lens = plan
        try:
            for next_n in query_lens:
                for final in (True, False):
                    compile_blasst_decode(
                        head_dim=self.head_size, group=self.num_heads // self.num_kv_heads, next_n=next_n,
                        block_size=block_size, dtype=dtype, has_threshold=True,
                        count_skips=self.skip_counter is not None, final_output=final,
                        factor_per_request=self.decode_factors is not None)
            compile_blasst_combine(head_dim=self.head_size, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - a shape the kernel refuses is reported at its first call
            warn_once(logger, f"BLASST decode kernels were not built ahead of serving ({type(e).__name__}: {e}); "
                              "they compile at first use")

    def _blasst_decode_ok(self, m: BlackwellSparseMetadata, dtype: torch.dtype, query_rows: int) -> bool:
        """Whether this batch's decode rows can run the BLASST kernel; if not, the whole
        batch runs dense attention and a one-time warning says why."""
        why = None
        if not m.blasst_decode:  # the builder decided from the query lengths
            why = m.dense_decode_reason or "the metadata was built without the decode factor"
        elif m.num_decodes * m.decode_query_len > query_rows:
            why = "fewer query rows than padded decode requests"
        elif self.head_size not in BLASST_DECODE_HEAD_SIZES or dtype not in BLASST_DECODE_DTYPES:
            why = f"head_size {self.head_size} / dtype {dtype}"
        if why:
            warn_once(logger, f"BLASST decode falls back to dense attention for some batches: {why}")
            return False
        return True

    def _forward_blasst_decode(self, layer, query, key_cache, value_cache, m: BlackwellSparseMetadata, output):
        """Decode rows (the batch is reordered decode-first) through the BLASST decode
        kernel, the prefill rows, if any, through dense attention.

        ``max_seq_len`` only sizes the kernel's grid (under CUDA graphs vLLM captures with
        max_model_len): the split ranges of a request depend on its own length alone."""
        from vllm_blackwell_sparse.kernels.blasst_decode import blasst_decode

        b = m.num_decodes
        nd = b * m.decode_query_len  # padding requests (CUDA graphs) included: they get zeros
        counts = None
        if self.skip_counter is not None:
            if self.skip_counter.layer == "?":
                self.skip_counter.layer = getattr(layer, "layer_name", "?")
            if b <= self.skip_counter.device_counts.shape[0]:
                counts = self.skip_counter.device_counts[:b]
            else:
                warn_once(logger, f"BLASST skip counters cover {self.skip_counter.device_counts.shape[0]} requests; "
                                  f"a batch of {b} decode requests is not counted")
        blasst_decode(
            query[:nd],
            key_cache,
            value_cache,
            m.block_table[:b],
            m.seq_lens[:b],
            softmax_scale=self.scale,
            threshold_scale_factor=(self.decode_factors[:b] if self.decode_factors is not None
                                    and b <= self.decode_factors.numel() else self.config.decode_threshold_scale_factor),
            next_n=m.decode_query_len,
            max_seq_len=m.max_seq_len,
            out=output[:nd],
            skip_counts=counts,
            check_values=self.check_inputs,
        )
        if m.num_prefills:
            n = m.num_actual_tokens
            dense_paged_attention(
                query[nd:n],
                key_cache,
                value_cache,
                out=output[nd:n],
                cu_seqlens_q=m.query_start_loc[b:] - nd,
                seq_lens=m.seq_lens[b:],
                block_table=m.block_table[b:],
                max_query_len=m.max_query_len,
                max_seq_len=m.max_seq_len,
                softmax_scale=self.scale,
            )
        return output


def fa4_unavailable_reason() -> str | None:
    """Why FA4 cannot run here, checked without importing its CUDA modules (this runs
    at backend selection, also in processes that must not touch CUDA)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return "vLLM is not importable"
    cute_iface = Path(list(spec.submodule_search_locations)[0]) / "vllm_flash_attn" / "cute" / "interface.py"
    if not cute_iface.exists():
        return f"FA4 (vllm.vllm_flash_attn.cute) is missing from this vLLM install ({cute_iface})"
    if importlib.util.find_spec("cutlass") is None:
        return "FA4 needs the CuTe DSL (pip install nvidia-cutlass-dsl), which is not installed"
    return None


@functools.cache
def dense_fa_version() -> int:
    """The FlashAttention version dense attention runs: 3 on sm90 when vLLM's FA3 is
    available (on the H200 it is 13-29% faster than FA4 on 16-token pages and within 2%
    at 128, docs/BENCHMARKS.md), else 4. Imports CUDA modules: call it on the GPU path
    only. Cached per process: it reads the current device, and a vLLM worker drives one
    GPU."""
    from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

    if torch.cuda.get_device_capability()[0] == 9 and is_fa_version_supported(3):
        return 3
    return 4


def dense_paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    softmax_scale: float,
    scheduler_metadata: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Causal varlen attention of ``q`` over the paged cache, dense, with FA3 or FA4
    (:func:`dense_fa_version`).

    Goes through vLLM's FlashAttention wrapper, the same call FLASH_ATTN makes with
    ``flash_attn_version`` 3 / 4, so both run identical kernels. ``scheduler_metadata``
    and ``num_splits`` as :class:`Fa3Schedule` planned them (FA3 only); without them
    (``num_splits=0``) the kernel chooses split-KV from ``max_seq_len``.
    """
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    extra = {"scheduler_metadata": scheduler_metadata} if scheduler_metadata is not None else {}
    return flash_attn_varlen_func(
        q=q,
        k=key_cache,
        v=value_cache,
        out=out,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max_query_len,
        seqused_k=seq_lens,
        max_seqlen_k=max_seq_len,
        softmax_scale=softmax_scale,
        causal=True,
        block_table=block_table,
        num_splits=num_splits,
        fa_version=dense_fa_version(),
        **extra,
    )


def _current_vllm_config():
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def _draft_tokens(cfg) -> int:
    return getattr(cfg.speculative_config, "num_speculative_tokens", None) or 0


def _largest_decode_workspace(max_requests: int) -> tuple[int, int] | None:
    """(splits, tokens) of the largest BLASST decode call this engine can make: every
    decode request (and its draft tokens) of max_model_len keys; None outside vLLM."""
    from vllm_blackwell_sparse.kernels.blasst_decode import DEFAULT_SPLIT_RULE, KV_TILE

    cfg = _current_vllm_config()
    if cfg is None:
        return None
    splits = DEFAULT_SPLIT_RULE.max_split_count(-(-cfg.model_config.max_model_len // KV_TILE))
    return splits, max_requests * (1 + _draft_tokens(cfg))


def _decode_precompile_plan() -> tuple[int, tuple[int, ...]] | None:
    """(block size, decode query lengths) of this engine's BLASST decode calls; None outside vLLM."""
    cfg = _current_vllm_config()
    if cfg is None:
        return None
    query_lens = tuple(sorted({1, 1 + _draft_tokens(cfg)} & set(range(1, BLASST_DECODE_MAX_QUERY_LEN + 1))))
    return cfg.cache_config.block_size, query_lens


class Fa3Schedule:
    """FA3's ahead-of-time schedule, prepared the way vLLM's own FLASH_ATTN builder does
    (``v1/attention/backends/flash_attn.py``): every step ``get_scheduler_metadata`` plans
    the batch on the GPU outside any graph, and with full CUDA graphs the plan lands in
    one preallocated buffer (its tail zeroed) and the split count is capped at
    ``flash_attn_max_num_splits_for_cuda_graph`` for batches up to the largest capture
    size, so the graph's intermediate buffers are sized at capture. Without full graphs
    the plan is a fresh tensor and FA3 picks the split count. Only for whole-batch
    dense calls (the plan covers every row).
    """

    def __init__(self, kv_cache_spec, vllm_config, device):
        from vllm.vllm_flash_attn.flash_attn_interface import get_scheduler_metadata

        self._plan = get_scheduler_metadata
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        compilation = vllm_config.compilation_config
        self.num_heads_q = model.get_num_attention_heads(parallel)
        self.num_heads_kv = model.get_num_kv_heads(parallel)
        self.head_dim = model.get_head_size()
        self.dtype = kv_cache_spec.dtype
        self.page_size = kv_cache_spec.block_size
        self.full_graphs = compilation.cudagraph_mode.has_full_cudagraphs()
        self.max_graph_tokens = compilation.max_cudagraph_capture_size
        self.buffer = None
        self.max_num_splits = 0
        if self.full_graphs:
            rows = max(vllm_config.scheduler_config.max_num_seqs, self.max_graph_tokens or 0)
            self.buffer = torch.zeros(1 + -(-rows // 4) * 4 * 4, dtype=torch.int32, device=device)
            self.max_num_splits = vllm_config.attention_config.flash_attn_max_num_splits_for_cuda_graph

    @classmethod
    def for_builder(cls, kv_cache_spec, vllm_config, device) -> "Fa3Schedule | None":
        """The schedule for a metadata builder, or None where dense attention is not FA3
        (or the builder is not on a GPU)."""
        if torch.device(device).type != "cuda" or dense_fa_version() != 3:
            return None
        return cls(kv_cache_spec, vllm_config, device)

    def plan(self, cm: CommonAttentionMetadata, fast_build: bool = False) -> tuple[torch.Tensor | None, int]:
        """``(scheduler_metadata, num_splits)`` for a whole-batch dense call. As vLLM: no
        plan for ``fast_build`` (the speculative proposer's builds) or under
        ``VLLM_BATCH_INVARIANT``, which also takes one split."""
        from vllm import envs as vllm_envs

        num_splits = 0
        if self.full_graphs and self.max_graph_tokens is not None and cm.num_actual_tokens <= self.max_graph_tokens:
            num_splits = self.max_num_splits
        if vllm_envs.VLLM_BATCH_INVARIANT:
            return None, 1
        if fast_build:
            return None, num_splits
        md = self._plan(
            batch_size=cm.num_reqs, max_seqlen_q=cm.max_query_len, max_seqlen_k=cm.max_seq_len,
            num_heads_q=self.num_heads_q, num_heads_kv=self.num_heads_kv, headdim=self.head_dim,
            cache_seqlens=cm.seq_lens, qkv_dtype=self.dtype, cu_seqlens_q=cm.query_start_loc,
            page_size=self.page_size, causal=True, window_size=(-1, -1), num_splits=num_splits,
        )
        if self.buffer is not None:
            n = md.shape[0]
            self.buffer[:n] = md
            self.buffer[n:] = 0  # stale entries past this plan would send CTAs to old work
            md = self.buffer[:n]
        return md, num_splits
