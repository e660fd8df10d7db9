"""Command-line pieces shared by every `llamagen-core2` subcommand (cli.py, core2_cli.py, world/demo.py,
diffusion/cli.py).

  * `Parser`: argparse with defaults shown in `--help` and every usage error as one line, exit status 2.
  * Argument types (`positive_int`, `finite_float`, ...) that refuse NaN, non-integers and out-of-range values
    while the command line is parsed, before any model is loaded or any file is written.
  * Argument groups (model, VQ, conditions, sampling, CoRe^2 refine, threads) and the loaders behind them, so
    every subcommand spells an option, its default and its error message the same way. LlamaGen's own flag names
    are accepted as aliases (--gpt-ckpt, --gpt-model, --vq-ckpt, --vq-model, --precision none|fp16|bf16,
    --global-seed, --per-proc-batch-size), and the sampling defaults follow the model type: c2i the subcommand's,
    t2i LlamaGen's sample_t2i.py (cfg 7.5, top-k 1000). Checkpoints are local paths or Hub repo ids (hub.py).
  * `resolve_device(args)`: the one `--device` rule (llamagen_core2/device.py), `apply_threads(args)`: `--threads`.
  * `--compile` (LlamaGen's flag, on generate / sample / collect) is accepted with one line saying that it has no
    effect: the engine captures CUDA graphs by itself. Usage errors name their subcommand.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys

import torch

from .device import DEVICE_FORMS, parse_device, resolve_device as resolve_device_spec
from .errors import InvalidArgument, rank_and_world, user_error_message
from .guidance_config import MODES, GuidanceConfig, needs_weak

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMAGEN_PRECISION = {"none": "float32", "fp16": "float16", "bf16": "bfloat16"}  # LlamaGen's --precision
T2I_SAMPLING = (7.5, 1000)  # LlamaGen sample_t2i.py: cfg scale, top-k


class _Precision(argparse.Action):
    """LlamaGen's `--precision none|fp16|bf16`, stored as our --dtype."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, "dtype", LLAMAGEN_PRECISION[values])

# Why --threads defaults to 1 (docs/cli.md#threads has the command and the numbers): on a busy or shared CPU,
# torch's default (one intra-op thread per core) made collect / reflect / sample of the mini-world models
# several times slower than one thread (OpenMP workers spin-waiting for cores other jobs hold); on a GPU the
# host thread only launches kernels. Raise it for large models on idle CPU cores; 0 = torch's default.
DEFAULT_THREADS = 1
MAX_THREADS = 1024  # far beyond any CPU; a typo like 100000 would otherwise ask OpenMP for that many threads


