#!/usr/bin/env python3
r"""`vllm serve MODEL --attention-backend CUSTOM [more vllm serve args]`.

    python entrypoints/serve.py MODEL --host 127.0.0.1 --port 8000 \
        --additional-config '{"blackwell_sparse": {}}'
"""

import sys

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    from vllm.entrypoints.cli.main import main

    args = sys.argv[1:]
    if not any(a == "--attention-backend" or a.startswith("--attention-backend=") for a in args):
        args += ["--attention-backend", "CUSTOM"]
    sys.argv = ["vllm", "serve", *args]
    sys.exit(main())
