"""The one --device rule (llamagen_core2/device.py), tested on CPU by faking torch.cuda's answers."""
import re
from pathlib import Path

import pytest
import torch

from llamagen_core2.cli import main
from llamagen_core2.device import resolve_device
from llamagen_core2.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend `count` GPUs exist; record what torch.cuda.set_device is given."""
    calls = []

    def install(count=4):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
        return calls

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return install


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(InvalidArgument, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(InvalidArgument, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("bad", ["bogus", "gpu", "cuda:", "cuda:x", "cpu:0", "cuda:-1", "CUDA", "cuda 0", ""])
def test_bad_strings_are_refused_naming_the_allowed_forms(bad):
    with pytest.raises(InvalidArgument, match=re.escape(f"got {bad.strip()!r}")) as info:
        resolve_device(bad)
    assert "'cuda:N'" in str(info.value)


def test_bare_cuda_gets_an_index_and_becomes_the_current_device(fake_cuda):
    calls = fake_cuda(count=4)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    # set_device is given an index: torch refuses a bare torch.device("cuda") without one
    assert calls == [0, 0] and all(isinstance(c, int) for c in calls)


def test_cuda_follows_torchrun_local_rank(fake_cuda, monkeypatch):
    calls = fake_cuda(count=4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # an explicit index is kept as typed
    assert calls == [2, 3]


def test_one_visible_gpu_per_process_and_missing_gpus(fake_cuda, monkeypatch):
    fake_cuda(count=1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # the launcher set CUDA_VISIBLE_DEVICES: each rank sees its own GPU
    assert resolve_device("cuda") == torch.device("cuda", 0)
    fake_cuda(count=2)
    with pytest.raises(InvalidArgument, match=r"LOCAL_RANK 3 has no GPU \(2 visible"):
        resolve_device("cuda")
    with pytest.raises(InvalidArgument, match=r"there is no GPU 5 \(2 visible, indices 0..1\)"):
        resolve_device("cuda:5")
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(InvalidArgument, match="LOCAL_RANK must be a non-negative integer"):
        resolve_device("cuda")


def test_every_cli_resolves_devices_through_the_one_rule(fake_cuda, monkeypatch):
    """generate/collect/reflect/sample (cli/loading.py) and the diffusion CLI give each torchrun rank its GPU."""
    from llamagen_core2.cli import diffusion as diffusion_cli
    from llamagen_core2.cli import loading

    fake_cuda(count=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = type("Args", (), {"device": "cuda"})()
    assert loading.resolve_device(args) == "cuda:1" and args.device == "cuda:1"
    args = type("Args", (), {"device": "cuda", "dtype": "float32"})()
    device, dtype = diffusion_cli._device_dtype(args)
    assert device == torch.device("cuda", 1) and dtype == torch.float32


def test_no_module_picks_a_device_by_itself():
    """torch.cuda.set_device is called in one place only, so no command can skip the rule."""
    hits = [str(p.relative_to(REPO)) for p in (REPO / "llamagen_core2").rglob("*.py")
            if "set_device(" in p.read_text() and p.name != "device.py"]
    assert hits == []


@pytest.mark.parametrize("command", [
    ["generate", "--gpt", "g", "--vq", "v", "--classes", "1"],
    ["collect", "--gpt", "g", "--classes", "1", "--out", "o"],
    ["sample", "--gpt", "g", "--vq", "v", "--classes", "1", "--out", "o"],
    ["reflect", "--gpt", "g", "--shards", "s", "--out", "o"],
    ["diffuse", "--pipeline", "sd3", "--model", "tiny", "--prompt", "x"],
])
def test_cli_device_bogus_is_one_line_exit_2(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--device", "bogus"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--device" in err and "'bogus'" in err and "cuda:N" in err
