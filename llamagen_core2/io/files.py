"""Atomic file writes (temp file + os.replace) with the user's umask, and output-path checks.

Contract:
  * `atomic_write(path, write)` calls `write(tmp_path)` on a hidden temp file `.{name}.{random}.tmp` in the
    target's directory, then renames it over `path`, so a file with its final name is always complete and a
    killed writer leaves at most a hidden temp file (which every reader ignores). The temp file is created with
    mode 0o666 and the process umask applied, exactly like a plain `open(path, "w")`, and keeps that mode even
    when the writer recreates the file (tempfile.mkstemp, and safetensors' own writer, make files 0600 whatever
    the umask).
  * `atomic_write_json(path, obj)` writes indented, key-sorted JSON and refuses NaN/inf (NonFiniteError
    naming the key), so no JSON file this package writes ever holds a non-finite number.
  * `check_output_dir(path, what)` / `check_output_file(path, what)` refuse, before any work is done, an
    output directory that is an existing file or a path that cannot be created or written.
Every file this package writes (safetensors shards and weights, config/manifest/settings JSON, PNG, npz) goes
through `atomic_write`.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Callable, Optional

from ..errors import InvalidArgument, NonFiniteError


def _create_temp(path: Path) -> Path:
    """An empty, new hidden file next to `path`, created with 0o666 & ~umask like any plain open()."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temp file next to {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temp file in the same directory, then it is renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    mode = os.stat(tmp).st_mode & 0o777  # 0o666 & ~umask, as the OS applied it
    try:
        write(str(tmp))
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that recreates its file (safetensors makes it 0600)
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def nonfinite_key(obj, where: str = "") -> Optional[str]:
    """Path ("a.b[3]") of the first NaN/inf float inside a JSON-like object, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "<value>"
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = nonfinite_key(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = nonfinite_key(v, f"{where}[{i}]")
            if found:
                return found
    return None


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Indented, key-sorted JSON, written atomically; NaN/inf anywhere in `obj` is refused (NonFiniteError)."""
    bad = nonfinite_key(obj)
    if bad is not None:
        raise NonFiniteError(f"refusing to write {path}: {bad} is NaN/inf")
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """An output directory that exists as a writable directory or can be created; checked before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidArgument(f"{what} {path} is an existing file, not a directory")
    _check_writable(path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """An output file path whose directory is (or can be made) writable and which is not a directory."""
    path = Path(path)
    if path.is_dir():
        raise InvalidArgument(f"{what} {path} is a directory; give a file name")
    _check_writable(path.parent if str(path.parent) else Path("."), what)
    return path


def _check_writable(directory: Path, what: str) -> None:
    base = _nearest_existing(directory)
    if not base.is_dir():
        raise InvalidArgument(f"{what} {directory} cannot be created: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InvalidArgument(f"{what} {directory} is not writable (no write permission on {base})")
