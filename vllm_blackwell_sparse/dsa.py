"""GVR top-k inside vLLM 0.26's DeepSeek-V3.2 sparse-attention (DSA) indexer.

With ``gvr_topk: true`` the indexer's *decode* top-k (``torch.ops._C.cooperative_topk``
/ ``persistent_topk``) becomes :func:`~vllm_blackwell_sparse.kernels.gvr_topk.gvr_topk`,
hinted with the same request's top-k of the previous decode step in the same layer.
Prefill top-k, the logits and everything else stay vLLM's. Off (the default), vLLM's
own top-k runs unchanged.

How it is wired (all of it vLLM glue; the kernel knows nothing of vLLM):

* ``register()`` calls :func:`install`: it adds our op to vLLM's piecewise splitting
  ops and arms post-import hooks, so nothing heavy is imported in processes that never
  load a DSA model (importing the indexer module costs ~3 s).
* When ``vllm.model_executor.layers.sparse_attn_indexer`` is imported, an
  out-of-tree subclass of ``SparseAttnIndexer`` is registered (``register_oot``). With
  GVR on, its forward calls our custom op ``vllm_blackwell_sparse::sparse_attn_indexer``
  (same schema as vLLM's): it runs vLLM's own indexer function with the decode top-k
  swapped for GVR, bound to this layer's hint table. An op of our own is needed
  because vLLM's op is dispatched to a function object we cannot wrap, and the layer
  must be known at run time (vLLM shares one ``topk_indices_buffer`` over all layers,
  so nothing of the previous step survives there).
* Hint state, per process: one ``[max_num_seqs + 1, k]`` int32 table per indexer
  layer (the extra row takes padded rows' writes), plus a row -> slot map rewritten
  before every step. Memory: ``layers x (max_num_seqs + 1) x k x 4`` bytes (e.g. 61 x
  257 x 2048 x 4 B = 122 MiB for V3.2 at 256 sequences), allocated at model load, so
  vLLM's memory profiling counts it.
* Rows find their slot by request id: after the V1 ``GPUModelRunner._update_states``
  (which condenses and reorders the batch, decode rows first) the map is rebuilt from
  ``input_batch.req_ids`` and copied to the GPU inside vLLM's input-prep
  synchronisation, so CUDA-graph replays read fresh slots at fixed addresses. Finished
  requests free their slot; a new request reads no hint until its first decode step
  has written one. A wrong or missing hint only costs speed: GVR is exact for any hint.

Diagnostics: ``VBS_GVR_STATS=1`` adds, per layer, counters of rows, hinted rows, hint
hits (the hint is this request's previous decode step, checked on the GPU with the
sequence length stored next to the hint), the overlap |previous ∩ current| / k and
rows with a tie at the k-th value; read them with :func:`gvr_stats`. They cost extra
kernels (a sort and a top-k per layer): for tests and calibration, not serving.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Mapping

import torch

from vllm_blackwell_sparse.envs import env_bool
from vllm_blackwell_sparse.util import get_logger, warn_once

# A child of vLLM's "vllm" logger: these lines come from vLLM's worker processes, where
# only that logger has a handler (ours would drop INFO), and read like vLLM's own.
logger = get_logger(__name__)

INDEXER_MODULE = "vllm.model_executor.layers.sparse_attn_indexer"
RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
OP_NAMESPACE = "vllm_blackwell_sparse"
OP_NAME = "sparse_attn_indexer"
QUALIFIED_OP = f"{OP_NAMESPACE}::{OP_NAME}"
STATS_ENV = "VBS_GVR_STATS"
# The decode top-k entry points of vLLM 0.26's indexer that GVR replaces (same schema:
# logits, lengths, output, workspace, k, max_seq_len).
VLLM_DECODE_TOPK_OPS = ("cooperative_topk", "persistent_topk")


# --------------------------------------------------------------------------------------
# Installation (runs in register(): cheap, idempotent, no CUDA)
# --------------------------------------------------------------------------------------

_installed = {"done": False}
_lock = threading.Lock()


def install() -> None:
    """Arm the DSA hook in this process. Whether GVR runs is decided per model, from
    its ``VllmConfig``, when the indexer layers are built."""
    with _lock:
        if _installed["done"]:
            return
        _add_splitting_op()
        _after_import(INDEXER_MODULE, _patch_indexer_module)
        _after_import(RUNNER_MODULE, _patch_runner_module)
        _installed["done"] = True


def is_installed() -> bool:
    """Whether :func:`install` completed in this process."""
    return _installed["done"]


def _add_splitting_op() -> None:
    # Piecewise CUDA graphs must run our op eagerly, like vLLM's own indexer op (its
    # Python control flow depends on the batch). The frontend copies this list into
    # ``splitting_ops`` when it builds the config, which happens after plugins load.
    # This happens with gvr_topk off too (no config exists yet): for other models the op
    # never appears in the graph, but the default splitting_ops (and the compile-cache
    # hash) gain an entry, and a hand-written splitting_ops list that should count as
    # "contains every attention op" must now include it.
    from vllm.config.compilation import CompilationConfig

    if QUALIFIED_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(QUALIFIED_OP)


_post_import: dict[str, Callable[[Any], None]] = {}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a patch function right after a module has been executed (first import)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _post_import:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, _post_import.pop(fullname))
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self._loader, self._patch = loader, patch

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_patch(self._patch, module)


_finder = _PostImportFinder()


def _after_import(name: str, patch: Callable[[Any], None]) -> None:
    module = sys.modules.get(name)
    if module is not None:
        _run_patch(patch, module)
        return
    _post_import[name] = patch
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _run_patch(patch, module) -> None:
    try:
        patch(module)
    except Exception:  # never break vLLM for users who do not use GVR
        _hook_failures.append(module.__name__)
        logger.exception(
            "vllm-blackwell-sparse: patching %s failed; gvr_topk=true will be IGNORED (vLLM's own top-k runs)",
            module.__name__,
        )


_hook_failures: list[str] = []


def hook_problem() -> str | None:
    """Why ``gvr_topk`` cannot fully act in this process (a patch failed), or None."""
    if INDEXER_MODULE in _hook_failures:
        return f"patching {INDEXER_MODULE} failed (logged above), so vLLM's own top-k runs"
    if _hook_failures:
        return f"patching {', '.join(_hook_failures)} failed (logged above), so GVR runs without hints"
    return None


# --------------------------------------------------------------------------------------
# The indexer layer and our op
# --------------------------------------------------------------------------------------


def _patch_indexer_module(mod) -> None:
    from torch.library import Library
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture
    from vllm.utils.torch_utils import _resolve_layer_name, direct_register_custom_op

    vllm_indexer = mod.sparse_attn_indexer  # the function vLLM's own op dispatches to

    # Outermost, as on vLLM's function: under breakable CUDA graphs the op is replayed
    # eagerly, and what is replayed must be this function (with GVR swapped in), not
    # vLLM's inner one.
    @eager_break_during_capture
    def gvr_sparse_attn_indexer(hidden_states, k_cache_prefix, *args, **kwargs):
        layer = _STATE.layer(_resolve_layer_name(k_cache_prefix))
        with _decode_topk_replaced_by(layer):
            return vllm_indexer(hidden_states, k_cache_prefix, *args, **kwargs)

    # Same parameters, annotations and schema as vLLM's op (inspect follows __wrapped__).
    gvr_sparse_attn_indexer.__wrapped__ = vllm_indexer
    library = Library(OP_NAMESPACE, "FRAGMENT")
    direct_register_custom_op(
        op_name=OP_NAME,
        op_func=gvr_sparse_attn_indexer,
        mutates_args=["topk_indices_buffer"],
        fake_impl=mod.sparse_attn_indexer_fake,
        target_lib=library,
    )
    _keepalive.append(library)  # the op lives as long as its Library object

    base = mod.SparseAttnIndexer

    class GvrSparseAttnIndexer(base):
        """vLLM's indexer; with ``gvr_topk`` on, its decode top-k is GVR with hints."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gvr_layer = _STATE.add_layer_if_enabled(self)

        def forward_cuda(self, hidden_states, q_quant, k, weights):
            if self.gvr_layer is None:
                return super().forward_cuda(hidden_states, q_quant, k, weights)
            q_values, q_scale = q_quant if isinstance(q_quant, tuple) else (q_quant, None)
            return torch.ops.vllm_blackwell_sparse.sparse_attn_indexer(  # OP_NAMESPACE, OP_NAME
                hidden_states,
                mod._encode_layer_name(self.k_cache.prefix),
                self.k_cache.kv_cache,
                q_values,
                q_scale,
                k,
                weights,
                self.quant_block_size,
                self.scale_fmt,
                self.topk_tokens,
                self.head_dim,
                self.max_model_len,
                self.max_total_seq_len,
                self.topk_indices_buffer,
                self.skip_k_cache_insert,
                self.use_pcp,
                self.use_fp4_cache,
                self.dcp_rank,
                self.dcp_world_size,
                self.cp_kv_cache_interleave_size,
            )

    base.register_oot(GvrSparseAttnIndexer)
    # register_oot renames the class to the in-tree class name; keep vLLM's op name so
    # ``custom_ops=["+sparse_attn_indexer"]`` style settings still refer to this layer.
    GvrSparseAttnIndexer.name = base.name


