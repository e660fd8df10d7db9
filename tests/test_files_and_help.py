"""Files carry the user's umask; every computing subcommand has --threads; --help shows every default; class
names are listed where class ids are asked for; output paths are checked before any work."""
import argparse
import os
import stat

import numpy as np
import pytest
import torch

from llamagen_core2.cli import build_parser, main
from llamagen_core2.errors import InvalidArgument
from llamagen_core2.io.checkpoint import save_pretrained
from llamagen_core2.io.files import atomic_write_json, check_output_dir, check_output_file
from llamagen_core2.io.images import save_png
from llamagen_core2.io.shards import ShardWriter
from llamagen_core2.world.dataset import CLASS_NAMES
from tiny_models import save_tiny_world

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
    previous = os.umask(0o022)
    yield set_mask
    os.umask(previous)


def _modes(directory):
    return {p.relative_to(directory).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_every_writer_uses_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    save_pretrained(tmp_path / "model", {"w": torch.zeros(2)}, {"kind": "x"})
    with ShardWriter(tmp_path / "shards", {"m": 1}, rank=0, world_size=1) as w:
        w.add("s", {"x": torch.zeros(1)})
    from llamagen_core2.core2.sample import _atomic_savez

    _atomic_savez(tmp_path / "samples.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    modes = _modes(tmp_path)
    assert set(modes) == {"a.png", "a.json", "model/model.safetensors", "model/config.json", "shards/manifest.json",
                          "shards/rank00000-000000.safetensors", "samples.npz"}
    assert set(modes.values()) == {expected}, modes


def test_cli_outputs_use_the_umask(tmp_path, umask):
    umask(0o022)
    _, _, gpt_dir, vq_dir = save_tiny_world(tmp_path)
    assert main(["sample", "--gpt", str(gpt_dir), "--vq", str(vq_dir), "--classes", "1", "--out",
                 str(tmp_path / "s"), "--quiet", "--device", "cpu", "--top-k", "0"]) == 0
    assert main(["generate", "--gpt", str(gpt_dir), "--vq", str(vq_dir), "--classes", "1", "--out",
                 str(tmp_path / "g"), "--quiet", "--device", "cpu", "--top-k", "0"]) == 0
    modes = {**_modes(tmp_path / "s"), **_modes(tmp_path / "g")}
    assert {"samples.npz", "settings.json", "images/000000.png", "grid.png"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def _subparsers():
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


COMPUTING = ("generate", "convert", "collect", "reflect", "sample", "demo", "diffuse", "diffuse-collect",
             "diffuse-reflect")


def test_every_computing_subcommand_has_threads_defaulting_to_one():
    subs = _subparsers()
    assert set(COMPUTING) <= set(subs)
    for name in COMPUTING:
        action = subs[name]._option_string_actions.get("--threads")
        assert action is not None and action.default == 1, name
        assert "docs/cli.md#threads" in action.help, name


def test_help_states_every_default():
    for name, sub in _subparsers().items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.required:
                continue
            shown = formatter._get_help_string(action) if action.help else ""
            assert "default" in shown.lower(), (name, action.option_strings)
        assert "(default: " in sub.format_help(), name


def test_class_names_are_listed_where_class_ids_are_asked_for():
    subs = _subparsers()
    for name in ("generate", "collect", "sample", "demo"):
        help_text = " ".join(subs[name].format_help().split())
        assert all(f"{i} {n}" in help_text for i, n in enumerate(CLASS_NAMES)), name


def test_output_path_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    with pytest.raises(InvalidArgument, match="is an existing file, not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(InvalidArgument, match="cannot be created: .*file is a file"):
        check_output_dir(tmp_path / "file" / "sub")
    with pytest.raises(InvalidArgument, match="is a directory; give a file name"):
        check_output_file(tmp_path)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(InvalidArgument, match="is not writable"):
        check_output_dir(tmp_path / "new")