# ---------------------------------------------------------------------- parser
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` states every option's default (unless its help already does) and keeps description line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or action.nargs == 0 \
                or action.required or (not action.option_strings and action.default is None):
            return text
        default = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {default})" if text else f"default: {default}"


class Parser(argparse.ArgumentParser):
    """Defaults in --help; a usage error is one line naming the option and the subcommand (`llamagen-core2
    generate: error: ...`), exit status 2 (no usage dump)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports unrecognized arguments from the top-level parser, whose prog lacks the subcommand.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._chosen(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _chosen(self, parsed) -> "Parser":
        """The parser of the subcommand the command line chose (this one when it has none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(parsed, action.dest, None))
                if isinstance(sub, Parser):
                    return sub._chosen(parsed)
        return self


# ---------------------------------------------------------------------- argument types
def _number(text: str, kind):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def int_in(minimum: int, maximum: int):
    def parse(text: str) -> int:
        value = _number(text, int)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be an integer in [{minimum}, {maximum}], got {text!r}")
        return value
    parse.__name__ = f"integer in [{minimum}, {maximum}]"
    return parse


def float_in(minimum=None, maximum=None, *, above=None, below=None):
    """A finite float in the given bounds (minimum/maximum inclusive, above/below exclusive)."""
    def parse(text: str) -> float:
        value = _number(text, float)
        if not math.isfinite(value) or (minimum is not None and value < minimum) or \
                (maximum is not None and value > maximum) or (above is not None and value <= above) or \
                (below is not None and value >= below):
            low = f"[{minimum}" if minimum is not None else (f"({above}" if above is not None else "(-inf")
            high = f"{maximum}]" if maximum is not None else (f"{below})" if below is not None else "inf)")
            raise argparse.ArgumentTypeError(f"must be a finite number in {low}, {high}, got {text!r}")
        return value
    parse.__name__ = "finite number"
    return parse


finite_float = float_in()
non_negative_float = float_in(0.0)
positive_float = float_in(above=0.0)
fraction = float_in(0.0, 1.0)


def seed_int(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1], got {text!r}")
    return value


def device_arg(text: str) -> str:
    try:
        parse_device(text)
    except InvalidArgument:
        raise argparse.ArgumentTypeError(f"must be {DEVICE_FORMS}, got {text!r}") from None
    return text.strip()


def gpt_preset_arg(text: str) -> str:
    from .config import check_gpt_preset

    try:
        return check_gpt_preset(text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------------- shared arguments / loading
def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=device_arg,
                   help="auto = cuda if available else cpu; cuda = cuda:LOCAL_RANK under torchrun; "
                        "or cuda:N, cpu, mps")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """LlamaGen's --compile, accepted where its sampling scripts take it; load_gpt says in one line what it does."""
    p.add_argument("--compile", action="store_true",
                   help="accepted for LlamaGen's scripts; no effect: on CUDA the engine captures its decode steps in "
                        "CUDA graphs by itself, on a CPU it runs them eagerly")
    p.set_defaults(command_prog=p.prog)


def note_compile(args) -> None:
    """One stderr line for --compile (rank 0), once the device is known."""
    if not getattr(args, "compile", False) or rank_and_world()[0] != 0:
        return
    if str(args.device).startswith("cuda"):
        effect = "on CUDA the engine captures its decode steps in CUDA graphs by itself (with the fused Triton kernels)"
    else:
        effect = (f"on {args.device} the engine runs its decode steps eagerly (on CUDA it captures CUDA graphs by "
                  f"itself)")
    print(f"{args.command_prog}: --compile has no effect: {effect}", file=sys.stderr)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int_in(0, MAX_THREADS), default=DEFAULT_THREADS,
                   help="torch CPU threads: 1 avoids OpenMP spin-waits on shared/busy CPUs and is all a GPU run "
                        "needs (docs/cli.md#threads); 0 = torch's choice (one per core)")


def run_subcommand(prog: str, args, fn) -> tuple[int, object]:
    """Run one subcommand -> (exit status, its result). The one place the error families a user can fix
    (errors.user_error_message) become one line on stderr and status 2; Ctrl-C is 130; anything else is a bug
    and keeps its traceback."""
    logging.basicConfig(format="%(name)s: %(message)s")  # library code logs; warnings (and opted-in info) to stderr
    try:
        return 0, fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130, None
    except Exception as e:  # noqa: BLE001 -- mapped by family; anything unmapped is re-raised
        message = user_error_message(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2, None


def apply_threads(args) -> None:
    """Set torch's intra-op thread count from --threads (0 leaves torch's default)."""
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(int(threads))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpt", "--gpt-ckpt", dest="gpt", required=True,
                   help="base GPT checkpoint: .pt, .safetensors, a converted directory or a Hub repo id")
    p.add_argument("--gpt-filename", default=None,
                   help="file inside the Hub repo --gpt (e.g. c2i_B_256.pt in FoundationVision/LlamaGen)")
    p.add_argument("--gpt-preset", "--gpt-model", dest="gpt_preset", default=None, type=gpt_preset_arg,
                   help="GPT preset (e.g. GPT-B, GPT-XL-t2i); default: inferred from the checkpoint")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="image size the GPT was trained for (256/384/512); default: from the checkpoint")
    add_device_arg(p)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="base-model weights dtype")
    p.add_argument("--precision", dest="dtype", choices=sorted(LLAMAGEN_PRECISION), action=_Precision,
                   default=argparse.SUPPRESS, help="LlamaGen's name for --dtype (none = float32; default: --dtype's)")
    add_threads_arg(p)


def add_vq_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vq", "--vq-ckpt", dest="vq", required=True,
                   help="VQ tokenizer checkpoint (.pt / .safetensors / directory) or a Hub repo id")
    p.add_argument("--vq-filename", default=None, help="file inside the Hub repo --vq (e.g. vq_ds16_c2i.pt)")
    p.add_argument("--vq-preset", "--vq-model", dest="vq_preset", default=None, choices=("VQ-16", "VQ-8"),
                   help="default: a directory's config.json, else VQ-16")


def checkpoint_source(path_or_repo: str, filename=None) -> str:
    """A checkpoint source for settings records and manifests: the absolute local path, or the Hub repo id
    (+ file) as given."""
    import os

    from .hub import is_repo_id

    source = path_or_repo if is_repo_id(path_or_repo) else os.path.abspath(path_or_repo)
    return source if filename is None else f"{source}/{filename}"


def load_vq(args):
    from .vq import VQModel

    return VQModel.from_pretrained(args.vq, preset=args.vq_preset, device=args.device, filename=args.vq_filename)


def class_names_help() -> str:
    """The shipped mini world's classes, for the help of every option that takes class ids."""
    from .world.dataset import CLASS_NAMES

    return "mini world (checkpoints/world_gpt): " + ", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES))


SEED_HELP = "image n of the run uses seeding.image_key(seed, n), whatever the batch size"


def add_condition_args(p: argparse.ArgumentParser, seed_help: str = SEED_HELP) -> None:
    p.add_argument("--classes", default=None,
                   help=f"c2i class ids, e.g. '0-999' or '1,7,207' (ImageNet ids for LlamaGen); {class_names_help()}")
    p.add_argument("--captions", default=None, help="t2i: text file with one caption per line")
    p.add_argument("--t5", default=None, help="t2i: FLAN-T5-XL for caption features (local directory or Hub id "
                                              "google/flan-t5-xl)")
    p.add_argument("--per-class", type=positive_int, default=1, help="images per class id / caption")
    p.add_argument("--batch-size", "--per-proc-batch-size", dest="batch_size", type=positive_int, default=16,
                   help="images per batch (per process under torchrun)")
    p.add_argument("--seed", "--global-seed", dest="seed", type=seed_int, default=0, help=seed_help)


def add_sampling_args(p: argparse.ArgumentParser, cfg_default: float, top_k_default: int = 0,
                      cfg_above: float | None = None) -> None:
    """cfg scale / top-k default by model type (filled in by load_gpt): c2i the given ones, t2i sample_t2i.py's."""
    cfg_type = non_negative_float if cfg_above is None else float_in(above=cfg_above)
    cfg_rule = "<= 1: cond only" if cfg_above is None else f"> {cfg_above}"
    p.add_argument("--cfg-scale", type=cfg_type, default=None,
                   help=f"CFG scale ({cfg_rule}); default {cfg_default:g} (c2i), {T2I_SAMPLING[0]:g} (t2i)")
    p.add_argument("--top-k", type=non_negative_int, default=None,
                   help=f"0 = full vocabulary (FID setting); default {top_k_default} (c2i), {T2I_SAMPLING[1]} (t2i)")
    p.set_defaults(sampling_defaults={"c2i": (cfg_default, top_k_default), "t2i": T2I_SAMPLING})
    p.add_argument("--top-p", type=float_in(above=0.0, maximum=1.0), default=1.0, help="1 = off")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")


def resolve_device(args) -> str:
    """--device -> a concrete device string (cuda -> cuda:LOCAL_RANK under torchrun); sets args.device."""
    args.device = str(resolve_device_spec(args.device))
    return args.device


def load_gpt(args):
    from .model import GPT

    resolve_device(args)
    note_compile(args)
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    gpt = GPT.from_pretrained(args.gpt, args.gpt_preset, device=args.device, dtype=DTYPES[args.dtype],
                              filename=getattr(args, "gpt_filename", None), **overrides)
    defaults = getattr(args, "sampling_defaults", None)
    if defaults is not None:
        cfg_scale, top_k = defaults[gpt.config.model_type]
        args.cfg_scale = cfg_scale if args.cfg_scale is None else args.cfg_scale
        args.top_k = top_k if args.top_k is None else args.top_k
    return gpt


def guidance_from_args(args, schedule=None) -> GuidanceConfig:
    """The GuidanceConfig of add_sampling_args + add_refine_args (+ --cfg-interval where a command has it)."""
    return GuidanceConfig(mode=args.mode, schedule=schedule, cfg_scale=args.cfg_scale,
                          cfg_interval=getattr(args, "cfg_interval", -1), w2s_scale=args.w2s_scale,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def load_conditions(args, gpt):
    """-> (conditions, caption_mask or None, names or None) from --classes or --captions/--t5."""
    from .collect import parse_class_ids

    c = gpt.config
    if c.model_type == "c2i":
        if args.captions is not None or args.classes is None:
            raise InvalidArgument("a class-conditional GPT needs --classes (e.g. '0-999'), not --captions")
        return torch.tensor(parse_class_ids(args.classes, c.num_classes)), None, None
    if args.captions is None or args.t5 is None:
        raise InvalidArgument("a text-conditional GPT needs --captions FILE and --t5 DIR|google/flan-t5-xl")
    from .text import CaptionEncoder

    try:
        with open(args.captions, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise InvalidArgument(f"--captions {args.captions} is not a UTF-8 text file") from None
    if not names:
        raise InvalidArgument(f"--captions {args.captions} holds no captions")
    encoder = CaptionEncoder.from_pretrained(args.t5, device=args.device, dtype=torch.bfloat16
                                             if str(args.device).startswith("cuda") else None)
    feats, masks = [], []
    for start in range(0, len(names), 32):
        f_, m_ = encoder.encode(names[start:start + 32])
        feats.append(f_.cpu())
        masks.append(m_.cpu())
    del encoder
    return torch.cat(feats), torch.cat(masks), names


def print_json(obj, *, every_rank: bool = False) -> None:
    """A subcommand's result: one line of JSON on stdout, always its last line (docs/cli.md#outputs-and-reruns);
    rank 0 only under torchrun unless `every_rank` (each rank reports its own share)."""
    if every_rank or rank_and_world()[0] == 0:
        print(json.dumps(obj, default=str), flush=True)


def add_refine_args(p: argparse.ArgumentParser) -> None:
    """Guidance mode, slow/fast schedules and the CoRe^2 weak model."""
    p.add_argument("--mode", default="cfg", choices=MODES,
                   help="guidance for every token (fast/slow need --weak)")
    sched = p.add_mutually_exclusive_group()
    sched.add_argument("--slow-first", type=fraction, default=None, help="slow for this fraction of tokens, then fast")
    sched.add_argument("--fast-first", type=fraction, default=None, help="fast for this fraction of tokens, then slow")
    sched.add_argument("--slow-first-tokens", type=non_negative_int, default=None,
                       help="slow for the first K tokens, then fast")
    sched.add_argument("--fast-first-tokens", type=non_negative_int, default=None,
                       help="fast for the first K tokens, then slow")
    p.add_argument("--weak", default=None, help="weak-model directory written by `reflect`")
    p.add_argument("--w2s-scale", type=non_negative_float, default=1.5, help="slow mode: out = weak + a * (cfg - weak)")
    p.add_argument("--allow-other-base-weights", action="store_true",
                   help="use a weak model trained for a same-shape base with different weights")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """How tokens are decoded (not which: Jacobi decoding returns the sequential tokens, docs/decoding.md)."""
    from .jacobi import DECODINGS, DEFAULT_WINDOW

    p.add_argument("--decoding", default="sequential", choices=DECODINGS,
                   help="sequential: one forward pass per token; jacobi: windows of --jacobi-window tokens per pass, "
                        "the same tokens in fewer passes (docs/decoding.md)")
    p.add_argument("--jacobi-window", type=positive_int, default=DEFAULT_WINDOW,
                   help="tokens predicted per forward pass with --decoding jacobi")


def check_refine_args(args) -> None:
    """Argument-only checks of add_refine_args' options, run before any model is loaded."""
    schedule_given = any(getattr(args, k) is not None for k in
                         ("slow_first", "fast_first", "slow_first_tokens", "fast_first_tokens"))
    if (schedule_given or needs_weak([args.mode])) and args.weak is None:
        raise InvalidArgument("--mode fast/slow and --slow-first/--fast-first need --weak DIR (from `reflect`)")


def load_refine(args, gpt):
    """-> (weak model or None, per-token schedule or None) from add_refine_args' options."""
    from .sample import build_schedule
    from .weak_model import WeakModel

    weak = None
    if args.weak is not None:
        from .hub import resolve

        weak_dir = resolve(args.weak, allow_patterns=("*.json", "*.safetensors"), what="--weak")
        weak = WeakModel.from_pretrained(weak_dir, gpt, device=args.device, dtype=DTYPES[args.dtype],
                                         require_same_weights=not args.allow_other_base_weights)
    schedule = build_schedule(gpt.config.num_image_tokens, mode=args.mode, slow_first=args.slow_first,
                              fast_first=args.fast_first, slow_first_tokens=args.slow_first_tokens,
                              fast_first_tokens=args.fast_first_tokens)
    return weak, schedule  # check_refine_args refused fast/slow without --weak before anything was loaded
