import os

from vllm_blackwell_sparse.envs import ENV_VARS

# Keep the developer's VBS_* settings out of the tests; VBS_TEST_ARTIFACTS (where GPU
# tests write) and VBS_COMMIT (a label) stay.
for _name in ENV_VARS:
    if _name not in ("VBS_TEST_ARTIFACTS", "VBS_COMMIT"):
        os.environ.pop(_name, None)
