"""The DSA indexer hook on CPU: slot bookkeeping, statistics helpers, the op swap and
the hook's installation into the real vLLM (in a subprocess, so this process stays clean).
The end-to-end run with the tiny DeepSeek-V3.2 is tests/gpu/test_dsa_gvr.py."""

import random
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_blackwell_sparse import dsa
from vllm_blackwell_sparse.dsa import SlotMap, cutoff_tie_rows
from vllm_blackwell_sparse.reference.topk import topk_overlap_counts


def test_slot_map_reads_a_hint_only_after_a_decode_step():
    slots = SlotMap(4)
    # step 1: b decodes (a 1-token row, first as vLLM orders them), a prefills
    read, write = slots.step(["b", "a"], {"a": 500, "b": 1}, [])
    assert read == [-1, -1] and write[0] != write[1] and min(write) >= 0
    slot_b, slot_a = write
    # step 2: both decode; only b wrote a hint in step 1
    read2, write2 = slots.step(["a", "b"], {"a": 1, "b": 1}, [])  # rows in another order
    assert write2 == [slot_a, slot_b]
    assert read2 == [-1, slot_b]
    # step 3: both have written
    read3, _ = slots.step(["b", "a"], {"a": 1, "b": 1}, [])
    assert read3 == [slot_b, slot_a]


def test_slot_map_a_one_token_row_after_a_longer_row_writes_no_hint():
    # vLLM's indexer takes the decode path only for the leading run of 1-token rows; a
    # 1-token chunk after a longer row goes through prefill and writes nothing.
    slots = SlotMap(4)
    slots.step(["a", "b", "c"], {"a": 1, "b": 300, "c": 1}, [])
    read, _ = slots.step(["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, [])
    assert read[0] >= 0 and read[1] == -1 and read[2] == -1


def test_slot_map_frees_finished_and_never_hands_out_a_stale_hint():
    slots = SlotMap(2)
    slots.step(["a", "b"], {"a": 1, "b": 1}, [])
    slot_a = slots.slot_of("a")
    read, write = slots.step(["b", "c"], {"b": 1, "c": 300}, ["a"])  # a finished, c arrives
    assert slots.slot_of("a") is None and slots.slot_of("c") == slot_a
    assert read[1] == -1, "c reuses a's slot but must not read a's hint"
    assert write[1] == slot_a


def test_slot_map_evicts_the_least_recent_absent_request_and_degrades_to_no_hint():
    slots = SlotMap(2)
    slots.step(["a", "b"], {"a": 1, "b": 1}, [])
    slots.step(["b"], {"b": 1}, [])  # a is preempted (absent, not finished)
    read, write = slots.step(["b", "c"], {"b": 1, "c": 1}, [])
    assert slots.slot_of("a") is None and write[1] >= 0 and read[1] == -1
    # three live requests in two slots: the third gets none (no hint, writes nowhere)
    read, write = slots.step(["b", "c", "d"], {"b": 1, "c": 1, "d": 1}, [])
    assert read[2] == -1 and write[2] == -1
    assert read[0] >= 0 and read[1] >= 0


def test_slot_map_fuzz_invariants():
    rng = random.Random(0)
    slots = SlotMap(8)
    alive, next_id, valid_owner = [], 0, {}
    for _ in range(300):
        finished = [r for r in alive if rng.random() < 0.15]
        alive = [r for r in alive if r not in finished]
        while len(alive) < 10 and rng.random() < 0.7:
            alive.append(f"r{next_id}")
            next_id += 1
        batch = rng.sample(alive, min(len(alive), rng.randint(0, 8)))
        tokens = {r: rng.choice([1, 1, 1, 17]) for r in batch}
        read, write = slots.step(batch, tokens, finished)
        live_slots = [w for w in write if w >= 0]
        assert len(live_slots) == len(set(live_slots)), "two rows share a slot"
        for r, rs, ws in zip(batch, read, write):
            if rs >= 0:
                assert rs == ws and valid_owner.get(rs) == r, "a hint read from another request's slot"
        prefix = True
        for r, ws in zip(batch, write):
            prefix = prefix and tokens[r] == 1  # only the leading 1-token rows reach the decode top-k
            if ws >= 0 and prefix:
                valid_owner[ws] = r
            elif ws >= 0 and valid_owner.get(ws) != r:
                valid_owner.pop(ws, None)


def test_topk_overlap_counts_common_indices():
    gen = torch.Generator().manual_seed(1)
    rows, k, n = 16, 64, 300
    prev = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(rows)]).int()
    cur = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(rows)]).int()
    prev[3, 10:] = -1  # short rows: -1 padding never counts
    cur[3, 20:] = -1
    cur[5] = prev[5].flip(0)
    got = topk_overlap_counts(prev, cur)
    for r in range(rows):
        a = {int(x) for x in prev[r] if x >= 0}
        b = {int(x) for x in cur[r] if x >= 0}
        assert int(got[r]) == len(a & b)
    assert int(got[5]) == k


