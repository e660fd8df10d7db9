"""Command-line arguments shared by every `llamagen-core2` subcommand: the parser, the argument types and the
argument groups (no model is loaded here: that is loading.py).

  * `Parser`: argparse with defaults shown in `--help` and every usage error as one line, exit status 2.
  * Argument types (`positive_int`, `finite_float`, ...) that refuse NaN, non-integers and out-of-range values
    while the command line is parsed, before any model is loaded or any file is written.
  * Argument groups (model, VQ, conditions, sampling, CoRe^2 refine, decoding, threads), so every subcommand
    spells an option, its default and its error message the same way. LlamaGen's own flag names are accepted as
    aliases (--gpt-ckpt, --gpt-model, --vq-ckpt, --vq-model, --precision none|fp16|bf16, --global-seed,
    --per-proc-batch-size), and the sampling defaults follow the model type (filled in by loading.load_gpt):
    c2i the subcommand's, t2i LlamaGen's sample_t2i.py (cfg 7.5, top-k 1000).
  * `check_refine_args(args)`: the argument-only checks of the refine group, before anything is loaded.
  * `--compile` (LlamaGen's flag, on generate / sample / collect) is accepted with one line saying that it has no
    effect (loading.note_compile): the engine captures CUDA graphs by itself. Usage errors name their subcommand.
"""
from __future__ import annotations

import argparse
import math

import torch

from ..device import DEVICE_FORMS, parse_device
from ..errors import InvalidArgument
from ..guidance.config import DEFAULT_GUIDANCE, MODES, needs_weak

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMAGEN_PRECISION = {"none": "float32", "fp16": "float16", "bf16": "bfloat16"}  # LlamaGen's --precision
T2I_SAMPLING = (DEFAULT_GUIDANCE["t2i"].cfg_scale, DEFAULT_GUIDANCE["t2i"].top_k)  # LlamaGen sample_t2i.py


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
    from ..config import check_gpt_preset

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


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int_in(0, MAX_THREADS), default=DEFAULT_THREADS,
                   help="torch CPU threads: 1 avoids OpenMP spin-waits on shared/busy CPUs and is all a GPU run "
                        "needs (docs/cli.md#threads); 0 = torch's choice (one per core)")


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


def class_names_help() -> str:
    """The shipped mini world's classes, for the help of every option that takes class ids."""
    from ..world.dataset import CLASS_NAMES

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
    from ..decode.jacobi import DECODINGS, DEFAULT_WINDOW

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
