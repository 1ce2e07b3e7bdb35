"""vbs eval / vbs calibrate without a GPU: the fits, the statistics, the prompts and the
tables from engine results shaped as the worker writes them."""

import math

import pytest

from vllm_blackwell_sparse.evaluate import fit as fitting
from vllm_blackwell_sparse.evaluate import tasks
from vllm_blackwell_sparse.evaluate.run import calibrate_markdown, eval_markdown, summarize_eval


def _points(form):
    pts = []
    for n in (2048, 4096, 8000):
        for f in (1, 4, 16, 64, 256, 1024):
            if form == "lambda":
                s = 0.5 + 0.05 * math.log(f / n)
            else:  # a per-length line that the λ form cannot follow
                s = {2048: 0.05, 4096: 0.02, 8000: 0.01}[n] + 0.04 * math.log(f)
            pts.append({"factor": float(f), "kv_len": n, "sparsity": s})
    return pts


def test_fit_recovers_the_lambda_line_and_inverts_it():
    model = fitting.fit(_points("lambda"))
    assert model["lambda"]["b"] == pytest.approx(0.05) and model["lambda"]["rms"] < 1e-9
    f = fitting.factor_for(model, 0.3, [2048, 4096, 8000], form="lambda")
    got = sum(fitting.predict(model, f, n, "lambda") for n in (2048, 4096, 8000)) / 3
    assert got == pytest.approx(0.3, abs=1e-6)


def test_fit_prefers_the_per_length_form_when_lengths_differ():
    model = fitting.fit(_points("per_length"))
    assert model["linear"]["rms"] < 1e-9 and model["linear"]["rms"] < model["lambda"]["rms"]
    assert fitting.predict(model, 64.0, 4096, "linear") == pytest.approx(0.02 + 0.04 * math.log(64))


def test_the_power_form_is_chosen_when_the_data_follow_it():
    pts = [{"factor": float(f), "kv_len": n, "sparsity": c * f ** 0.2} for n, c in ((2048, 0.06), (8000, 0.03))
           for f in (2, 8, 32, 128, 512)]
    model = fitting.fit(pts)
    assert model["best"] == "power" and model["power"]["rms"] < 1e-9
    f = fitting.factor_for(model, 0.1, [2048, 8000])
    assert (0.06 * f ** 0.2 + 0.03 * f ** 0.2) / 2 == pytest.approx(0.1, abs=1e-6)


def test_unreachable_target_and_too_few_points():
    model = fitting.fit(_points("lambda"))
    assert fitting.factor_for(model, 0.99, [2048]) is None
    assert fitting.predict(model, 5000.0, 4096) == 0.0  # λ >= 1: skipping stops
    with pytest.raises(ValueError, match="at least 2 measured points"):
        fitting.fit([{"factor": 4.0, "kv_len": 2048, "sparsity": 0.1}, {"factor": 4096.0, "kv_len": 2048,
                                                                          "sparsity": 0.0}])
    assert fitting.reachable(_points("lambda"))[8000] == pytest.approx(0.5 + 0.05 * math.log(1024 / 8000))


