#!/bin/bash
# Serve the embedded tiny Llama (dummy weights) with the CUSTOM backend on 127.0.0.1 and ask it for a completion.
set -euo pipefail
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "this example serves the model with vLLM on an sm90 / sm100 GPU, and CUDA is not available here" >&2; exit 2; }
MODEL=$(python3 -c "from vllm_blackwell_sparse.demo import TINY_LLAMA_DIR; print(TINY_LLAMA_DIR)")
vllm serve "$MODEL" --load-format dummy --attention-backend CUSTOM --host 127.0.0.1 --port 8011 \
  --max-model-len 4096 --gpu-memory-utilization 0.3 \
  --additional-config '{"blackwell_sparse": {}}' &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 1 150); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 2; done
curl -s http://127.0.0.1:8011/v1/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"Long-context serving spends\", \"max_tokens\": 16, \"temperature\": 0}"
echo
