"""Running a subcommand: the error families a user can fix become one line and exit status 2
(`run_subcommand`), `--threads` (`apply_threads`) and the final JSON line (`print_json`)."""
from __future__ import annotations

import json
import logging
import sys

import torch

from ..errors import rank_and_world, user_error_message


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


def print_json(obj, *, every_rank: bool = False) -> None:
    """A subcommand's result: one line of JSON on stdout, always its last line (docs/cli.md#outputs-and-reruns);
    rank 0 only under torchrun unless `every_rank` (each rank reports its own share)."""
    if every_rank or rank_and_world()[0] == 0:
        print(json.dumps(obj, default=str), flush=True)
