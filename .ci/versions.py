"""The versions this environment resolved, against the tested set in constraints.txt; or a new constraints.txt.

    python .ci/versions.py                          # key packages, then every difference from constraints.txt
    python .ci/versions.py --write constraints.txt  # rewrite the lock from this environment (pip freeze)

The lock is `pip freeze --all --exclude-editable` of a fresh virtual environment made by the README's set-up
(the project itself and pip left out), with torch's local build tag dropped (2.13.0+cpu -> 2.13.0) so that a
CPU and a CUDA build of the same release both satisfy it.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

KEY = ("torch", "transformers", "diffusers", "huggingface-hub", "kernels", "triton", "numpy", "tokenizers",
       "safetensors")
HEADER = """\
# Tested versions of everything `pip install -e ".[dev]"` resolves: README command 1 and .ci/run install with
# `-c constraints.txt`, so a fresh machine gets what CI tested. Resolved {date} on Python {python} ({machine}).
# torch has no local build tag, so its CPU and CUDA wheels both satisfy the pin. On another Python version a
# pin may have no wheel: install without `-c constraints.txt` there.
# Refresh: `bash .ci/run-latest --refresh` (fresh venv, newest versions, the README's tests; rewrites this file
# with `python .ci/versions.py --write constraints.txt` only when they pass). Do not edit by hand.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def frozen() -> dict[str, str]:
    """{name: version} of this environment, as pip freeze pins it: editable projects and pip itself left out,
    setuptools kept (torch requires it)."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line and not line.startswith(("#", "-")):
            name, version = line.split("==", 1)
            if canonical(name) != "pip":
                pins[name.strip()] = version.strip()
    return pins


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version
    return pins


def without_local_tag(name: str, version: str) -> str:
    return version.split("+", 1)[0] if canonical(name) == "torch" else version


def write_lock(path: Path) -> None:
    pins = frozen()
    lines = [f"{name}=={without_local_tag(name, v)}" for name, v in sorted(pins.items(), key=lambda p: canonical(p[0]))]
    path.write_text(HEADER.format(date=datetime.date.today().isoformat(), python=platform.python_version(),
                                  machine=f"{platform.system()} {platform.machine()}") + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {path}")


def report(path: Path) -> None:
    pins = {canonical(n): without_local_tag(n, v) for n, v in frozen().items()}
    print(f"resolved {datetime.date.today().isoformat()}, Python {platform.python_version()}: "
          + ", ".join(f"{name} {pins.get(name, 'absent')}" for name in KEY))
    lock = read_lock(path) if path.is_file() else {}
    changed = [f"{n} {lock[n]} -> {pins[n]}" for n in sorted(pins.keys() & lock.keys()) if pins[n] != lock[n]]
    added = [f"{n} {pins[n]}" for n in sorted(pins.keys() - lock.keys())]
    gone = [f"{n} {lock[n]}" for n in sorted(lock.keys() - pins.keys())]
    if not (changed or added or gone):
        print(f"same versions as {path}")
    for label, items in (("newer/other than", changed), ("not in", added), ("missing from this env, in", gone)):
        if items:
            print(f"{label} {path}: " + ", ".join(items))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", nargs="?", default="constraints.txt", type=Path)
    parser.add_argument("--write", action="store_true", help="rewrite the lock from this environment")
    args = parser.parse_args(argv)
    write_lock(args.lock) if args.write else report(args.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
