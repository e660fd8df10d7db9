"""Shards: atomic writes, resume after a kill without loss or duplication, disjoint rank split."""
import json
import os

import pytest
import torch

from llamagen_core2.errors import InvalidArgument
from llamagen_core2.io.shards import ShardReader, ShardWriter, _shard_ids

IDS = [f"s{k:03d}" for k in range(23)]


def sample(sid: str) -> dict:
    g = torch.Generator().manual_seed(int(sid[1:]))
    return {"x": torch.randn(3, 2, generator=g), "step": torch.tensor([int(sid[1:])])}


class Killed(RuntimeError):
    pass


def run(directory, *, kill_after=None, rank=0, world_size=1, flush_on_exit=True):
    """Process this rank's work; raise Killed after `kill_after` adds (simulating a crash)."""
    w = ShardWriter(directory, {"model": "tiny", "cfg": 4.0}, rank=rank, world_size=world_size, samples_per_shard=4)
    added = 0
    try:
        for sid in w.my_work(IDS):
            if kill_after is not None and added == kill_after:
                raise Killed()
            w.add(sid, sample(sid))
            added += 1
    except Killed:
        if flush_on_exit:
            w.flush()
        raise
    w.flush()
    return added


def assert_complete(directory, expected_ids):
    reader = ShardReader(directory)
    ids = reader.sample_ids()
    assert sorted(ids) == sorted(expected_ids) and len(ids) == len(set(ids))
    for sid, tensors in reader:
        ref = sample(sid)
        assert torch.equal(tensors["x"], ref["x"]) and torch.equal(tensors["step"], ref["step"]), sid


def test_roundtrip_and_load_all(tmp_path):
    assert run(tmp_path) == len(IDS)
    assert_complete(tmp_path, IDS)
    ids, stacked = ShardReader(tmp_path).load_all()
    assert ids == sorted(IDS) and stacked["x"].shape == (len(IDS), 3, 2)
    assert torch.equal(stacked["x"][5], sample(ids[5])["x"])
    assert json.loads((tmp_path / "manifest.json").read_text())["meta"] == {"model": "tiny", "cfg": 4.0}


@pytest.mark.parametrize("flush_on_exit", [True, False], ids=["exception", "hard-kill"])
def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path, flush_on_exit):
    with pytest.raises(Killed):
        run(tmp_path, kill_after=10, flush_on_exit=flush_on_exit)
    partial = ShardReader(tmp_path).sample_ids()
    # hard kill: only full shards (2 x 4 samples) survive; exception: all 10 were flushed
    assert len(partial) == (10 if flush_on_exit else 8)
    resumed = run(tmp_path)
    assert resumed == len(IDS) - len(partial)
    assert_complete(tmp_path, IDS)


def test_leftover_temp_file_is_ignored(tmp_path):
    run(tmp_path)
    (tmp_path / ".rank00000-000099.safetensors.abc.tmp").write_bytes(b"half-written garbage")
    assert_complete(tmp_path, IDS)


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    w = ShardWriter(tmp_path, {"m": 1}, rank=0, world_size=1, samples_per_shard=100)
    w.add("a", {"x": torch.zeros(2)})

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        w.flush()
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]
    assert ShardReader(tmp_path).sample_ids() == []


def test_rank_split_is_disjoint_and_complete(tmp_path):
    for rank in range(3):
        run(tmp_path, rank=rank, world_size=3)
    per_rank = {}
    for p in tmp_path.glob("rank*.safetensors"):
        per_rank.setdefault(p.name[:9], set()).update(_shard_ids(p))
    assert sorted(per_rank) == ["rank00000", "rank00001", "rank00002"]
    sets = list(per_rank.values())
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert_complete(tmp_path, IDS)


def test_rank_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    w = ShardWriter(tmp_path, {"m": 1})
    assert (w.rank, w.world_size) == (1, 2)
    assert w.my_work(["a", "b", "c", "d"]) == ["b", "d"]


def test_bad_inputs_are_named(tmp_path):
    with ShardWriter(tmp_path, {"cfg": 4.0}) as w:
        w.add("a", {"x": torch.zeros(1)})
    with pytest.raises(InvalidArgument, match=r"cfg: 4.0 -> 5.0"):
        ShardWriter(tmp_path, {"cfg": 5.0})
    with pytest.raises(InvalidArgument, match="rank"):
        ShardWriter(tmp_path / "x", {}, rank=2, world_size=2)
    w = ShardWriter(tmp_path / "y", {}, rank=0, world_size=1)
    w.add("a", {"x": torch.zeros(1)})
    with pytest.raises(InvalidArgument, match="already written"):
        w.add("a", {"x": torch.zeros(1)})
