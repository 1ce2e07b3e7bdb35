#!/bin/bash
# The GPU session on the H200 (after the `full` bundle, and for the real model the model parts, are installed;
# see docs/VERIFICATION.md). Usage: bash tests/gpu/run_h200.sh STAGE [ARGS]
#   kernels     backend impl (dense FA3 / FA4) + GVR top-k + BLASST decode, one pytest process
#   kernels-par the BLASST decode and backend tests in parallel processes (correctness only, no timing), plus the
#               64K-128K CUSTOM-vs-FLASH_ATTN engine test
#   llm | server | demo | dsa | dsa-eager   as named (dsa: GVR inside the tiny DeepSeek-V3.2, ~4 min each)
#   model       vbs model prepare from the carried GGUF into /tmp/smollm2
#   split-rule  request-only split rules vs the batch-dependent heuristic (benchmarks/decode_split_rule.py)
#   serve ARGS  vbs bench serve on /tmp/smollm2 (ARGS go to it, e.g. --only stock,dense)
#   peers       FA3, ours and ModelOpt's Triton kernel on one cache + host time per call (benchmarks/decode_peers.py)
#   overhead    where the host time of one blasst_decode call goes (benchmarks/decode_call_overhead.py)
#   findings070 issue 27's findings replayed on 0.7.0's kernel (.baseline/, carried; tests/gpu/findings_on_070.py)
#   real-llm    per-request factors in LLM() and graph-vs-eager same answer, on /tmp/smollm2
#   real-server per-request factors through the OpenAI server, on /tmp/smollm2
#   eval ARGS | calibrate ARGS   vbs eval / vbs calibrate on /tmp/smollm2
#   all         kernels llm server demo dsa dsa-eager
# Logs and JSON artifacts go to $OUT (or ./gpu-artifacts).
set -uo pipefail
source /tmp/vbs-env.sh
ART=${OUT:-$PWD/gpu-artifacts}; mkdir -p "$ART"
export VBS_TEST_ARTIFACTS=$ART PYTHONUNBUFFERED=1
if [ -d .whl/extra ]; then  # packages the image lacks (accelerate: transformers' GGUF loading)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vbs-more .whl/extra/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/vbs-more:$PYTHONPATH
fi
stage=${1:-all}; shift || true
run() { echo "== $*"; "$@" 2>&1 | tee -a "$ART/gpu-tests.log"; return "${PIPESTATUS[0]}"; }
rc=0
if [[ $stage == kernels || $stage == all ]]; then
  run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || rc=1
  run python3 -m vllm_blackwell_sparse.cli doctor || rc=1
  run python3 -m pytest -q -rs -s -p no:warnings tests/gpu/test_backend_fa4.py tests/gpu/test_gvr_topk.py tests/gpu/test_blasst_decode.py --junitxml="$ART/junit-kernels.xml" || rc=1
fi
if [[ $stage == kernels-par ]]; then
  T=tests/gpu/test_blasst_decode.py
  pids=()
  python3 -m pytest -q -rs -p no:warnings "$T" -k "matches_oracle" --junitxml="$ART/junit-a.xml" >"$ART/pytest-a.log" 2>&1 & pids+=($!)
  python3 -m pytest -q -rs -p no:warnings "$T" -k "fuzz" --junitxml="$ART/junit-b.xml" >"$ART/pytest-b.log" 2>&1 & pids+=($!)
  python3 -m pytest -q -rs -s -p no:warnings "$T" -k "not matches_oracle and not fuzz" --junitxml="$ART/junit-c.xml" >"$ART/pytest-c.log" 2>&1 & pids+=($!)
  python3 -m pytest -q -rs -p no:warnings tests/gpu/test_backend_fa4.py --junitxml="$ART/junit-d.xml" >"$ART/pytest-d.log" 2>&1 & pids+=($!)
  python3 -m pytest -q -rs -s -p no:warnings tests/gpu/test_llm_long_context.py --junitxml="$ART/junit-e.xml" >"$ART/pytest-e.log" 2>&1 & pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for f in "$ART"/pytest-?.log; do echo "== $f"; grep -E "passed|failed|error|Error|assert|FAILED" "$f" | tail -8; done
