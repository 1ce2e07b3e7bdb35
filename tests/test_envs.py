"""The registry of every VBS_* variable (envs.py): one parsing rule, and the README's
table lists exactly the registered variables."""

import re
from pathlib import Path

import pytest

from vllm_blackwell_sparse import envs
from vllm_blackwell_sparse.config import CONFIG_KEYS, env_var

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_config_override_is_registered():
    assert {env_var(k) for k in CONFIG_KEYS} <= set(envs.ENV_VARS)


def test_readme_table_lists_exactly_the_registered_variables():
    text = README.read_text()
    section = text[text.index("## Environment variables"):]
    section = section[:section.index("\n## ", 5)]
    listed = set(re.findall(r"^\| `(VBS_[A-Z0-9_]+)`", section, flags=re.M))
    assert listed == set(envs.ENV_VARS)


def test_every_vbs_name_in_the_code_is_registered():
    root = Path(envs.__file__).resolve().parent
    names = set()
    # The package, the benchmarks and the GPU tests (the CPU tests also spell names wrong on purpose).
    paths = [*root.rglob("*.py"), *(root.parent / "benchmarks").rglob("*.py"), *(root.parent / "tests" / "gpu").rglob("*")]
    for path in paths:
        if path.is_file():
            names |= set(re.findall(r"\b(VBS_[A-Z][A-Z0-9_]*[A-Z0-9])\b", path.read_text()))
    assert names <= set(envs.ENV_VARS), sorted(names - set(envs.ENV_VARS))


@pytest.mark.parametrize("text,want", [("1", True), ("TRUE", True), (" on ", True), ("yes", True),
                                       ("0", False), ("False", False), ("off", False), ("no", False)])
def test_one_boolean_rule(text, want):
    assert envs.parse_bool(text, "x") is want
    assert envs.env_bool("VBS_BLASST_STATS", {"VBS_BLASST_STATS": text}) is want


def test_bad_values_and_unregistered_names_are_refused():
    with pytest.raises(envs.EnvError, match="VBS_BLASST_STATS='sometimes' is not a boolean"):
        envs.env_bool("VBS_BLASST_STATS", {"VBS_BLASST_STATS": "sometimes"})
    with pytest.raises(KeyError, match="not registered"):
        envs.env_bool("VBS_NOT_A_THING", {})
    with pytest.raises(envs.EnvError, match="seconds"):
        envs.env_seconds("VBS_BLASST_STATS_INTERVAL", {"VBS_BLASST_STATS_INTERVAL": "-1"})
    assert envs.env_bool("VBS_BLASST_STATS", {"VBS_BLASST_STATS": ""}) is False  # empty: the default
    assert envs.env_seconds("VBS_BLASST_STATS_INTERVAL", {}) == 10.0


def test_unknown_vbs_variables_are_found():
    assert envs.unknown_vbs_variables({"VBS_GVR_TOPKK": "1", "VBS_GVR_TOPK": "1", "PATH": "/"}) == ["VBS_GVR_TOPKK"]


def test_ci_runs_exactly_the_readmes_test_command():
    text = README.read_text()
    section = text[text.index("## Run the tests"):]
    command = section[section.index("```bash\n") + 8:section.index("\n```", section.index("```bash\n"))].strip()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == command
