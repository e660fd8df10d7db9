"""`llamagen-core2`, the command line (console script `llamagen_core2.cli:main`; `python -m llamagen_core2.cli`).

    commands.py   the parser of every subcommand and `main`
    args.py       the parser class, argument types and argument groups (no model loading)
    loading.py    parsed arguments -> device, models, conditions, guidance settings
    runner.py     running a subcommand: user errors as one line (exit 2), --threads, the final JSON line
    generate.py, convert.py, core2.py (collect / reflect / sample), demo.py, diffusion.py (diffuse,
    diffuse-collect, diffuse-reflect): one module per subcommand family, each with `add_subcommand(subparsers)`
"""
from .commands import build_parser, main

__all__ = ["build_parser", "main"]
