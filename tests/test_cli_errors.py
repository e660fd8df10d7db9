"""Every user error is one line naming the problem, exit status 2, before any work; a refused command leaves
nothing that blocks its corrected rerun; a rerun with other settings is refused naming the difference."""
import json
import os
from pathlib import Path

import pytest
import torch

from llamagen_core2 import cli
from llamagen_core2.cli import args as cli_args
from llamagen_core2.cli import core2 as core2_cli
from llamagen_core2.cli import generate as generate_command
from llamagen_core2.cli import main
from tiny_models import save_tiny_world

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    gpt, vq, gpt_dir, vq_dir = save_tiny_world(root)
    shards = root / "shards"
    assert main(["collect", "--gpt", str(gpt_dir), "--classes", "0-9", "--per-class", "2", "--batch-size", "10",
                 "--cfg-scale", "3", "--out", str(shards), "--quiet", "--device", "cpu"]) == 0
    return dict(root=root, gpt=str(gpt_dir), vq=str(vq_dir), shards=shards)


def one_line_error(argv, capsys, *, contains=()):
    """Run the CLI, expect exit status 2 and exactly one stderr line (no traceback) holding `contains`."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in contains:
        assert text in err, err
    return err


def generate_argv(world, tmp_path, *extra):
    return ["generate", "--gpt", world["gpt"], "--vq", world["vq"], "--classes", "1,2", "--top-k", "0",
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "g"), *extra]


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize("extra,contains", [
    (["--batch-size", "0"], ["--batch-size", "integer >= 1", "'0'"]),
    (["--per-class", "2.5"], ["--per-class", "'2.5'"]),
    (["--cfg-scale", "nan"], ["--cfg-scale", "finite", "'nan'"]),
    (["--top-p", "0"], ["--top-p", "'0'"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--nrow", "0"], ["--nrow"]),
    (["--seed", "-1"], ["--seed"]),
    (["--gpt-preset", "GPT-ZZ"], ["unknown GPT preset 'GPT-ZZ'"]),
    (["--gpt-preset", "GPT-XL"], ["preset 'GPT-XL' does not match", "dim: 64 vs preset 1280"]),
    (["--device", "bogus"], ["--device", "'bogus'"]),
    (["--mode", "fast"], ["need --weak"]),
    (["--slow-first", "1.5"], ["--slow-first"]),
    (["--classes", "3-12"], ["class ids must be in [0, 9]"]),
])
def test_generate_bad_arguments_are_one_line(world, tmp_path, capsys, extra, contains):
    argv = generate_argv(world, tmp_path)
    if extra[0] == "--classes":
        argv[argv.index("--classes") + 1] = extra[1]
        extra = []
    one_line_error([*argv, *extra], capsys, contains=contains)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("command", [
    ["reflect", "--mse-weight", "nan"], ["reflect", "--cfg-scale", "nan"], ["reflect", "--holdout", "0.9x"],
    ["reflect", "--holdout", "1.5"], ["reflect", "--lr", "inf"], ["reflect", "--steps", "3.5"],
    ["reflect", "--weak-dim", "0"], ["collect", "--num-tokens", "3.5"], ["collect", "--batch-size", "0"],
    ["sample", "--w2s-scale", "nan"], ["sample", "--top-k", "-1"], ["diffuse", "--steps", "0"],
    ["diffuse-reflect", "--lr", "nan"], ["demo", "--scale", "99"], ["convert", "--max-shard-mb", "nan"],
])
def test_numeric_options_refuse_nan_and_non_integers_while_parsing(command, capsys):
    name, option, value = command
    base = {"reflect": ["--gpt", "g", "--shards", "s", "--out", "o"], "collect": ["--gpt", "g", "--classes", "1",
            "--out", "o"], "sample": ["--gpt", "g", "--vq", "v", "--classes", "1", "--out", "o"],
            "diffuse": ["--pipeline", "sd3", "--model", "tiny", "--prompt", "x"],
            "diffuse-reflect": ["--shards", "s", "--out", "o"], "demo": [], "convert": ["a", "b"]}[name]
    one_line_error([name, *base, option, value], capsys, contains=[option, repr(value)])


# ---------------------------------------------------------------------- files
def test_out_that_is_a_file_or_not_writable(world, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    for argv in (generate_argv(world, tmp_path)[:-1] + [str(tmp_path / "file")],
                 ["collect", "--gpt", world["gpt"], "--classes", "1", "--out", str(tmp_path / "file")],
                 ["reflect", "--gpt", world["gpt"], "--shards", str(world["shards"]), "--out",
                  str(tmp_path / "file" / "sub")],
                 ["convert", world["gpt"], str(tmp_path / "file")]):
        one_line_error(argv, capsys, contains=[str(tmp_path / "file")])
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a user without write permission sees it
    one_line_error(generate_argv(world, tmp_path), capsys, contains=["is not writable"])


def test_config_json_not_json_or_mistyped(world, tmp_path, capsys):
    import shutil

    bad = tmp_path / "gpt"
    shutil.copytree(world["gpt"], bad)
    argv = generate_argv(world, tmp_path)
    argv[argv.index("--gpt") + 1] = str(bad)
    (bad / "config.json").write_text('{"kind": "gpt", "config": {"dim": "sixty-four"')
    one_line_error(argv, capsys, contains=[str(bad / "config.json"), "not a valid config.json"])
    saved = json.loads(Path(world["gpt"], "config.json").read_text())
    saved["config"]["dim"] = "64"
    (bad / "config.json").write_text(json.dumps(saved))
    one_line_error(argv, capsys, contains=[str(bad / "config.json"), "'dim' must be an integer, got '64'"])


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", b'{"a": 1}', bytes(range(256)) * 4, b""])
def test_convert_on_a_file_that_is_not_a_checkpoint(tmp_path, capsys, content):
    src = tmp_path / "model.pt"
    src.write_bytes(content)
    one_line_error(["convert", str(src), str(tmp_path / "out")], capsys, contains=[str(src), "checkpoint"])
    assert not (tmp_path / "out").exists()


def test_convert_on_truncated_safetensors_names_the_file(world, tmp_path, capsys):
    data = (world["root"] / "gpt" / "model.safetensors").read_bytes()
    src = tmp_path / "model.safetensors"
    src.write_bytes(data[: len(data) // 2])
    one_line_error(["convert", str(src), str(tmp_path / "out")], capsys, contains=[str(src)])


def test_missing_inputs_are_one_line(world, tmp_path, capsys):
    one_line_error(["reflect", "--gpt", world["gpt"], "--shards", str(tmp_path / "none"), "--out",
                    str(tmp_path / "w")], capsys, contains=["not a shard directory"])
    argv = generate_argv(world, tmp_path)
    argv[argv.index("--vq") + 1] = str(tmp_path / "missing_vq")
    one_line_error(argv, capsys, contains=["missing_vq"])


def test_truncated_shard_and_edited_manifest(world, tmp_path, capsys):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(world["shards"], shards)
    reflect = ["reflect", "--gpt", world["gpt"], "--shards", str(shards), "--out", str(tmp_path / "w"), "--steps",
               "2", "--quiet", "--device", "cpu"]
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["meta"]["cfg_scale"] = "3"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(reflect, capsys, contains=["manifest.json", "cfg_scale must be a finite number > 1, got '3'"])
    del manifest["meta"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(reflect, capsys, contains=["manifest.json", "meta must be a JSON object"])
    shutil.copy(world["shards"] / "manifest.json", shards / "manifest.json")
    shard = sorted(shards.glob("rank*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    one_line_error(reflect, capsys, contains=[str(shard), "truncated"])
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------- a refusal never blocks the rerun
def test_refused_collect_leaves_nothing_that_blocks_the_corrected_rerun(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "shards"
    base = ["collect", "--gpt", world["gpt"], "--classes", "1,2", "--out", str(out), "--quiet", "--device", "cpu"]
    one_line_error([*base, "--num-tokens", "99"], capsys, contains=["num_tokens must be an integer in [1, 16]"])
    assert not out.exists()
    # A failure inside the first batch (here: memory refused) leaves at most a manifest without shards ...
    from llamagen_core2.decode.engine import Engine
    from llamagen_core2.errors import InvalidArgument

    def no_memory(*args, **kwargs):
        raise InvalidArgument("batch 2 does not fit in free memory")

    monkeypatch.setattr(Engine, "check_memory", no_memory)  # collect decodes with an Engine
    one_line_error([*base, "--batch-size", "2"], capsys, contains=["does not fit"])
    monkeypatch.undo()
    # ... which the corrected command (other batch size and scale) replaces instead of refusing.
    assert main([*base, "--batch-size", "1", "--cfg-scale", "2.5"]) == 0
    assert json.loads((out / "manifest.json").read_text())["meta"]["batch_size"] == 1
    err = one_line_error([*base, "--batch-size", "1", "--cfg-scale", "3.5"], capsys)
    assert "cfg_scale: 2.5 -> 3.5" in err


def test_refused_sample_leaves_nothing_that_blocks_the_corrected_rerun(world, tmp_path, capsys, monkeypatch):
    from llamagen_core2 import pipeline as sample_module  # sample drives generate() through the pipeline

    out = tmp_path / "samples"
    base = ["sample", "--gpt", world["gpt"], "--vq", world["vq"], "--classes", "1,2", "--out", str(out), "--quiet",
            "--device", "cpu", "--top-k", "0"]
    real_generate = sample_module.generate
    monkeypatch.setattr(sample_module, "generate", lambda *a, **k: (_ for _ in ()).throw(
        FloatingPointError("non-finite hidden states (NaN/inf) during generation")))
    one_line_error([*base, "--cfg-scale", "4"], capsys, contains=["non-finite"])
    monkeypatch.setattr(sample_module, "generate", real_generate)
    assert main([*base, "--cfg-scale", "2"]) == 0  # other settings: fine, nothing was sampled before
    assert len(list((out / "images").glob("*.png"))) == 2
    one_line_error([*base, "--cfg-scale", "3"], capsys, contains=["cfg_scale: 2.0 -> 3.0"])


def test_generate_rerun_with_other_settings_is_refused_and_the_same_settings_resume(world, tmp_path, capsys):
    """Issue 19: `generate --out DIR` twice with other classes mixed both runs' images in one directory."""
    out = tmp_path / "g"
    argv = generate_argv(world, tmp_path, "--batch-size", "1")
    assert main(argv) == 0
    first = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    assert sorted(first) == ["00000_class1.png", "00001_class2.png"]
    assert json.loads((out / "settings.json").read_text())["conditions"] == [1, 2]
    other = list(argv)
    other[other.index("--classes") + 1] = "5"
    one_line_error(other, capsys, contains=["llamagen-core2 generate: error:", str(out), "conditions: [1, 2] -> [5]",
                                            "new --out"])
    one_line_error([*argv, "--cfg-scale", "2"], capsys, contains=["cfg_scale: 4.0 -> 2.0"])
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == first  # nothing mixed in
    # The same settings resume: finished images are kept, a missing one is made again, the same bytes.
    (out / "images" / "00001_class2.png").unlink()
    capsys.readouterr()
    assert main([*argv[:-1], "2"]) == 0  # --batch-size 2: the batch size is not a setting (the seed rule)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_images"] == 2 and summary["images_generated"] == 2
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == first
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images_generated"] == 0


