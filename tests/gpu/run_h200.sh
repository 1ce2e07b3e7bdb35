#!/bin/bash
# The GPU test session on the H200 (after the `full` bundle is installed; see docs/VERIFICATION.md).
# Usage: bash tests/gpu/run_h200.sh STAGE   with STAGE = kernels | llm | server | demo | dsa | dsa-eager | all
# (kernels: backend impl (dense FA3 / FA4) + GVR top-k + BLASST decode; llm: offline LLM() token equality; server: OpenAI server;
#  dsa / dsa-eager: GVR inside the tiny DeepSeek-V3.2, CUDA graphs / enforce_eager, ~4 min each)
# Logs and JSON artifacts go to $OUT (or ./gpu-artifacts).
set -uo pipefail
source /tmp/vbs-env.sh
ART=${OUT:-$PWD/gpu-artifacts}; mkdir -p "$ART"
export VBS_TEST_ARTIFACTS=$ART PYTHONUNBUFFERED=1
stage=${1:-all}
run() { echo "== $*"; "$@" 2>&1 | tee -a "$ART/gpu-tests.log"; return "${PIPESTATUS[0]}"; }
rc=0
if [[ $stage == kernels || $stage == all ]]; then
  run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || rc=1
  run python3 -m vllm_blackwell_sparse.cli doctor || rc=1
  run python3 -m pytest -q -rs -s -p no:warnings tests/gpu/test_backend_fa4.py tests/gpu/test_gvr_topk.py tests/gpu/test_blasst_decode.py --junitxml="$ART/junit-kernels.xml" || rc=1
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
exit $rc