_keepalive: list = []


_swap_lock = threading.Lock()


@contextmanager
def _decode_topk_replaced_by(layer: "GvrLayer"):
    """Inside vLLM's indexer function, its decode top-k ops call ``layer`` instead.
    vLLM looks them up on ``torch.ops._C`` at call time, so swapping the attributes for
    the duration of the call is enough; they are restored even on error.

    The swap is process-global, so it is only correct while one thread runs indexer
    layers. That holds because GVR is switched off where vLLM runs micro-batches in
    threads (dual-batch overlap, :func:`gvr_unsupported_config`); a second entry while
    one is inside (another thread, or a nested call) is refused rather than left to
    interleave the swaps."""
    if not _swap_lock.acquire(blocking=False):
        raise RuntimeError(
            "vllm-blackwell-sparse: a GVR indexer layer ran while another was inside vLLM's indexer "
            "(two threads, e.g. micro-batching, or a nested call); run without gvr_topk in this configuration"
        )
    namespace = torch.ops._C
    originals = {}
    try:
        for name in VLLM_DECODE_TOPK_OPS:
            op = getattr(namespace, name, None)
            if op is not None:  # a build without one
                originals[name] = op
                setattr(namespace, name, layer.decode_topk_replacing(op))
        yield
    finally:
        for name, original in originals.items():
            setattr(namespace, name, original)
        _swap_lock.release()