def test_generate_refuses_an_out_holding_images_without_a_settings_record(world, tmp_path, capsys):
    out = tmp_path / "g"
    (out / "images").mkdir(parents=True)
    (out / "images" / "00000_class7.png").write_bytes(b"made by an older version")
    one_line_error(generate_argv(world, tmp_path), capsys, contains=[str(out), "settings.json", "new --out"])


def test_reflect_rerun_with_other_settings_is_refused_naming_the_difference(world, tmp_path, capsys):
    out = tmp_path / "weak"
    base = ["reflect", "--gpt", world["gpt"], "--shards", str(world["shards"]), "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--holdout", "0.2", "--weak-preset", "W-1", "--weak-heads", "4", "--quiet",
            "--device", "cpu", "--checkpoint-every", "1"]
    assert main([*base, "--weak-dim", "32"]) == 0
    one_line_error([*base, "--weak-dim", "64"], capsys, contains=["weak.dim: 32 -> 64", "--no-resume"])
    one_line_error([*base, "--weak-dim", "32", "--lr", "0.01"], capsys, contains=["lr: 0.001 -> 0.01"])
    assert main([*base, "--weak-dim", "32"]) == 0  # the same settings resume
    assert main([*base, "--weak-dim", "64", "--no-resume"]) == 0  # starting over is allowed
    assert json.loads((out / "config.json").read_text())["config"]["dim"] == 64


