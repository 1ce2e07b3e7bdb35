import json

import pytest

from vllm_blackwell_sparse.config import (
    BlackwellSparseConfig,
    ConfigError,
    load_config,
    parse_config,
    section_from_additional_config,
)
from vllm_blackwell_sparse.features import unavailable_feature_reasons


def test_defaults_are_dense_and_gvr_off():
    cfg = parse_config({}, environ={})
    assert cfg == BlackwellSparseConfig()
    assert cfg.prefill_threshold_scale_factor is None and cfg.decode_threshold_scale_factor is None
    assert cfg.gvr_topk is False and not cfg.blasst_requested


def test_valid_values():
    cfg = parse_config(
        {"prefill_threshold_scale_factor": 1000, "decode_threshold_scale_factor": 20.5, "gvr_topk": True}, environ={}
    )
    assert cfg.prefill_threshold_scale_factor == 1000.0
    assert cfg.decode_threshold_scale_factor == 20.5
    assert cfg.gvr_topk is True and cfg.blasst_requested


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"decode_threshold_scale_factor": -1}, "decode_threshold_scale_factor"),
        ({"decode_threshold_scale_factor": 0}, "decode_threshold_scale_factor"),
        ({"prefill_threshold_scale_factor": float("nan")}, "prefill_threshold_scale_factor"),
        ({"prefill_threshold_scale_factor": float("inf")}, "prefill_threshold_scale_factor"),
        ({"prefill_threshold_scale_factor": "abc"}, "is not a number"),
        ({"prefill_threshold_scale_factor": True}, "has type bool"),
        ({"decode_threshold_scale_factor": [1]}, "has type list"),
        ({"gvr_topk": "maybe"}, "gvr_topk"),
        ({"gvr_topk": 2}, "gvr_topk"),
        ({"decode_threshold_factor": 3}, "unknown key"),
    ],
)
def test_bad_values_name_the_key_and_accepted_values(section, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config(section, environ={})
    msg = str(e.value)
    assert fragment in msg
    assert "expected" in msg or "accepted keys" in msg


def test_unknown_key_lists_accepted_keys():
    with pytest.raises(ConfigError, match="gvr_topk") as e:
        parse_config({"bogus": 1}, environ={})
    assert "prefill_threshold_scale_factor" in str(e.value)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="JSON object"):
        parse_config([1, 2], environ={})


def test_env_overrides_config():
    env = {"VBS_DECODE_THRESHOLD_SCALE_FACTOR": "20", "VBS_GVR_TOPK": "true", "VBS_PREFILL_THRESHOLD_SCALE_FACTOR": "none"}
    cfg = parse_config({"prefill_threshold_scale_factor": 5.0, "gvr_topk": False}, environ=env)
    assert cfg.decode_threshold_scale_factor == 20.0
    assert cfg.gvr_topk is True
    assert cfg.prefill_threshold_scale_factor is None


def test_env_errors_name_the_variable():
    with pytest.raises(ConfigError, match="VBS_GVR_TOPK"):
        parse_config({}, environ={"VBS_GVR_TOPK": "sometimes"})
    with pytest.raises(ConfigError, match="VBS_DECODE_THRESHOLD_SCALE_FACTOR"):
        parse_config({}, environ={"VBS_DECODE_THRESHOLD_SCALE_FACTOR": "-3"})


def test_additional_config_as_dict_or_json_string():
    sec = {"gvr_topk": True}
    assert section_from_additional_config({"blackwell_sparse": sec, "other_plugin": {}}) == sec
    assert section_from_additional_config(json.dumps({"blackwell_sparse": sec})) == sec
    assert section_from_additional_config({}) is None
    assert section_from_additional_config(None) is None
    with pytest.raises(ConfigError, match="not valid JSON"):
        section_from_additional_config("{not json")


def test_load_config_from_a_vllm_config_object(monkeypatch):
    class FakeVllmConfig:
        additional_config = {"blackwell_sparse": {"decode_threshold_scale_factor": 7}}

    assert load_config(FakeVllmConfig()).decode_threshold_scale_factor == 7.0
    monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "9")
    assert load_config(FakeVllmConfig()).decode_threshold_scale_factor == 9.0


def test_load_config_through_vllms_current_config_context():
    from types import SimpleNamespace

    from vllm.config import set_current_vllm_config

    # A full VllmConfig cannot be built without a GPU; vLLM's context only stores the object.
    fake = SimpleNamespace(additional_config={"blackwell_sparse": {"gvr_topk": True}})
    with set_current_vllm_config(fake):
        assert load_config().gvr_topk is True
    assert load_config().gvr_topk is False  # outside the context: defaults (+ VBS_*)


def test_blasst_without_kernel_is_refused_not_silently_dense():
    assert unavailable_feature_reasons(BlackwellSparseConfig()) == []
    # Decode has a kernel since 0.3.0; prefill has none yet and is refused.
    assert unavailable_feature_reasons(BlackwellSparseConfig(decode_threshold_scale_factor=20.0)) == []
    reasons = unavailable_feature_reasons(BlackwellSparseConfig(prefill_threshold_scale_factor=20.0))
    assert len(reasons) == 1 and "prefill_threshold_scale_factor" in reasons[0] and "no BLASST prefill kernel" in reasons[0]


@pytest.mark.parametrize("value,want", [(True, True), (1, True), ("yes", True), ("ON", True), (" 1 ", True),
                                        (False, False), (0, False), ("no", False), ("off", False), ("", False)])
def test_one_boolean_rule_for_json_and_environment(value, want):
    assert parse_config({"gvr_topk": value}, environ={}).gvr_topk is want
    if isinstance(value, str):
        assert parse_config({}, environ={"VBS_GVR_TOPK": value}).gvr_topk is want


def test_out_of_range_factors_are_reported_as_given():
    with pytest.raises(ConfigError, match=r"VBS_DECODE_THRESHOLD_SCALE_FACTOR: decode_threshold_scale_factor='1e400'"):
        parse_config({}, environ={"VBS_DECODE_THRESHOLD_SCALE_FACTOR": "1e400"})
    assert parse_config({"decode_threshold_scale_factor": "5"}, environ={}).decode_threshold_scale_factor == 5.0


def test_settings_where_they_are_never_read_are_named():
    from vllm_blackwell_sparse.config import misplaced_settings

    got = misplaced_settings({"blackwell-sparse": {}, "blackwel_sparse": {}, "gvr_topk": True, "other_plugin": {},
                              "blackwell_sparse": {}})
    assert len(got) == 3
    assert 'did you mean "blackwell_sparse"' in got[0] and 'did you mean "blackwell_sparse"' in got[1]
    assert '"gvr_topk" at the top level' in got[2]