# --------------------------------------------------------------------------------------
# The V1 model runner: row -> slot map before every step
# --------------------------------------------------------------------------------------


def _patch_runner_module(mod) -> None:
    runner_cls = mod.GPUModelRunner
    vllm_update_states = runner_cls._update_states
    if getattr(vllm_update_states, "_vbs_wrapped", False):
        return

    def _update_states(self, scheduler_output):
        result = vllm_update_states(self, scheduler_output)
        if _STATE.active:
            _STATE.on_step(
                self.input_batch.req_ids,
                scheduler_output.num_scheduled_tokens,
                scheduler_output.finished_req_ids,
            )
        return result

    vllm_dummy_run = runner_cls._dummy_run

    def _dummy_run(self, *args, **kwargs):
        # Profiling, graph capture and idle data-parallel ranks run the model without
        # _update_states: their rows must neither read nor overwrite real requests' hints.
        # clear_rows() fills the device buffers on the stream and leaves the pinned
        # staging buffers alone: this runs outside vLLM's input-prep synchronisation,
        # where the previous step's copy out of them may still be in flight.
        if _STATE.active:
            _STATE.clear_rows()
        return vllm_dummy_run(self, *args, **kwargs)

    _update_states._vbs_wrapped = _dummy_run._vbs_wrapped = True
    _update_states.__wrapped__ = vllm_update_states
    _dummy_run.__wrapped__ = vllm_dummy_run
    runner_cls._update_states = _update_states
    runner_cls._dummy_run = _dummy_run
    _STATE.runner_hooked = True


# --------------------------------------------------------------------------------------
# Slots and hint state
# --------------------------------------------------------------------------------------


