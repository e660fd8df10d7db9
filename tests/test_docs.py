"""The design notes the code cites live in the repository and every cite resolves; no comment speaks of sessions."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("llamagen_core2", "kernels", "benchmarks", "tests") for p in (REPO / d).rglob("*.py")] + \
    [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").glob("*.md")]
# Being rewritten elsewhere at the time of writing; their cites move to docs/design.md with that rewrite.
CITE = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)|\]\(([\w.-]+\.md)#([\w-]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set:
    return {slug(line.lstrip("#")) for line in doc.read_text().splitlines() if line.startswith("#")}


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_every_cited_section_exists():
    cites = []
    for path in SOURCES:
        for m in CITE.finditer(path.read_text()):
            doc, anchor = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            cites.append((_rel(path), doc, anchor))
    assert len(cites) >= 20  # the code cites the notes in many places; they must all resolve
    missing = [c for c in cites if not (REPO / "docs" / c[1]).is_file() or c[2] not in anchors(REPO / "docs" / c[1])]
    assert missing == []


def test_no_cite_points_outside_the_repository():
    stale = [_rel(p) for p in SOURCES if _rel(p) != "tests/test_docs.py"
             and re.search(r"DESIGN §|shared/DESIGN\.md", p.read_text())]
    assert stale == []


def test_no_code_comment_speaks_of_sessions():
    hits = [f"{_rel(p)}:{i}" for p in SOURCES
            if p.suffix == ".py" and _rel(p) != "tests/test_docs.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bsessions?\b", line, re.I)]
    assert hits == []


def _outputs_the_readme_writes() -> set:
    """Paths (relative to where the README's commands run) that its command and Python blocks write, plus the
    default --out of every subcommand that has one (what a bare `llamagen-core2 demo` writes)."""
    import argparse

    from llamagen_core2.cli import build_parser

    text = (REPO / "README.md").read_text()
    outputs = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        outputs |= set(re.findall(r"--out\s+(\S+)", block))
        outputs |= {out for _, out in re.findall(r"llamagen-core2 convert\s+(\S+)\s+(\S+)", block)}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        outputs |= set(re.findall(r"\.save\(\"([^\"]+)\"\)", block))
    parser = build_parser()
    for sub in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.values():
        outputs |= {a.default for a in sub._actions if "--out" in a.option_strings and isinstance(a.default, str)}
    return outputs


def test_what_the_readme_commands_write_is_ignored_by_git():
    """Issue 19: demo.png, class0.png and world/ landed in the repository root and showed up in `git status`."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        import pytest

        pytest.skip("not a git checkout")
    outputs = _outputs_the_readme_writes()
    assert {"demo.png", "class0.png", "world/", "samples"} <= outputs  # the parse finds what it must
    # A directory output is checked through a file inside it, as the command writes them.
    paths = sorted(p if "." in Path(p).name else f"{p.rstrip('/')}/grid.png" for p in outputs)
    run = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    ignored = set(run.stdout.split())
    assert [p for p in paths if p not in ignored] == []


# Files of other projects the docs and comments name (LlamaGen, CoRe^2, diffusers, huggingface_hub, FlashInfer,
# triton) or that tests write: not ours, so not looked up in this tree.
OTHER_PROJECTS_FILES = {
    "sample_c2i.py", "sample_t2i.py", "autoregressive/sample/sample_t2i.py", "autoregressive/models/gpt.py",
    "autoregressive/models/generate.py", "tokenizer/tokenizer_image/vq_model.py", "refine_model.py", "lora.py",
    "sample_img.py", "sdxl_pipeline.py", "sd35_pipeline.py", "diffusion_pipeline/sdxl_pipeline.py",
    "diffusion_pipeline/sd35_pipeline.py", "file_download.py", "_snapshot_download.py", "topk_topp_triton.py",
    "triton/language/random.py", "sitecustomize.py", "test_probe_t5.py", "benchmarks/x.py", "kernels/__init__.py",
}
FILE_PATH = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)\b")


def _repository_files() -> list:
    files = [p.relative_to(REPO).as_posix() for d in ("llamagen_core2", "kernels", "benchmarks", "tests", "checkpoints")
             for p in (REPO / d).rglob("*.py")]
    return files + [f"llamagen_core2/{f}" for f in files if f.startswith("kernels/")]  # how the package sees them


def test_every_file_path_the_docs_name_exists():
    """Issue 23: after the moves into sub-packages, every `.py` path the README, the docs and the code's comments
    name is a file of the tree (named whole, or by its last parts: `decode/engine.py`, `engine.py`)."""
    files = _repository_files()
    docs = SOURCES + [REPO / "checkpoints" / "README.md"]
    stale = [f"{_rel(doc)}:{i} {name}" for doc in docs if doc.is_file()
             for i, line in enumerate(doc.read_text().splitlines(), 1) for name in FILE_PATH.findall(line)
             if name not in OTHER_PROJECTS_FILES and not any(f == name or f.endswith("/" + name) for f in files)]
    assert stale == []


def test_the_docs_name_no_old_module_path():
    """Module paths from before the sub-packages still import (llamagen_core2._MOVED), but the docs use the new
    ones; an old path that is also an exported name (`llamagen_core2.generate`, the function) is allowed."""
    import llamagen_core2

    old = "|".join(re.escape(name) for name in sorted(llamagen_core2._MOVED, key=len, reverse=True)
                   if name not in llamagen_core2._EXPORTS)
    pattern = re.compile(rf"llamagen_core2[./]({old})(?:\.py)?\b(?![./]\w)")
    docs = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").glob("*.md")]
    stale = [f"{_rel(doc)}:{i} {m.group(0)}" for doc in docs
             for i, line in enumerate(doc.read_text().splitlines(), 1) for m in pattern.finditer(line)]
    assert stale == []
