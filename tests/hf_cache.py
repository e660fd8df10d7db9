"""Lay out files in huggingface_hub's cache format, so Hub-id loading is tested offline.

The layout (huggingface_hub's docs, "Manage the cache"; file_download.py / _snapshot_download.py):
    <cache>/models--<org>--<repo>/refs/main              the commit hash the branch points to (no newline)
    <cache>/models--<org>--<repo>/blobs/<etag>           file contents, named by their etag (sha256 for LFS files)
    <cache>/models--<org>--<repo>/snapshots/<commit>/<path in repo> -> relative symlink to ../../blobs/<etag>
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hf_cache(cache_dir, repo_id: str, files: dict, commit: str = "0123456789abcdef0123456789abcdef01234567"
                    ) -> Path:
    """files: {path in repo: local file to copy}; returns the snapshot directory."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for rel, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def add_directory_to_hf_cache(cache_dir, repo_id: str, directory, **kwargs) -> Path:
    """Every file under `directory`, at the same relative path in the repo."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*")) if p.is_file()}
    return add_to_hf_cache(cache_dir, repo_id, files, **kwargs)
