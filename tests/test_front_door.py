"""The README's set-up installs the tested versions (constraints.txt) and CI runs exactly the README's commands.

What the commands resolve and how the suite fared with the tested and the newest versions: docs/versions.md.
"""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.!+-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def readme_commands() -> tuple[str, str]:
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands  # command 1 stays one line
    return commands[0], commands[1]


def lock() -> dict:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = PIN.fullmatch(line.strip())
            assert m, f"constraints.txt: {line!r} is not name==version"
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def test_ci_runs_the_readme_set_up_with_the_lock_then_exactly_the_test_command():
    setup, test = readme_commands()
    steps = [s.strip() for s in setup.split("&&")]
    installs = [s for s in steps if s.startswith("pip install")]
    assert installs == ["pip install torch==2.13.0", 'pip install -e ".[dev]" -c constraints.txt'], steps
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert [line.replace(" -q", "") for line in ci if line.startswith("pip install")] == installs
    assert ci[-1] == test == "python -m pytest -q"


def test_the_lock_pins_every_declared_dependency_and_the_readme_torch():
    pyproject = (REPO / "pyproject.toml").read_text()
    declared = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.S | re.M).group(1)
    dev = re.search(r"^dev = \[(.*?)\]", pyproject, re.M).group(1)
    names = {canonical(re.match(r"[A-Za-z0-9._-]+", d).group(0)) for d in re.findall(r'"([^"]+)"', declared + dev)}
    pins = lock()
    assert len(names) >= 12 and names <= set(pins), sorted(names - set(pins))
    assert "llamagen-core2" not in pins  # the project itself is installed editable, not pinned
    setup, _ = readme_commands()
    assert f"torch=={pins['torch']}" in setup  # no local tag (+cpu): a CUDA build of the same release fits too
    assert pins["diffusers"] in pyproject  # the version the diffusion extra pins
