"""Optional packages (diffusers, matplotlib, scipy, triton) are skipped per test when missing, never a collection
error, and the core package imports none of them; a feature that needs one says which extra installs it.

"Missing" is made in a subprocess by a `sitecustomize.py` on PYTHONPATH that swaps the path finder for one that does
not see the hidden packages: `importlib.util.find_spec` returns None as if they were not installed (so transformers'
and diffusers' own availability checks agree), and the subprocesses a test starts inherit it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamagen_core2 import optional

from llamagen_core2.errors import MissingDependency, user_error_message
from llamagen_core2.optional import require

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ("diffusers", "matplotlib", "scipy", "triton")
# Test modules that need triton (or a kernel module) at module level, by a top-level `pytest.importorskip`: without
# triton each is one module-level skip. Read from the files, so a new kernel test module needs no edit here.
_MODULE_LEVEL_TRITON = re.compile(r'^(?:\w+\s*=\s*)?pytest\.importorskip\("(?:triton|llamagen_core2\.kernels)[."]',
                                  re.MULTILINE)
TRITON_MODULES = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
                  if _MODULE_LEVEL_TRITON.search(p.read_text())}

HIDER = textwrap.dedent("""
    import importlib.machinery, os, sys

    HIDDEN = set(os.environ["HIDE_PACKAGES"].split(","))

    class _Hidden(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.partition(".")[0] in HIDDEN else super().find_spec(name, path, target)

    sys.meta_path[:] = [_Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
""")


def env_without(tmp_path_factory, packages) -> dict:
    where = tmp_path_factory.mktemp("hide")
    (where / "sitecustomize.py").write_text(HIDER)
    return dict(os.environ, HIDE_PACKAGES=",".join(packages), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(where), os.environ.get("PYTHONPATH")])))


def python(code: str, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def collect(env, *extra) -> tuple[subprocess.CompletedProcess, set]:
    """`python -m pytest --collect-only -q` in the root -> (process, the collected test ids)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, {line for line in proc.stdout.splitlines() if "::" in line}


@pytest.fixture(scope="module")
def full_collection():
    """What the suite collects here, with nothing hidden: all items, and those marked gpu."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (all_proc, all_ids), (gpu_proc, gpu_ids) = collect(env), collect(env, "-m", "gpu")
    assert all_proc.returncode == 0 and gpu_proc.returncode == 0, all_proc.stdout[-3000:] + gpu_proc.stdout[-3000:]
    assert gpu_ids and gpu_ids < all_ids
    return {"all": all_ids, "gpu": gpu_ids}


def test_the_hider_makes_packages_look_uninstalled(tmp_path_factory):
    env = env_without(tmp_path_factory, OPTIONAL)
    proc = python("import importlib.util, torch, transformers\n"
                  f"assert all(importlib.util.find_spec(p) is None for p in {OPTIONAL!r})\n"
                  "try:\n    import diffusers\nexcept ModuleNotFoundError:\n    print('hidden')", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "hidden", proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [("diffusers",), OPTIONAL], ids=["no-diffusers", "no-optional-package"])
@pytest.mark.parametrize("selection", ["all", "gpu"])
def test_collection_has_no_error_without_optional_packages(tmp_path_factory, full_collection, hidden, selection):
    """The GPU machine without diffusers (2026-12-04) collected an error and ran zero tests."""
    proc, ids = collect(env_without(tmp_path_factory, hidden), *(["-m", "gpu"] if selection == "gpu" else []))
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and "error" not in summary, proc.stdout[-3000:]
    assert ids <= full_collection[selection]
    lost = {i.split("::")[0] for i in full_collection[selection] - ids}
    # diffusers, matplotlib and scipy are asked for per test; only the triton kernel modules skip as a whole
    assert lost <= (TRITON_MODULES if "triton" in hidden else set()), sorted(lost)


def test_diffusion_tests_without_diffusers_skip_one_by_one(tmp_path_factory):
    """The files with diffusers tests run without it: those tests skip at setup, the rest of each file passes."""
    files = ["tests/test_diffusion.py", "tests/test_diffusion_guider.py", "tests/test_noise_model_features.py",
             "tests/test_no_nan.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files], cwd=REPO,
                          env=env_without(tmp_path_factory, ("diffusers",)), capture_output=True, text=True,
                          timeout=600)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and re.match(r"\d+ passed, \d+ skipped in ", summary), proc.stdout[-3000:]
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("could not import 'diffusers'" in line for line in skips), skips
    assert {line.split()[2].split(":")[0] for line in skips} == set(files)  # per test, in every file


def test_the_core_package_imports_no_optional_package():
    proc = python(textwrap.dedent("""
        import sys
        import llamagen_core2, llamagen_core2.cli, llamagen_core2.diffusion as diffusion
        for name in llamagen_core2.__all__:
            getattr(llamagen_core2, name)
        llamagen_core2.cli.build_parser()
        for name in ("GuidanceSettings", "NoiseModelConfig", "diffuse", "prompt_summary", "load_noise_model"):
            getattr(diffusion, name)
        print(sorted({m.partition(".")[0] for m in sys.modules} & {"diffusers", "matplotlib", "scipy", "triton"}))
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_feature_without_diffusers_names_the_extra(tmp_path_factory, tmp_path):
    env = env_without(tmp_path_factory, ("diffusers",))
    proc = python("from llamagen_core2.diffusion import CoRe2Guidance", env=env)
    assert proc.returncode == 1 and "MissingDependency: CoRe2Guidance" in proc.stderr
    assert 'pip install -e ".[diffusion]"' in proc.stderr.strip().splitlines()[-1]
    cli = subprocess.run([sys.executable, "-m", "llamagen_core2.cli", "diffuse", "--pipeline", "sd3", "--model",
                          "tiny", "--prompt", "x", "--out", str(tmp_path / "img")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr[-3000:]
    assert re.fullmatch(r'llamagen-core2 diffuse: error: the tiny SD3 pipeline needs the optional package '
                        r'diffusers, which is not installed: pip install -e "\.\[diffusion\]" in the repository\n',
                        cli.stderr)
    assert not (tmp_path / "img").exists()


def test_require_renames_only_the_missing_package_itself(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # as an uninstalled package: import raises ModuleNotFoundError
    with pytest.raises(MissingDependency, match=r'sampler needs the optional package triton.*"\.\[triton\]"') as e:
        require("triton", "the Triton sampler")
    assert isinstance(e.value, ModuleNotFoundError) and e.value.name == "triton"
    assert user_error_message(e.value) == str(e.value)  # the CLI prints it as one line
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.setitem(sys.modules, "triton_dependency_xyz", None)
    monkeypatch.setattr(optional, "importlib", SimpleNamespace(import_module=lambda name: __import__(
        "triton_dependency_xyz")))
    with pytest.raises(ModuleNotFoundError) as e:  # triton present but broken: the real error, not "install triton"
        require("triton", "the Triton sampler")
    assert not isinstance(e.value, MissingDependency) and e.value.name == "triton_dependency_xyz"