class SlotMap:
    """Request id -> hint slot in ``[0, num_slots)``; CPU only (tested on CPU).

    A slot is *valid* once its request has been through the indexer's decode top-k (its
    top-k was written); until then the request reads no hint. Those rows are the leading
    run of rows with one scheduled token (vLLM orders decodes first and splits decode
    from prefill at the first longer row). Finished requests free their slot.
    When all slots are taken (more requests alive than slots, e.g. preempted ones still
    holding one), the least recently scheduled request not in the current batch loses
    its slot; a request that finds none gets no hint (``-1``), which only costs speed.
    """

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._slot: OrderedDict[str, int] = OrderedDict()  # least recently scheduled first
        self._valid = [False] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    def step(
        self, req_ids: Iterable[str | None], num_scheduled_tokens: Mapping[str, int], finished: Iterable[str]
    ) -> tuple[list[int], list[int]]:
        """Update for one step; returns per batch row (read slot or -1, write slot or -1).

        The read slot is the request's slot if it holds a hint from an earlier decode
        step; the write slot is its slot (where this step's decode top-k goes)."""
        for req_id in finished:
            self._release(req_id)
        rows = list(req_ids)
        current = {r for r in rows if r is not None}
        read, write = [], []
        in_decode_prefix = True
        for req_id in rows:
            in_decode_prefix = in_decode_prefix and num_scheduled_tokens.get(req_id, 0) == 1
            slot = self._slot_for(req_id, current) if req_id is not None else None
            if slot is None:
                read.append(-1)
                write.append(-1)
                continue
            read.append(slot if self._valid[slot] else -1)
            write.append(slot)
            if in_decode_prefix:  # goes through the decode top-k: writes its hint in every layer
                self._valid[slot] = True
        return read, write

    def slot_of(self, req_id: str) -> int | None:
        return self._slot.get(req_id)

    def _slot_for(self, req_id: str, current: set) -> int | None:
        slot = self._slot.get(req_id)
        if slot is not None:
            self._slot.move_to_end(req_id)
            return slot
        if not self._free:
            victim = next((r for r in self._slot if r not in current), None)
            if victim is None:
                return None
            self._release(victim)
        slot = self._free.pop()
        self._valid[slot] = False
        self._slot[req_id] = slot
        return slot

    def _release(self, req_id: str) -> None:
        slot = self._slot.pop(req_id, None)
        if slot is not None:
            self._valid[slot] = False
            self._free.append(slot)


STAT_FIELDS = ("rows", "rows_with_hint", "hint_hits", "overlap_sum", "cutoff_ties")