def test_cutoff_tie_rows_sees_ties_only_inside_the_valid_length():
    k, n = 4, 12
    logits = torch.randn(5, n)
    logits[1, [2, 7]] = 10.0  # tie at the top, not at the cutoff
    logits[2, :] = torch.arange(n, dtype=torch.float32)
    logits[2, 3] = logits[2, 11 - 4]  # the 4th and 5th largest equal (columns 8 and 3 -> values 7 and 7)
    logits[2, 8] = 7.0
    logits[3, :] = 1.0  # constant row
    lens = torch.tensor([n, n, n, n, 3], dtype=torch.int32)  # row 4: shorter than k, no cutoff
    got = cutoff_tie_rows(logits, lens, k).tolist()
    assert got == [False, False, True, True, False]


class _FakeLayer:
    def __init__(self):
        self.calls = []

    def decode_topk_replacing(self, original):
        def fn(*args):
            self.calls.append((original, args))
            return "gvr"

        return fn


def test_decode_topk_is_swapped_only_inside_the_call_and_restored_on_error(monkeypatch):
    ns = torch.ops._C
    sentinels = {name: (lambda *a, _n=name: f"vllm-{_n}") for name in dsa.VLLM_DECODE_TOPK_OPS}
    for name, fn in sentinels.items():
        monkeypatch.setattr(ns, name, fn, raising=False)
    layer = _FakeLayer()
    with dsa._decode_topk_replaced_by(layer):
        assert ns.persistent_topk(1, 2) == "gvr" and ns.cooperative_topk(3) == "gvr"
    assert [orig for orig, _ in layer.calls] == [sentinels["persistent_topk"], sentinels["cooperative_topk"]]
    assert ns.persistent_topk() == "vllm-persistent_topk"
    with pytest.raises(RuntimeError):
        with dsa._decode_topk_replaced_by(layer):
            raise RuntimeError("boom")
    assert ns.cooperative_topk() == "vllm-cooperative_topk"


def test_gvr_layer_falls_back_to_vllm_for_inputs_it_does_not_take():
    state = dsa.GvrHintState()
    state.num_slots, state.max_rows = 4, 8
    layer = dsa.GvrLayer(state, "model.layers.0.indexer", 512, torch.device("cpu"))
    calls = []
    fn = layer.decode_topk_replacing(lambda *a: calls.append(a))
    logits = torch.randn(2, 1000, dtype=torch.bfloat16)
    out = torch.empty(2, 512, dtype=torch.int32)
    fn(logits, torch.full((2, 1), 1000, dtype=torch.int32), out, None, 512, 1000)
    assert len(calls) == 1, "bf16 logits must go to vLLM's kernel"
    why = layer._why_not_gvr(logits.float(), torch.zeros(2, 1, dtype=torch.int32), out, 1024)
    assert "k=1024" in why
    assert layer._why_not_gvr(torch.randn(9, 10), torch.zeros(9, dtype=torch.int32), torch.empty(9, 512, dtype=torch.int32), 512)


