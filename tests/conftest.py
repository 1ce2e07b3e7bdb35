import os

from vllm_blackwell_sparse.config import ENV_PREFIX, _PARSERS

# Keep the developer's VBS_<key> settings out of the tests (VBS_TEST_ARTIFACTS stays).
for _key in _PARSERS:
    os.environ.pop(ENV_PREFIX + _key.upper(), None)
