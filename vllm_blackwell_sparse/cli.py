"""The ``vbs`` command: ``vbs doctor``, ``vbs demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbs", description="vllm-blackwell-sparse tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="GPU, versions, plugin discovery and the kernels available here")
    demo = sub.add_parser("demo", help="offline LLM() on the embedded tiny Llama: our backend vs stock FLASH_ATTN")
    demo.add_argument("--num-prompts", type=int, default=32)
    demo.add_argument("--prompt-tokens", type=int, default=1024)
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    demo.add_argument("--cpu", action="store_true", help="run the CPU demonstration of the oracles even with a GPU")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        from vllm_blackwell_sparse.doctor import run_doctor

        return run_doctor()
    if args.command == "demo":
        from vllm_blackwell_sparse import demo as demo_mod

        if args.cpu:
            return demo_mod.cpu_demo()
        return demo_mod.run_demo(
            num_prompts=args.num_prompts, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, json_path=args.json_path
        )
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