fi
if [[ $stage == llm || $stage == all ]]; then
  run python3 -m pytest -q -rs -s tests/gpu/test_llm_end_to_end.py --junitxml="$ART/junit-llm.xml" || rc=1
fi
if [[ $stage == server || $stage == all ]]; then
  run python3 -m pytest -q -rs -s tests/gpu/test_openai_server.py --junitxml="$ART/junit-server.xml" || rc=1
fi
if [[ $stage == demo || $stage == all ]]; then
  run python3 -m vllm_blackwell_sparse.cli demo --json "$ART/demo.json" || rc=1
fi
if [[ $stage == dsa || $stage == all ]]; then
  run python3 -m pytest -q -rs -s tests/gpu/test_dsa_gvr.py -k cuda_graphs --junitxml="$ART/junit-dsa.xml" || rc=1
fi
if [[ $stage == dsa-eager || $stage == all ]]; then
  run python3 -m pytest -q -rs -s tests/gpu/test_dsa_gvr.py -k eager --junitxml="$ART/junit-dsa-eager.xml" || rc=1
fi
if [[ $stage == model ]]; then
  run python3 -m vllm_blackwell_sparse.cli model prepare smollm2-135m-instruct \
    --gguf /tmp/vbs-models/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2 || rc=1
  cp /tmp/smollm2/vbs_provenance.json "$ART/" 2>/dev/null
fi
if [[ $stage == split-rule ]]; then
  run python3 benchmarks/decode_split_rule.py --out "$ART/split_rule.json" --real-model-shape "$@" || rc=1
fi
if [[ $stage == serve ]]; then
  run python3 -m vllm_blackwell_sparse.cli bench serve --model /tmp/smollm2 --out "$ART/serve.json" "$@" || rc=1
fi
if [[ $stage == peers ]]; then
  run python3 benchmarks/decode_peers.py --out "$ART/peers.json" \
    --modelopt-wheel .whl/modelopt/nvidia_modelopt-0.47.0-py3-none-any.whl \
    --baseline-module .baseline/blasst_decode_a8192f3.py "$@" || rc=1
fi
if [[ $stage == overhead ]]; then
  run python3 benchmarks/decode_call_overhead.py --out "$ART/call_overhead.json" || rc=1
fi
if [[ $stage == findings070 ]]; then
  run python3 tests/gpu/findings_on_070.py --module .baseline/blasst_decode_a8192f3.py --out "$ART/findings_070.json" || rc=1
fi
if [[ $stage == real-llm ]]; then
  export VBS_REAL_MODEL=/tmp/smollm2
  run python3 -m pytest -q -rs -s -p no:warnings tests/gpu/test_llm_request_factors.py --junitxml="$ART/junit-rf.xml" || rc=1
  run python3 -m pytest -q -rs -s -p no:warnings tests/gpu/test_llm_same_answer.py --junitxml="$ART/junit-same.xml" || rc=1
fi
if [[ $stage == real-server ]]; then
  export VBS_REAL_MODEL=/tmp/smollm2
  run python3 -m pytest -q -rs -s -p no:warnings tests/gpu/test_server_request_factors.py --junitxml="$ART/junit-srv-rf.xml" || rc=1
fi
if [[ $stage == eval ]]; then
  run python3 -m vllm_blackwell_sparse.cli eval --model /tmp/smollm2 --out "$ART/eval.json" "$@" || rc=1
fi
if [[ $stage == calibrate ]]; then
  run python3 -m vllm_blackwell_sparse.cli calibrate --model /tmp/smollm2 --out "$ART/calibrate.json" "$@" || rc=1
fi
exit $rc