# ---------------------------------------------------------------------- bugs keep their traceback
def test_a_bug_is_not_turned_into_a_one_line_error(world, tmp_path, monkeypatch):
    def broken(args):
        raise RuntimeError("a bug in the engine")

    monkeypatch.setattr(generate_command, "load_gpt", broken)
    with pytest.raises(RuntimeError, match="a bug in the engine"):
        main(generate_argv(world, tmp_path))
    monkeypatch.setattr(core2_cli, "load_gpt", broken)
    with pytest.raises(RuntimeError, match="a bug in the engine"):
        core2_cli.main(["collect", "--gpt", world["gpt"], "--classes", "1", "--out", str(tmp_path / "c")])


def test_standalone_core2_cli_maps_the_same_families(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        core2_cli.main(["collect", "--gpt", str(tmp_path / "missing"), "--classes", "1", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "missing" in err


def test_out_of_memory_is_one_line_with_advice(world, tmp_path, capsys, monkeypatch):
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name, without needing a GPU
        pass

    def oom(args):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr(generate_command, "load_gpt", oom)
    one_line_error(generate_argv(world, tmp_path), capsys, contains=["out of device memory", "--batch-size"])


def test_threads_option_sets_torch_threads(world, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(generate_argv(world, tmp_path, "--threads", "1")) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cli_args.DEFAULT_THREADS == 1


def test_reflect_starting_over_keeps_its_own_checkpoints(world, tmp_path):
    """--no-resume after a longer run: the new run's checkpoints must not be pruned in favour of the old run's."""
    out = tmp_path / "weak"
    base = ["reflect", "--gpt", world["gpt"], "--shards", str(world["shards"]), "--out", str(out), "--batch-size", "4",
            "--holdout", "0.2", "--weak-preset", "W-1", "--weak-heads", "4", "--weak-dim", "32", "--quiet",
            "--device", "cpu", "--checkpoint-every", "1"]
    assert main([*base, "--steps", "4"]) == 0
    assert main([*base, "--steps", "2", "--no-resume"]) == 0
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2 and (out / "checkpoints" / latest["name"]).is_dir()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]


def test_diffusion_commands_refuse_bad_settings_before_loading_or_writing(tmp_path, capsys):
    out = tmp_path / "img"
    one_line_error(["diffuse", "--pipeline", "sd3", "--model", "tiny", "--prompt", "x", "--mode", "fast", "--out",
                    str(out)], capsys, contains=["noise"])
    assert not out.exists()  # nothing left behind by the refused command
    one_line_error(["diffuse-collect", "--pipeline", "sd3", "--model", "tiny", "--prompt", "x", "--seeds",
                    "99999999999999999999999", "--out", str(tmp_path / "c")], capsys, contains=["--seeds"])
    one_line_error(["diffuse-collect", "--pipeline", "sd3", "--model", "tiny", "--prompt", "x", "--cfg-scale", "1",
                    "--out", str(tmp_path / "c")], capsys, contains=["--cfg-scale"])


def test_generate_progress_bar_reaches_its_total_over_every_batch(world, tmp_path, capsys):
    argv = [a for a in generate_argv(world, tmp_path, "--batch-size", "1") if a != "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    lines = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    bars = [line for line in lines if line.startswith("tokens:")]
    assert bars[-1].startswith("tokens: 100%") and "32/32" in bars[-1], lines  # 2 images x 16 tokens, one bar
    assert lines[-1].startswith("wrote "), lines


def test_every_subcommand_ends_with_its_result_as_one_json_line(world, tmp_path, capsys):
    """One format for every subcommand's result (docs/cli.md#outputs-and-reruns): the last stdout line is the
    whole result as one JSON object, so `| tail -n 1` gives it to any JSON tool."""
    quiet = ["--quiet", "--device", "cpu"]
    commands = {
        "generate": generate_argv(world, tmp_path),
        "collect": ["collect", "--gpt", world["gpt"], "--classes", "1,2", "--out", str(tmp_path / "c"), *quiet],
        "reflect": ["reflect", "--gpt", world["gpt"], "--shards", str(world["shards"]), "--out", str(tmp_path / "w"),
                    "--steps", "2", "--batch-size", "4", "--holdout", "0.2", "--weak-preset", "W-1",
                    "--weak-heads", "4", "--weak-dim", "32", *quiet],
        "sample": ["sample", "--gpt", world["gpt"], "--vq", world["vq"], "--classes", "1", "--top-k", "0",
                   "--out", str(tmp_path / "s"), *quiet],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 0, name
        lines = capsys.readouterr().out.strip().splitlines()
        result = json.loads(lines[-1])
        assert isinstance(result, dict) and len(result) > 2, (name, lines)
        assert not any(line.strip() in ("{", "}") for line in lines), (name, lines)  # no indented JSON


# ---------------------------------------------------------------------- habits: LlamaGen's --compile, named errors
def _subcommands():
    import argparse

    parser = cli.build_parser()
    return sorted(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


def test_every_usage_error_names_its_subcommand(world, tmp_path, capsys):
    names = _subcommands()
    assert {"generate", "sample", "collect", "reflect", "demo", "convert"} <= set(names)
    for name in names:  # unknown option, required arguments missing or not: argparse's error names the subcommand
        one_line_error([name, "--no-such-option"], capsys, contains=[f"llamagen-core2 {name}: error:"])
    one_line_error([*generate_argv(world, tmp_path), "--bogus", "x"], capsys,
                   contains=["llamagen-core2 generate: error: unrecognized arguments: --bogus x"])
    one_line_error(["demo", "--bogus"], capsys, contains=["llamagen-core2 demo: error: unrecognized arguments"])


def test_compile_is_accepted_with_one_line_saying_what_the_engine_does(world, tmp_path, capsys):
    """LlamaGen users type --compile; the engine captures CUDA graphs by itself, and on a CPU it has no effect."""
    for argv in (generate_argv(world, tmp_path),
                 ["sample", "--gpt", world["gpt"], "--vq", world["vq"], "--classes", "1", "--top-k", "0", "--out",
                  str(tmp_path / "s"), "--quiet", "--device", "cpu"],
                 ["collect", "--gpt", world["gpt"], "--classes", "1", "--out", str(tmp_path / "c"), "--quiet",
                  "--device", "cpu"]):
        capsys.readouterr()
        assert main([*argv, "--compile"]) == 0, argv[0]
        notes = [line for line in capsys.readouterr().err.splitlines() if "--compile" in line]
        assert len(notes) == 1 and "no effect" in notes[0] and "CUDA graphs" in notes[0], notes
        assert notes[0].startswith(f"llamagen-core2 {argv[0]}: ")


def test_console_script_names_the_subcommand_and_takes_compile(world, tmp_path):
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).parent / "llamagen-core2"
    script = str(script) if script.is_file() else shutil.which("llamagen-core2")
    if script is None:
        pytest.skip("the llamagen-core2 console script is not installed (pip install -e .)")
    run = subprocess.run([script, "generate", "--gpt", "g", "--vq", "v", "--classes", "1", "--compile", "--bogus"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("llamagen-core2 generate: error:"), run.stderr
    assert "--bogus" in run.stderr and "--compile" not in run.stderr.split("error:", 1)[1], run.stderr
