"""Per-request decode factors: parsing, the batch-row bookkeeping, the buffer encoding,
and (on the oracle) a batch mixing factors equals each request alone."""

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_blackwell_sparse import workloads as wl
from vllm_blackwell_sparse.decode_factors import factor_value
from vllm_blackwell_sparse.reference.blasst import blasst_attention_reference, request_factors
from vllm_blackwell_sparse.request_factors import (
    REQUEST_FACTOR_KEY, DecodeFactorRows, RowFactors, parse_request_factor, request_factor,
)


@pytest.mark.parametrize("value,expected", [(64, 64.0), (0.5, 0.5), ("512", 512.0), ("off", math.inf),
                                            (" OFF ", math.inf), ("1e3", 1000.0)])
def test_request_factor_accepted_values(value, expected):
    assert parse_request_factor(value) == expected


@pytest.mark.parametrize("value,fragment", [(0, "out of range"), (-2, "out of range"), ("nan", "out of range"),
                                            ("inf", "out of range"), ("fast", "is not a number"),
                                            (True, "has type bool"), ([1], "has type list"), (None, "has type")])
def test_request_factor_refused_values_name_the_key(value, fragment):
    with pytest.raises(ValueError, match=REQUEST_FACTOR_KEY) as e:
        parse_request_factor(value)
    assert fragment in str(e.value) and '"off"' in str(e.value)


def test_validate_params_is_what_vllm_calls_at_request_arrival():
    DecodeFactorRows.validate_params(SimpleNamespace(extra_args=None))
    DecodeFactorRows.validate_params(SimpleNamespace(extra_args={REQUEST_FACTOR_KEY: "off"}))
    with pytest.raises(ValueError, match=REQUEST_FACTOR_KEY):
        DecodeFactorRows.validate_params(SimpleNamespace(extra_args={REQUEST_FACTOR_KEY: "zero"}))
    assert request_factor(SimpleNamespace(extra_args={"other": 1})) is None


def _update(batch_size, removed=(), added=(), moved=()):
    return SimpleNamespace(batch_size=batch_size, removed=list(removed), added=list(added), moved=list(moved))


def _params(f=None):
    return SimpleNamespace(extra_args={} if f is None else {REQUEST_FACTOR_KEY: f})


def test_rows_follow_vllm_batch_updates():
    swap, one_way = SimpleNamespace(name="SWAP"), SimpleNamespace(name="UNIDIRECTIONAL")
    rows = RowFactors(8)
    assert not rows.apply(None)
    assert rows.apply(_update(3, added=[(0, _params(8), [], []), (1, _params(), [], []), (2, _params("off"), [], [])]))
    assert rows.values(3, 64.0) == [8.0, 64.0, math.inf]
    rows.apply(_update(3, moved=[(0, 2, swap)]))
    assert rows.values(3, 64.0) == [math.inf, 64.0, 8.0]
    # removed first, then added into the freed row, then moves (vLLM's order)
    rows.apply(_update(3, removed=[1], added=[(1, _params(2), [], [])], moved=[(2, 0, one_way)]))
    assert rows.values(2, 64.0) == [8.0, 2.0]
    assert rows.asked[2] is None


def test_buffer_encoding():
    assert factor_value(None) == math.inf and factor_value(math.inf) == math.inf and factor_value(4) == 4.0
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ValueError, match="decode_threshold_scale_factor"):
            factor_value(bad)


def test_oracle_mixed_factors_equal_each_request_alone():
    lens = [1500, 900, 2600, 700]
    factors = [4.0, math.inf, 64.0, None]
    case = wl.peaked_attention_case(lens, [1] * 4, 8, 2, 64, 16, device="cpu", params=wl.PeakedAttentionParams(seed=3))
    args = [case[n] for n in wl.CASE_TENSORS]
    mixed = blasst_attention_reference(*args, threshold_scale_factor=factors, kv_tile_size=16, q_tile_rows=8,
                                       visit_order="ascending", split_rule=(16, 64))
    assert mixed.skipped_tiles > 0
    for i, f in enumerate(factors):
        q, kc, vc, table, cu, sl = args
        alone = blasst_attention_reference(q[i:i + 1], kc, vc, table[i:i + 1], torch.tensor([0, 1], dtype=torch.int32),
                                           sl[i:i + 1], threshold_scale_factor=None if f in (None, math.inf) else f,
                                           kv_tile_size=16, q_tile_rows=8, visit_order="ascending",
                                           split_rule=(16, 64))
        assert torch.equal(mixed.out[i:i + 1], alone.out), i
        mine = mixed.decisions.request == i
        assert int(mixed.decisions.skipped[mine].sum()) == alone.skipped_tiles


def test_request_factors_of_the_oracle():
    assert request_factors(None, 2) == [None, None]
    assert request_factors(3.0, 2) == [3.0, 3.0]
    assert request_factors(torch.tensor([2.0, math.inf]), 2) == [2.0, None]
    with pytest.raises(ValueError, match="2 values for 3 requests"):
        request_factors([1.0, 2.0], 3)


def _vllm_config(factor=64.0, backend="CUSTOM", dbo=False):
    return SimpleNamespace(
        additional_config={"blackwell_sparse": {"decode_threshold_scale_factor": factor}},
        attention_config=SimpleNamespace(backend=SimpleNamespace(name=backend)),
        parallel_config=SimpleNamespace(use_ubatching=dbo),
        scheduler_config=SimpleNamespace(max_num_seqs=8),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=16))


def test_the_batch_row_processor_refuses_micro_batching():
    with pytest.raises(ValueError, match="micro-batching"):
        DecodeFactorRows(_vllm_config(dbo=True), torch.device("cpu"), False)


@pytest.mark.parametrize("config,fragment", [(dict(factor=None), "runs dense decode"),
                                             (dict(backend="FLASH_ATTN"), "not CUSTOM")])
def test_a_factor_the_engine_cannot_honour_is_reported_once(monkeypatch, config, fragment):
    import vllm_blackwell_sparse.request_factors as rf

    said = []
    monkeypatch.setattr(rf, "warn_once", lambda log, msg: said.append(msg))
    proc = DecodeFactorRows(_vllm_config(**config), torch.device("cpu"), False)
    proc.update_state(_update(1, added=[(0, _params(8), [], [])]))
    assert len(said) == 1 and fragment in said[0] and REQUEST_FACTOR_KEY in said[0]
    logits = torch.randn(1, 5)
    assert proc.apply(logits) is logits and proc.is_argmax_invariant()


def test_rows_sized_as_the_largest_padded_batch():
    proc = DecodeFactorRows(_vllm_config(), torch.device("cpu"), False)
    assert len(proc.rows.asked) == 16 and proc.key is None  # no buffer without CUDA


def test_every_run_time_change_asks_for_the_rows_again():
    from vllm_blackwell_sparse import decode_factors as df

    key = (0, 64.0, 16)
    _, before = df.current_default(key)
    assert df.set_decode_threshold_scale_factor(128.0) == 0  # no buffer without a GPU engine
    default, after = df.current_default(key)
    df.set_decode_threshold_scale_factor(128.0)  # the same value again still counts
    assert after == before + 1 and df.current_default(key)[1] == after + 1
    assert df.existing_decode_factor_buffer(key) is None
