#!/usr/bin/env python3
"""The `vbs` command (`vbs doctor`, `vbs demo`) where console scripts are not installed."""

import sys

from vllm_blackwell_sparse.cli import main

if __name__ == "__main__":
    sys.exit(main())