def test_install_hooks_the_real_vllm_lazily():
    """register() must not import the indexer; importing it later installs the subclass,
    our op (with vLLM's schema) and the runner hook; gvr_topk off keeps vLLM's class."""
    code = textwrap.dedent(
        """
        import sys, torch
        from vllm_blackwell_sparse import plugin
        assert plugin.register()
        assert "vllm.model_executor.layers.sparse_attn_indexer" not in sys.modules
        assert "vllm.v1.worker.gpu_model_runner" not in sys.modules
        from vllm.config.compilation import CompilationConfig
        assert "vllm_blackwell_sparse::sparse_attn_indexer" in CompilationConfig._attention_ops
        plugin.register()  # idempotent
        assert CompilationConfig._attention_ops.count("vllm_blackwell_sparse::sparse_attn_indexer") == 1
        import vllm.model_executor.layers.sparse_attn_indexer as m
        from vllm.model_executor.custom_op import op_registry_oot
        cls = op_registry_oot["SparseAttnIndexer"]
        assert cls.__name__ == "GvrSparseAttnIndexer" and issubclass(cls, m.SparseAttnIndexer)
        assert cls.name == m.SparseAttnIndexer.name == "sparse_attn_indexer"
        ours = str(torch.ops.vllm_blackwell_sparse.sparse_attn_indexer.default._schema)
        theirs = str(torch.ops.vllm.sparse_attn_indexer.default._schema)
        assert ours.split("(", 1)[1] == theirs.split("(", 1)[1], (ours, theirs)
        import vllm.v1.worker.gpu_model_runner as r
        assert getattr(r.GPUModelRunner._update_states, "_vbs_wrapped", False)
        assert getattr(r.GPUModelRunner._dummy_run, "_vbs_wrapped", False)
        from vllm_blackwell_sparse import dsa
        assert dsa.hook_problem() is None
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_hint_state_carries_each_requests_topk_to_its_next_step(monkeypatch):
    """The GPU path on CPU tensors, with the kernel replaced by the torch oracle: slots
    follow requests across reordered rows, padding rows write to the sink, and the
    statistics count hits and overlaps exactly."""
    from vllm_blackwell_sparse.kernels import gvr_topk as kernel_module
    from vllm_blackwell_sparse.reference import topk_reference

    seen_slots = []

    def fake_gvr_topk(logits, seq_lens, k, *, hint_table=None, row_slot=None, out=None, **_):
        seen_slots.append(None if row_slot is None else row_slot.tolist())
        out.copy_(topk_reference(logits, seq_lens.reshape(-1), k))
        return out

    monkeypatch.setattr(kernel_module, "gvr_topk", fake_gvr_topk)
    state = dsa.GvrHintState()
    state.collect_stats = state.runner_hooked = True
    state._allocate_shared(max_num_seqs=4, max_rows=8, device=torch.device("cpu"))
    k, n = 8, 64
    layer = state.layers["model.layers.0.indexer"] = dsa.GvrLayer(state, "model.layers.0.indexer", k, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    lens = {"a": 40, "b": 50}
    prev = {}
    expected_hits = expected_overlap = 0
    for step, order in enumerate([["a", "b"], ["b", "a"], ["a", "b"]]):
        state.on_step(order, {r: 1 for r in order}, [])
        rows = len(order) + 1  # one CUDA-graph padding row
        logits = torch.randn(rows, n, generator=gen)
        seq = torch.tensor([[lens[r]] for r in order] + [[0]], dtype=torch.int32)
        out = torch.empty(rows, k, dtype=torch.int32)
        layer.run(logits, seq, out, k)
        assert seen_slots[-1][-1] == -1, "a padding row must not read a hint"
        for i, r in enumerate(order):
            cur = set(out[i].tolist())
            if step > 0:
                expected_hits += 1
                expected_overlap += len(prev[r] & cur)
                assert seen_slots[-1][i] == state.slots.slot_of(r)
            else:
                assert seen_slots[-1][i] == -1
            prev[r] = cur
            assert set(layer.hints[state.slots.slot_of(r)].tolist()) == cur
            lens[r] += 1
    state.clear_rows()  # a dummy run: no row reads a hint, every row writes to the sink
    assert state.read_slot.tolist() == [-1] * 8 and state.write_slot.tolist() == [state.num_slots] * 8
    stats = state.stats()["model.layers.0.indexer"]
    assert stats["rows"] == 6 and stats["rows_with_hint"] == 4 and stats["hint_hits"] == expected_hits == 4
    assert stats["overlap_sum"] == expected_overlap
    assert stats["cutoff_ties"] == 0


def test_a_failed_hook_refuses_gvr_topk(monkeypatch):
    from vllm_blackwell_sparse.config import BlackwellSparseConfig
    from vllm_blackwell_sparse.features import unavailable_feature_reasons

    assert unavailable_feature_reasons(BlackwellSparseConfig(gvr_topk=True)) == []
    monkeypatch.setattr(dsa, "_hook_failures", [dsa.INDEXER_MODULE])
    reasons = unavailable_feature_reasons(BlackwellSparseConfig(gvr_topk=True))
    assert len(reasons) == 1 and "gvr_topk" in reasons[0] and dsa.INDEXER_MODULE in reasons[0]
    assert unavailable_feature_reasons(BlackwellSparseConfig(gvr_topk=False)) == []


def test_install_after_the_modules_were_imported():
    code = textwrap.dedent(
        """
        import vllm.model_executor.layers.sparse_attn_indexer as m
        import vllm.v1.worker.gpu_model_runner as r
        from vllm_blackwell_sparse import plugin
        assert plugin.register()
        from vllm.model_executor.custom_op import op_registry_oot
        assert op_registry_oot["SparseAttnIndexer"].__name__ == "GvrSparseAttnIndexer"
        assert getattr(r.GPUModelRunner._update_states, "_vbs_wrapped", False)
        assert getattr(r.GPUModelRunner._dummy_run, "_vbs_wrapped", False)
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_speculative_drafter_shares_the_targets_state_and_another_model_does_not():
    # vLLM 0.26 builds the drafter under dataclasses-style replace(target_config, ...)
    # (llm_base_proposer._create_draft_vllm_config): a new config object holding the
    # target's model_config. Resetting there dropped the target's layers.
    import dataclasses

    @dataclasses.dataclass
    class Config:
        model_config: object
        speculative_config: object = None

    target = Config(model_config=object())
    drafter = dataclasses.replace(target, speculative_config="mtp")
    assert drafter is not target
    assert not dsa.belongs_to_another_model(target, drafter)
    assert not dsa.belongs_to_another_model(None, target)
    assert dsa.belongs_to_another_model(target, Config(model_config=object()))


def test_reset_keeps_the_runner_hook():
    state = dsa.GvrHintState()
    state.runner_hooked = True
    state.layers["x"] = None
    state.reset()
    assert state.runner_hooked and state.layers == {}


def test_a_dummy_run_leaves_the_pinned_staging_buffers_alone():
    """An idle data-parallel rank's dummy run clears the rows outside vLLM's input-prep
    synchronisation, while the previous step's copy out of the pinned staging buffers may
    still be in flight: the clear must only touch the device buffers."""
    state = dsa.GvrHintState()
    state.runner_hooked = True
    state._allocate_shared(max_num_seqs=4, max_rows=6, device=torch.device("cpu"))
    state.on_step(["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, [])
    staged = (state._host_read.clone(), state._host_write.clone())
    state.clear_rows()
    assert torch.equal(state._host_read, staged[0]) and torch.equal(state._host_write, staged[1])
    assert state.read_slot.tolist() == [-1] * 6 and state.write_slot.tolist() == [state.num_slots] * 6


def test_the_runner_hook_clears_rows_before_vllms_dummy_run(monkeypatch):
    """On a fake runner class: the wrapped _dummy_run clears the rows first, then runs vLLM's."""
    import types

    calls = []

    class FakeRunner:
        def _update_states(self, scheduler_output):
            calls.append("update")

        def _dummy_run(self, *args, **kwargs):
            calls.append(("dummy", state.read_slot.tolist()))

    state = dsa.GvrHintState()
    monkeypatch.setattr(dsa, "_STATE", state)
    dsa._patch_runner_module(types.SimpleNamespace(GPUModelRunner=FakeRunner))
    state._allocate_shared(max_num_seqs=2, max_rows=3, device=torch.device("cpu"))
    state.read_slot.fill_(1)
    FakeRunner()._dummy_run(1)
    assert calls == [("dummy", [-1, -1, -1])]


@pytest.mark.parametrize("parallel,overrides,fragment", [
    (dict(enable_dbo=True, ubatch_size=0), {}, "micro-batching"),
    (dict(enable_dbo=False, ubatch_size=2), {}, "micro-batching"),
    (dict(enable_dbo=False, ubatch_size=0),
     {"DeepseekV32ForCausalLM": "vllm.models.deepseek_v32.nvidia.model:DeepseekV32ForCausalLM"}, "calls the indexer"),
])
def test_configurations_where_gvr_does_not_apply_are_named(parallel, overrides, fragment):
    import types

    cfg = types.SimpleNamespace(parallel_config=types.SimpleNamespace(**parallel),
                                model_config=types.SimpleNamespace(model_class_overrides=overrides))
    assert fragment in dsa.gvr_unsupported_config(cfg)
    cfg.parallel_config.enable_dbo, cfg.parallel_config.ubatch_size = False, 0
    cfg.model_config.model_class_overrides = {}
    assert dsa.gvr_unsupported_config(cfg) is None


def test_gvr_on_blackwell_needs_the_explicit_opt_in(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    why = dsa.gvr_unsupported_reason(2048, torch.device("cuda"))
    assert why and "VBS_ENABLE_UNVERIFIED_SM100=1" in why
    monkeypatch.setenv("VBS_ENABLE_UNVERIFIED_SM100", "1")
    assert dsa.gvr_unsupported_reason(2048, torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.delenv("VBS_ENABLE_UNVERIFIED_SM100")
    assert dsa.gvr_unsupported_reason(2048, torch.device("cuda")) is None


def test_a_second_thread_inside_the_swap_is_refused():
    import threading

    layer = type("Layer", (), {"decode_topk_replacing": lambda self, op: op})()
    errors = []
    inside = threading.Event()
    release = threading.Event()

    def first():
        with dsa._decode_topk_replaced_by(layer):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    try:
        with dsa._decode_topk_replaced_by(layer):
            pass
    except RuntimeError as e:
        errors.append(str(e))
    release.set()
    t.join(5)
    assert errors and "another was inside vLLM's indexer" in errors[0]
    with dsa._decode_topk_replaced_by(layer):  # free again once the first left
        pass
