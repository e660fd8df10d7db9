"""The `llamagen-core2` parser: every subcommand module registered, and `main`.

Each subcommand module exposes `add_subcommand(subparsers)`; the modules are listed in SUBCOMMAND_MODULES and
imported here by name, so a missing optional dependency (e.g. diffusers) only affects its own subcommand, and the
feature code behind a subcommand is imported when it runs, which keeps `llamagen-core2 --help` fast. `main` runs
the chosen subcommand through runner.run_subcommand, the one place that maps the error families a user can fix
(errors.user_error_message: bad arguments, unreadable or mismatched files, file system errors, NaN refusals, a
missing optional package, out of memory) to one line and exit status 2; any other exception is a bug and keeps
its traceback. Usage errors are one line too (args.Parser), and every subcommand's --help shows defaults.
"""
from __future__ import annotations

import argparse
import importlib

from .args import Parser
from .runner import apply_threads, run_subcommand

SUBCOMMAND_MODULES = (  # in the order of `llamagen-core2 --help`
    "llamagen_core2.cli.generate",  # generate
    "llamagen_core2.cli.convert",  # convert
    "llamagen_core2.cli.core2",  # collect, reflect, sample (CoRe^2)
    "llamagen_core2.cli.demo",  # demo on the shipped mini-world checkpoints
    "llamagen_core2.cli.diffusion",  # diffuse (+ diffusion collect/reflect)
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llamagen-core2", description="LlamaGen inference with CoRe^2 guidance")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the feature module itself is absent from this install
                continue
            raise
        module.add_subcommand(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    status, result = run_subcommand(f"llamagen-core2 {args.command}", args, args.func)
    return status or int(result or 0)