def test_windows_statistics_and_prompts():
    ids = list(range(1000))
    w = tasks.windows(ids, 100, 5)
    assert [x[0] for x in w] == [0, 225, 450, 675, 900] and all(len(x) == 100 for x in w)
    assert tasks.windows(ids, 100, 2, part=(0.5, 1.0))[0][0] == 500
    with pytest.raises(ValueError, match="a window needs 2000"):
        tasks.windows(ids, 2000, 2)
    assert tasks.window_overlap(1000, 100, 5) == 0.0 and tasks.window_overlap(1000, 800, 5) > 0.5
    p, lo, hi = tasks.wilson(95, 100)
    assert p == 0.95 and 0.88 < lo < 0.95 < hi < 0.99
    s = tasks.loglik_summary([[-1.0, -2.0], [-1.5, -1.5]], [[-1.0, -1.0], [-1.5, -1.0]])
    assert s["mean_logprob"] == pytest.approx(-1.5) and s["perplexity"] == pytest.approx(math.exp(1.5))
    assert s["delta_logprob"] == pytest.approx(-0.375) and s["max_abs_token_delta"] == pytest.approx(1.0)
    a = tasks.agreement([[1, 2, 3], [1, 2, 3]], [[1, 2, 4], [1, 2, 3]])
    assert a["token_match"] == pytest.approx(5 / 6) and a["identical_sequences"] == 1
    assert a["mean_first_divergence"] == pytest.approx(2.5)
    msg = tasks.passkey_user_message("48151", 10, 0.5)
    assert msg.count("48151") == 2 and msg.endswith(tasks.PASSKEY_QUESTION)
    trials = tasks.passkey_trials(2048, 10, [0.1, 0.9], seed=0)
    assert [t["depth"] for t in trials[:2]] == [0.1, 0.9] and all(len(t["key"]) == 5 for t in trials)
    assert tasks.passkey_found("48151", "The pass key is 48,151.") and not tasks.passkey_found("48151", "4815")


def test_corpus_is_shipped_with_python():
    text = tasks.corpus_text()
    assert len(text) > 100_000 and "Python" in text


def _engine(backend, factors):
    def cell_tasks(shift):
        return {"loglik": {"2048": {"logprobs": [[-1.0 - shift, -2.0], [-1.5, -1.5 - shift]], "sparsity": shift,
                                    "eligible_tiles": 100, **({"hand_check": {"positions": 4, "max_abs_diff": 0.01,
                                                                             "mean_abs_diff": 0.005}} if not shift
                                                              else {})}},
                "passkey": {"2048": {"found": [True, True, shift == 0], "depths": [0.1, 0.5, 0.9],
                                     "prompt_tokens": [2000, 2030], "sparsity": shift}},
                "agreement": {"2048": {"tokens": [[1, 2, 3], [4, 5, 6]], "sparsity": shift}}}
    return {"spec": {"backend": backend}, "settings": [{"factor": f, "tasks": cell_tasks(0.0 if f is None else 0.1)}
                                                        for f in factors]}


def test_eval_summary_and_table():
    engines = [_engine("FLASH_ATTN", [None]), _engine("CUSTOM", [None, 64.0])]
    summary = summarize_eval(engines)
    rows = {r["config"]: r for r in summary["rows"]}
    assert set(rows) == {"FA3 (stock FLASH_ATTN)", "CUSTOM control (nothing skipped)", "CUSTOM f64"}
    f64 = rows["CUSTOM f64"]
    assert f64["loglik"]["delta_logprob"] == pytest.approx(-0.05) and f64["passkey"]["found"] == 2
    assert f64["agreement"]["vs_control"]["token_match"] == 1.0
    md = eval_markdown({"model": "/m/smollm2", "model_provenance": {"label": "Q4_1 GGUF dequantized to bf16"},
                        "environment": {"gpu": "NVIDIA H200", "commit": "abc"}, "summary": summary})
    assert "| CUSTOM f64 | 2048 | 10.0% | -0.0500" in md and "Q4_1 GGUF" in md and "prompt_logprobs" in md


def test_calibrate_table():
    pts = _points("lambda")
    model = fitting.fit(pts)
    grid = {}
    for p in pts:
        grid.setdefault(repr(p["factor"]), {})[str(p["kv_len"])] = {"sparsity": p["sparsity"]}
    cal = {"grid": grid, "points": pts, "fit": model, "reachable": {str(k): v for k, v in fitting.reachable(pts).items()},
           "targets": [{"target": 0.3, "factor": 12.0, "held_back": {"2048": {"sparsity": 0.31}},
                        "held_back_sparsity": 0.31}, {"target": 0.9, "factor": None}]}
    md = calibrate_markdown({"model": "/m/x", "calibration": cal})
    assert "| 30% | 12 | 31.0% | 2048: 31.0% | 31.0% | yes |" in md and "| 90% | unreachable |" in md
    assert "used: **" in md and "ModelOpt #1541" in md
