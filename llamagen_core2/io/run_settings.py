"""The settings record of an output directory, so that a rerun never mixes the results of two runs.

Contract (the one rule for every subcommand that writes results into a directory: `generate` and `sample`
keep `settings.json`, `collect` the `meta` of its shard manifest):
  * `check_run_settings(path, settings, *, has_results, write, results, load=None, store=None)`, called before
    any work, with `settings` the JSON-able facts that decide the results (compared after a JSON round trip):
      - the directory holds no result yet: `settings` replace any record a refused or failed run left
        (stored when `write`: rank 0 under torchrun), so a record never blocks the corrected rerun;
      - it holds results and a record: the record must equal `settings`, else InvalidArgument naming each
        difference (`key: old -> new`); equal settings resume;
      - it holds results but no record (an older version, another program, files copied in): refused, since
        nothing says what made them.
  * `load(path) -> dict | None` / `store(path, settings)` read and write the record in the caller's format
    (default: the whole file is the settings, indented JSON written atomically).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ..errors import InvalidArgument, describe_differences


def _load_json(path: Path) -> Optional[dict]:
    from .checkpoint import read_json

    return read_json(path, "settings record") if path.is_file() else None


def _store_json(path: Path, settings: dict) -> None:
    from .files import atomic_write_json

    atomic_write_json(path, settings)


def check_run_settings(path, settings: dict, *, has_results: bool, write: bool, results: str,
                       load: Optional[Callable[[Path], Optional[dict]]] = None,
                       store: Optional[Callable[[Path, dict], None]] = None) -> dict:
    """Record `settings` in `path` or check them against its record (module docstring); returns them as
    compared (after a JSON round trip)."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))
    if not has_results:
        if write:
            (store or _store_json)(path, settings)
        return settings
    old = (load or _load_json)(path)
    where = path.parent
    if old is None:
        raise InvalidArgument(f"{where} holds {results} but no {path.name} saying which settings made them; "
                              f"use a new --out directory")
    if old != settings:
        raise InvalidArgument(f"{where} holds {results} made with other settings "
                              f"({describe_differences(old, settings)}); use a new --out directory or the same "
                              f"settings to resume")
    return settings
