"""The repository's top-level `kernels/` folder never shadows the PyPI package `kernels`, however Python is started.

transformers (>= 5.x) and diffusers run `from kernels import ...` when the PyPI distribution `kernels` is installed
(transformers 5.25 depends on it). `kernels/` has no `__init__.py`, so where the repository root is on sys.path it is
at most a namespace portion, which a regular package anywhere on sys.path wins over; `llamagen_core2/__init__.py`
binds the folder as `llamagen_core2.kernels` instead (docs/design.md#layout).

Each way of starting Python runs in a subprocess with a `sitecustomize.py` on PYTHONPATH that records, when the
process exits, sys.path, `importlib.util.find_spec("kernels")` and the `kernels` module actually loaded (child
processes, e.g. torchrun's worker, inherit it). The record also shows that the directory in question (the root, or
benchmarks/ for a script there) really was on sys.path, so a pass is not the result of a path that was never tried.
A wheel built from the repository holds the folder as llamagen_core2/kernels/ and imports from an unpacked copy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "kernels"

PROBE = textwrap.dedent("""
    import atexit, importlib.util, json, os, sys

    def _record():
        spec = importlib.util.find_spec("kernels")
        loaded = sys.modules.get("kernels")
        with open(os.environ["IMPORT_PROBE_OUT"], "a") as f:
            f.write(json.dumps({
                "argv": list(getattr(sys, "argv", [])),
                "path": [os.path.abspath(p) for p in sys.path],
                "origin": spec and spec.origin,
                "locations": list(spec.submodule_search_locations or []) if spec else [],
                "loaded": getattr(loaded, "__file__", None) if loaded is not None else None,
            }) + "\\n")

    atexit.register(_record)
""")


@pytest.fixture(autouse=True)
def pypi_kernels_installed():
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed: nothing for the folder to shadow")


def run_probed(tmp_path, argv, *, cwd=REPO, timeout=300):
    """Run argv with the probe; -> (completed process, the records of every Python process it started)."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    out = tmp_path / "records.jsonl"
    env = dict(os.environ, IMPORT_PROBE_OUT=str(out), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert records, f"the probe recorded nothing: {proc.stderr[-2000:]}"
    return proc, records


def assert_pypi_kernels(record, tried: Path):
    """`kernels` resolves to the installed distribution although `tried` comes before it on sys.path."""
    origin = record["origin"]
    assert origin is not None and not Path(origin).is_relative_to(FOLDER), record
    assert str(FOLDER) not in record["locations"], record
    assert record["loaded"] is None or not Path(record["loaded"]).is_relative_to(FOLDER), record
    site = str(Path(origin).parents[1])  # the sys.path entry holding kernels/__init__.py
    assert str(tried) in record["path"] and record["path"].index(str(tried)) < record["path"].index(site), record


def test_python_c_in_the_root_imports_transformers_t5_with_the_pypi_kernels(tmp_path):
    proc, records = run_probed(tmp_path, [sys.executable, "-c", "from transformers import T5EncoderModel"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_pypi_kernels(records[0], REPO)
    assert records[0]["loaded"] is not None  # transformers really imported `kernels` (so the check is not empty)


def test_python_c_in_the_root_imports_the_diffusers_sdxl_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    proc, records = run_probed(tmp_path, [sys.executable, "-c", "from diffusers import StableDiffusionXLPipeline"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_pypi_kernels(records[0], REPO)


def test_python_m_pytest_from_the_root(tmp_path):
    """`python -m pytest` puts the working directory (the root) first on sys.path, then each test file's folder."""
    test_file = tmp_path / "test_probe_t5.py"
    test_file.write_text("def test_t5_imports():\n    from transformers import T5EncoderModel  # noqa: F401\n")
    proc, records = run_probed(tmp_path, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                          str(test_file)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert_pypi_kernels(records[0], REPO)


def test_python_m_llamagen_core2_cli_diffuse_sdxl(tmp_path):
    """The command of the issue: a traceback while `kernels/` had an `__init__.py`."""
    pytest.importorskip("diffusers")
    proc, records = run_probed(tmp_path, [sys.executable, "-m", "llamagen_core2.cli", "diffuse", "--pipeline", "sdxl",
                                          "--model", "tiny", "--prompt", "x", "--steps", "1", "--height", "32",
                                          "--width", "32", "--device", "cpu", "--quiet", "--out",
                                          str(tmp_path / "img")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "img" / "00000.png").is_file()
    assert_pypi_kernels(records[0], REPO)


def test_a_script_in_benchmarks(tmp_path):
    """`python benchmarks/x.py` puts benchmarks/ (not the root) first on sys.path."""
    proc, records = run_probed(tmp_path, [sys.executable, "benchmarks/bench_t2i.py", "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_pypi_kernels(records[0], REPO / "benchmarks")


def test_torchrun_m_from_the_root(tmp_path):
    """torchrun's worker is `python -m <module>` in the same directory: the root first on sys.path, as above."""
    proc, records = run_probed(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "1", "-m", "llamagen_core2.cli", "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    main = os.path.join("llamagen_core2", "cli", "__main__.py")
    workers = [r for r in records if r["argv"] and r["argv"][0].endswith(main)]
    assert len(workers) == 1 and len(records) == 2, records  # torchrun itself and its one worker
    for record in records:
        assert_pypi_kernels(record, REPO)


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_llamagen_core2_kernels_is_the_checkout_folder(tmp_path, cwd):
    code = ("import json, llamagen_core2, llamagen_core2.kernels as k, llamagen_core2.kernels.dispatch as d; "
            "print(json.dumps([llamagen_core2.__file__, list(k.__path__), d.__file__]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO if cwd == "root" else tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, path, dispatch = json.loads(proc.stdout.splitlines()[-1])
    if Path(package).parent != REPO / "llamagen_core2":
        pytest.skip(f"llamagen_core2 is installed from {package}, not from this checkout")
    assert path == [str(FOLDER)] and Path(dispatch) == FOLDER / "dispatch.py"


@pytest.mark.slow
def test_a_wheel_holds_the_kernels_as_a_subpackage(tmp_path):
    """Built from a copy of the sources (the checkout stays untouched); imported from the unpacked wheel with the
    checkout's import paths gone (-I: no working directory, no PYTHONPATH; the editable finder is dropped)."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1) and not importlib.util.find_spec("wheel"):
        pytest.skip(f"setuptools {setuptools.__version__} builds wheels only with the `wheel` package (>= 70.1 alone)")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("llamagen_core2", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llamagen_core2-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    want = {f"llamagen_core2/kernels/{p.name}" for p in FOLDER.glob("*.py")}
    assert want and want <= set(names), sorted(want - set(names))
    assert not [n for n in names if n.startswith("kernels/")]  # nothing installed as a top-level `kernels`

    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = textwrap.dedent(f"""
        import json, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        sys.path.insert(0, {str(unpacked)!r})
        import llamagen_core2, llamagen_core2.kernels as k, llamagen_core2.kernels.dispatch as d
        print(json.dumps([llamagen_core2.__file__, list(k.__path__), d.__file__, sys.path]))
    """)
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, path, dispatch, sys_path = json.loads(proc.stdout.splitlines()[-1])
    assert Path(package) == unpacked / "llamagen_core2" / "__init__.py"
    assert path == [str(unpacked / "llamagen_core2" / "kernels")]
    assert Path(dispatch) == unpacked / "llamagen_core2" / "kernels" / "dispatch.py"
    assert str(REPO) not in sys_path