class GvrLayer:
    """One indexer layer's hint table and (optionally) its statistics counters."""

    def __init__(self, state: "GvrHintState", name: str, k: int, device: torch.device):
        self.state, self.name, self.k = state, name, k
        # Slot num_slots is the sink of rows without a request (padding); never read.
        self.hints = torch.full((state.num_slots + 1, k), -1, dtype=torch.int32, device=device)
        self.stats = None
        if state.collect_stats:  # counters, and each slot's sequence length at its last write
            self.stats = torch.zeros(len(STAT_FIELDS), dtype=torch.int64, device=device)
            self.hint_len = torch.zeros(state.num_slots + 1, dtype=torch.int32, device=device)

    def decode_topk_replacing(self, vllm_op):
        def decode_topk(logits, lengths, output, workspace, k, max_seq_len):
            why = self._why_not_gvr(logits, lengths, output, k)
            if why is not None:
                _warn_once(f"layer {self.name} uses vLLM's decode top-k: {why}")
                return vllm_op(logits, lengths, output, workspace, k, max_seq_len)
            self.run(logits, lengths, output, k)

        return decode_topk

    def _why_not_gvr(self, logits, lengths, output, k) -> str | None:
        if k != self.k:
            return f"k={k} differs from the layer's {self.k}"
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
            return f"logits {logits.dtype} {tuple(logits.shape)} stride {logits.stride()} (needs fp32 rows, unit column stride)"
        if lengths.dtype != torch.int32 or lengths.numel() != logits.shape[0]:
            return f"lengths {lengths.dtype} {tuple(lengths.shape)} (needs int32, one per row)"
        if output.dtype != torch.int32 or not output.is_contiguous() or tuple(output.shape) != (logits.shape[0], k):
            return f"output {output.dtype} {tuple(output.shape)} (needs contiguous int32 [rows, k])"
        if logits.shape[0] > self.state.max_rows:
            return f"{logits.shape[0]} rows exceed the {self.state.max_rows} the hint state was sized for"
        return None

    def run(self, logits: torch.Tensor, lengths: torch.Tensor, output: torch.Tensor, k: int) -> None:
        from vllm_blackwell_sparse.kernels.gvr_topk import gvr_topk

        rows = logits.shape[0]
        if not self.state.use_hints or (lengths.dim() == 2 and lengths.shape[1] != 1):
            # Several query tokens per request (MTP): hints are kept per request, not
            # per token, so these rows run without one.
            gvr_topk(logits, lengths, k, out=output)
            return
        read = self.state.read_slot[:rows]
        write = self.state.write_slot[:rows]
        gvr_topk(logits, lengths, k, hint_table=self.hints, row_slot=read, out=output)
        if self.stats is not None:
            self._count(logits, lengths.reshape(-1), output, read, write)
            self.hint_len.index_copy_(0, write, lengths.reshape(-1))
        self.hints.index_copy_(0, write, output)

    def _count(self, logits, lengths, output, read, write) -> None:
        live = write < self.state.num_slots
        hinted = live & (read >= 0)
        slot = read.clamp(min=0).long()
        hit = hinted & (self.hint_len[slot] == lengths - 1)
        from vllm_blackwell_sparse.reference.topk import topk_overlap_counts

        overlap = topk_overlap_counts(self.hints[slot], output)
        ties = cutoff_tie_rows(logits, lengths, self.k)
        self.stats += torch.stack(
            [
                live.sum(),
                hinted.sum(),
                hit.sum(),
                torch.where(hit, overlap, 0).sum(),
                (live & ties).sum(),
            ]
        )


