import os

from vllm_blackwell_sparse.config import CONFIG_KEYS, env_var

# Keep the developer's VBS_<key> settings out of the tests (VBS_TEST_ARTIFACTS stays).
for _key in CONFIG_KEYS:
    os.environ.pop(env_var(_key), None)
