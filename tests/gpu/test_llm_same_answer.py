"""Same request, same answer at the engine level (real SmolLM2, BLASST decode at factor
64): each request run alone under full decode CUDA graphs (captured for max_model_len
8192) and with enforce_eager gives identical tokens and identical decode skip counts; in
one batch with the others it keeps its tokens too when dense decode does (other kernels
may depend on the batch size, which the dense run shows)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from real_model import real_model_dir

LENGTHS = [1500, 3000, 5000, 7500]


def _worker(spec: dict) -> dict:
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    from vllm import LLM, SamplingParams

    from real_model import text_prompts

    kw = {"enforce_eager": True} if spec["eager"] else {"compilation_config": {
        "mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [1, 2, 4]}}
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=8192, block_size=128, seed=0,
              gpu_memory_utilization=0.25, max_num_seqs=4, enable_prefix_caching=False,
              attention_config={"backend": "CUSTOM"}, generation_config="vllm", **kw)
    prompts = text_prompts(llm.get_tokenizer(), LENGTHS)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, detokenize=False)
    counting = spec["factor"] is not None
    if counting:
        from vllm_blackwell_sparse.blasst_stats import blasst_stats

    def run(batch):
        before = blasst_stats()["decode"] if counting else None
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        after = blasst_stats()["decode"] if counting else None
        counts = [after["skipped"] - before["skipped"], after["eligible"] - before["eligible"]] if counting else None
        return [list(o.outputs[0].token_ids) for o in outs], counts

    alone = [run([p]) for p in prompts]
    together = run(prompts)
    return {"alone_tokens": [a[0][0] for a in alone], "alone_counts": [a[1] for a in alone],
            "together_tokens": together[0]}


def _run(factor, eager):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("VBS_DECODE_THRESHOLD_SCALE_FACTOR", None)
    if factor is not None:
        env.update(VBS_DECODE_THRESHOLD_SCALE_FACTOR=str(factor), VBS_BLASST_STATS="1", VBS_BLASST_STATS_INTERVAL="3600")
    spec = {"model": real_model_dir(), "factor": factor, "eager": eager}
    result = Path(os.environ.get("TMPDIR", "/tmp"), f"same_answer_{factor}_{eager}_{os.getpid()}.json")
    out = subprocess.run([sys.executable, __file__, json.dumps(spec), str(result)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0 and result.exists(), (out.stdout + out.stderr)[-5000:]
    return json.loads(result.read_text())


def test_each_request_alone_same_tokens_and_skip_counts_graph_and_eager():
    graph, eager = _run(64, False), _run(64, True)
    dense_graph = _run(None, False)
    summary = {
        "alone_tokens_equal": [a == b for a, b in zip(graph["alone_tokens"], eager["alone_tokens"])],
        "alone_counts_graph": graph["alone_counts"], "alone_counts_eager": eager["alone_counts"],
        "together_equals_alone_blasst": [a == b for a, b in zip(graph["together_tokens"], graph["alone_tokens"])],
        "together_equals_alone_dense": [a == b for a, b in zip(dense_graph["together_tokens"],
                                                               dense_graph["alone_tokens"])],
    }
    if os.environ.get("VBS_TEST_ARTIFACTS"):
        Path(os.environ["VBS_TEST_ARTIFACTS"], "llm_same_answer.json").write_text(json.dumps(summary, indent=1))
    print(summary)
    assert all(summary["alone_tokens_equal"]), summary
    assert graph["alone_counts"] == eager["alone_counts"], summary
    assert all(c[0] > 0 for c in graph["alone_counts"]), summary
    for blasst_ok, dense_ok in zip(summary["together_equals_alone_blasst"], summary["together_equals_alone_dense"]):
        assert blasst_ok or not dense_ok, summary


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(_worker(json.loads(sys.argv[1]))))