class GvrHintState:
    """The per-process GVR state: layers, slot map and the GPU row -> slot buffers."""

    def __init__(self):
        self.layers: dict[str, GvrLayer] = {}
        self._owner = None  # the VllmConfig the layers belong to
        self.use_hints = True
        self.active = False
        self.runner_hooked = False
        self.collect_stats = env_bool(STATS_ENV)
        self.num_slots = 0
        self.max_rows = 0
        self.slots: SlotMap | None = None
        self.read_slot: torch.Tensor | None = None
        self.write_slot: torch.Tensor | None = None
        self._host_read: torch.Tensor | None = None
        self._host_write: torch.Tensor | None = None

    def add_layer_if_enabled(self, indexer) -> GvrLayer | None:
        """Called by each indexer layer's ``__init__``; returns its GVR layer or None."""
        from vllm.config import get_current_vllm_config

        from vllm_blackwell_sparse.config import load_config

        vllm_config = get_current_vllm_config()
        if not load_config(vllm_config).gvr_topk:
            return None
        if self.layers and belongs_to_another_model(self._owner, vllm_config):
            self.reset()  # another model in this process: drop the previous one's state
        if self._owner is None:
            self._owner = vllm_config
        why = gvr_unsupported_config(vllm_config) or gvr_unsupported_reason(
            indexer.topk_tokens, indexer.topk_indices_buffer.device)
        if why is not None:
            _warn_once(f"gvr_topk is on but vLLM's decode top-k stays: {why}")
            return None
        device = indexer.topk_indices_buffer.device
        if not self.layers:
            self._allocate_shared(vllm_config.scheduler_config.max_num_seqs, indexer.topk_indices_buffer.shape[0], device)
            _compile_for(indexer.topk_tokens, indexer.max_model_len)
            # With speculative decoding, decode rows are tokens, not requests (and may be
            # flattened to one row per token), and draft layers would share the map.
            self.use_hints = vllm_config.speculative_config is None
            if not self.use_hints:
                _warn_once("speculative decoding is on: GVR runs without hints (exact, slower)")
        name = indexer.k_cache.prefix
        layer = GvrLayer(self, name, indexer.topk_tokens, device)
        self.layers[name] = layer
        if len(self.layers) == 1:
            logger.info(
                "vllm-blackwell-sparse: GVR top-k replaces the DSA decode top-k (k=%d, %d hint slots%s)",
                indexer.topk_tokens,
                self.num_slots,
                ", statistics on" if self.collect_stats else "",
            )
        return layer

    def reset(self) -> None:
        """Forget the layers, slots and buffers (the runner hook stays installed)."""
        hooked = self.runner_hooked
        self.__init__()
        self.runner_hooked = hooked

    def _allocate_shared(self, max_num_seqs: int, max_rows: int, device) -> None:
        self.num_slots = max_num_seqs
        self.max_rows = max_rows
        self.slots = SlotMap(self.num_slots)
        self.read_slot = torch.full((max_rows,), -1, dtype=torch.int32, device=device)
        self.write_slot = torch.full((max_rows,), self.num_slots, dtype=torch.int64, device=device)  # index_copy_ index
        # Pinned staging for the per-step copy. Reuse is safe: with async scheduling,
        # synchronize_input_prep() (around _update_states) waits for the previous step's
        # input copies; without it, each step ends with a blocking copy of the sampled
        # tokens, after which our earlier copies have completed.
        pin = torch.device(device).type == "cuda"
        self._host_read = torch.empty(max_rows, dtype=torch.int32, device="cpu", pin_memory=pin)
        self._host_write = torch.empty(max_rows, dtype=torch.int64, device="cpu", pin_memory=pin)
        self.active = True
        if not self.runner_hooked:
            _warn_once(
                "the V1 GPUModelRunner hook is not installed (another model runner is in use?): "
                "GVR runs without hints (exact, slower)"
            )

    def layer(self, name: str) -> GvrLayer:
        try:
            return self.layers[name]
        except KeyError:
            raise RuntimeError(f"vllm-blackwell-sparse: no GVR state for indexer layer {name!r}") from None

    def clear_rows(self) -> None:
        """Every row: no hint, writes to the sink (for forwards without a scheduled batch).
        Device-side fills, ordered after earlier copies on the stream; the pinned staging
        buffers are not touched (a copy out of them may be pending)."""
        self.read_slot.fill_(-1)
        self.write_slot.fill_(self.num_slots)

    def on_step(self, req_ids, num_scheduled_tokens, finished) -> None:
        self._copy_rows(*self.slots.step(req_ids, num_scheduled_tokens, finished))

    def _copy_rows(self, read: list[int], write: list[int]) -> None:
        n = min(len(read), self.max_rows)
        # Rows past the batch (CUDA-graph padding) read no hint and write to the sink slot.
        self._host_read.fill_(-1)
        self._host_write.fill_(self.num_slots)
        if n:
            self._host_read[:n] = torch.tensor(read[:n], dtype=torch.int32)
            self._host_write[:n] = torch.tensor([w if w >= 0 else self.num_slots for w in write[:n]])
        self.read_slot.copy_(self._host_read, non_blocking=True)
        self.write_slot.copy_(self._host_write, non_blocking=True)

    def stats(self, reset: bool = False) -> dict[str, dict[str, float]]:
        out = {}
        for name, layer in self.layers.items():
            if layer.stats is None:
                continue
            values = dict(zip(STAT_FIELDS, layer.stats.tolist()))
            rows, hits = values["rows"], values["hint_hits"]
            values["hit_rate"] = hits / rows if rows else 0.0
            values["overlap"] = values["overlap_sum"] / (hits * layer.k) if hits else 0.0
            out[name] = values
            if reset:
                layer.stats.zero_()
        return out


_STATE = GvrHintState()


def belongs_to_another_model(owner, vllm_config) -> bool:
    """Whether ``vllm_config`` builds a different model than ``owner`` did. A speculative
    drafter is built under a copy of the target's config (same ``model_config``) and
    shares the target's state; a second ``LLM`` in the process has its own."""
    return owner is not None and getattr(owner, "model_config", None) is not getattr(vllm_config, "model_config", None)


