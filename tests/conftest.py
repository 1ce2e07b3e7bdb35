import os

# Keep vLLM's plugin loader and our config free of the developer's environment.
for _name in list(os.environ):
    if _name.startswith("VBS_"):
        del os.environ[_name]