def gvr_stats(reset: bool = False) -> dict[str, dict[str, float]]:
    """Per indexer layer: rows, rows_with_hint, hint_hits, hit_rate, overlap (mean
    |previous ∩ current| / k over hit rows) and cutoff_ties (rows whose k-th and
    (k+1)-th values are equal). Empty unless ``VBS_GVR_STATS=1`` and GVR is on. In the
    worker process (``LLM.collective_rpc`` or ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    return _STATE.stats(reset)


NVIDIA_DSV32_MODULE = "vllm.models.deepseek_v32.nvidia"


def gvr_unsupported_config(vllm_config) -> str | None:
    """Why this engine configuration keeps vLLM's top-k although ``gvr_topk`` is on."""
    parallel = getattr(vllm_config, "parallel_config", None)
    if parallel is not None and (getattr(parallel, "enable_dbo", False) or getattr(parallel, "ubatch_size", 0) > 1):
        # Micro-batches run in threads, each with rows from 0 against one row -> slot map,
        # and the top-k swap is process-global.
        return "micro-batching (--enable-dbo / ubatch_size) is on"
    overrides = getattr(getattr(vllm_config, "model_config", None), "model_class_overrides", None) or {}
    for cls, target in overrides.items():
        if str(target).startswith(NVIDIA_DSV32_MODULE):
            # That model calls vLLM's indexer function directly, past our layer's forward.
            return f"model_class_overrides routes {cls} to {target}, whose attention calls the indexer directly"
    return None


def gvr_unsupported_reason(k: int, device: torch.device) -> str | None:
    from vllm_blackwell_sparse.kernels.gvr_topk import SUPPORTED_K

    if k not in SUPPORTED_K:
        return f"index_topk={k} (GVR supports {SUPPORTED_K})"
    if device.type != "cuda":
        return f"the indexer runs on {device.type}, GVR needs CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) not in ((9, 0), (10, 0)):
        return f"GPU capability {major}.{minor} (GVR is built for sm_90a and sm_100a)"
    if major == 10 and not env_bool("VBS_ENABLE_UNVERIFIED_SM100"):
        return ("sm_100 (Blackwell): GVR is compile-checked only there and has never run; "
                "set VBS_ENABLE_UNVERIFIED_SM100=1 to run it unverified")
    return None


def _compile_for(k: int, logits_width: int) -> None:
    # Compile at model load, not at the first decode step (or inside graph capture).
    from vllm_blackwell_sparse.kernels.gvr_topk import (
        cluster_columns_per_thread,
        compile_gvr_topk,
        compile_gvr_topk_cluster,
        default_kernels_for_width,
    )

    for vec_width in (1, 4):  # 4 for 16-byte aligned logits rows (vLLM's usual case)
        compile_gvr_topk(k, has_hint=True, use_row_slot=True, vec_width=vec_width)
        compile_gvr_topk(k, has_hint=False, use_row_slot=False, vec_width=vec_width)
    # Every kernel gvr_topk's default choice can pick for aligned rows of the indexer's
    # width (max_model_len), whatever the number of rows.
    for ctas, threads, smem_per_thread in default_kernels_for_width(logits_width):
        for has_hint in (True, False):
            if ctas == 1:
                compile_gvr_topk(k, has_hint=has_hint, use_row_slot=has_hint, threads=threads, vec_width=4)
            else:
                per_thread = cluster_columns_per_thread(logits_width, ctas, threads)
                compile_gvr_topk_cluster(
                    k, has_hint=has_hint, use_row_slot=has_hint, per_thread=per_thread, ctas_per_row=ctas, threads=threads,
                    smem_per_thread=smem_per_thread,
                )
    if torch.cuda.get_device_capability()[0] == 10:
        _warn_once("GVR on sm_100 runs unverified (VBS_ENABLE_UNVERIFIED_SM100=1): compile-checked only, never run "
                   "on Blackwell")


def _warn_once(message: str) -> None:
    warn_once(logger, message)


# --------------------------------------------------------------------------------------
# Statistics helpers (plain torch, capture-safe; CPU-tested)
# --------------------------------------------------------------------------------------


def cutoff_tie_rows(logits: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th largest valid values are equal: the top-k *set*
    is then not unique and kernels may legitimately choose different indices."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    valid = cols[None, :] < lengths[:, None]
    masked = torch.where(valid, logits, float("-inf"))
    if logits.shape[1] <= k:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    top = masked.topk(k + 1, dim=1).values
    return (lengths > k) & (top[:, k - 1] == top[:, k])
