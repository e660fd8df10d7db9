"""Resumable, atomic, rank-split sample shards (safetensors + a manifest), for Collect jobs.

Layout of a shard directory:
    manifest.json                      {"format": "llamagen_core2.shards", "version": 1, "meta": {...}}
    rank00000-000000.safetensors       samples written by rank 0, first flush
    rank00001-000000.safetensors       ...
Each shard stores sample k's tensor `name` under the key "{k}/{name}" and the ordered sample ids in
its safetensors metadata ("sample_ids", a JSON list of strings).

Guarantees:
  * Atomic: a shard is written to a hidden temp file in the directory and os.replace'd into place,
    so a shard file with its final name is always complete; leftover temp files are ignored.
  * Resumable: `done_ids()` lists every sample in any complete shard (all ranks). A killed run loses
    only its unflushed buffer; re-running skips done ids, so nothing is lost or duplicated.
  * Rank split (torchrun): rank / world size from arguments or the RANK / WORLD_SIZE env vars;
    `my_work(ids)` gives this rank the ids at positions rank, rank + W, ... that are not done.
    Files are per rank, so ranks never write the same file.
  * The manifest's `meta` must match on resume (e.g. model, CFG scale), so runs never mix silently; the refusal
    names every differing key with its old and new value. A directory that holds no shard yet (a run that was
    refused or failed before its first flush) takes the new settings, so it never blocks a corrected rerun;
    shards without a manifest are refused (run_settings.py: the rule `generate` and `sample` share).
  * Nothing non-finite is written: `add` refuses a floating tensor holding NaN/inf (NonFiniteError).
  * Every malformed input names its file: a manifest that is not JSON or lacks / mistypes a field, a truncated
    or foreign safetensors file, a shard without sample ids.

API:
    with ShardWriter(dir, meta, rank=None, world_size=None, samples_per_shard=64) as w:
        for sid in w.my_work(all_ids):
            w.add(sid, {"x": tensor, ...})       # flushes every samples_per_shard samples
    r = ShardReader(dir); r.meta; r.sample_ids(); for sid, tensors in r: ...
    ids, stacked = r.load_all()                   # {"x": [N, ...]} in sample-id order
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

import torch

from ..errors import CheckpointError, InvalidArgument, check_all_finite, check_int, rank_and_world
from .checkpoint import read_json
from .files import atomic_write, atomic_write_json
from .run_settings import check_run_settings

FORMAT = "llamagen_core2.shards"
VERSION = 1
MANIFEST = "manifest.json"


def _shard_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("rank*-*.safetensors") if not p.name.startswith("."))


def _shard_ids(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type, which does not name the file
        raise CheckpointError(f"{path}: unreadable shard, truncated or not safetensors ({e}); delete it and "
                              f"rerun to redo its samples") from None
    try:
        ids = json.loads(meta["sample_ids"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a {FORMAT} shard (no valid sample_ids metadata)") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CheckpointError(f"{path}: sample_ids metadata must be a JSON list of strings")
    return ids


def _read_manifest(directory: Path) -> Optional[dict]:
    """The manifest with its fields type-checked (format, version, meta), or None when there is none."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path, "shard manifest")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format must be {FORMAT!r}, got {manifest.get('format')!r}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: version must be {VERSION}, got {manifest.get('version')!r}")
    if not isinstance(manifest.get("meta"), dict):
        raise CheckpointError(f"{path}: meta must be a JSON object, got {manifest.get('meta')!r}")
    return manifest


class ShardWriter:
    def __init__(self, directory, manifest_meta: Mapping, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None, samples_per_shard: int = 64):
        self.directory = Path(directory)
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.samples_per_shard = check_int("samples_per_shard", samples_per_shard, minimum=1)
        self.meta = json.loads(json.dumps(dict(manifest_meta)))  # JSON round trip: what will be compared
        self.directory.mkdir(parents=True, exist_ok=True)
        # The one rerun rule (run_settings.py): no shard yet -> these settings replace any manifest a failed run
        # left behind; shards -> the manifest's meta must match, else every difference is named.
        check_run_settings(self.directory / MANIFEST, self.meta, has_results=bool(_shard_files(self.directory)),
                           write=True, results="shards",
                           load=lambda path: (_read_manifest(self.directory) or {}).get("meta"),
                           store=lambda path, meta: atomic_write_json(path, {"format": FORMAT, "version": VERSION,
                                                                             "meta": meta}))
        self._done = set()
        self._next_seq = 0
        for path in _shard_files(self.directory):
            self._done.update(_shard_ids(path))
            if path.name.startswith(f"rank{self.rank:05d}-"):
                self._next_seq = max(self._next_seq, int(path.stem.split("-")[1]) + 1)
        self._buffer: list[tuple[str, dict[str, torch.Tensor]]] = []

    def done_ids(self) -> set[str]:
        """Ids in complete shards (any rank) plus those buffered by this writer."""
        return self._done | {sid for sid, _ in self._buffer}

    def my_work(self, sample_ids: Iterable[str]) -> list[str]:
        """This rank's share of `sample_ids` (positions rank, rank+W, ...) minus those already done."""
        ids = [str(s) for s in sample_ids]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("sample_ids must be unique")
        done = self.done_ids()
        return [s for k, s in enumerate(ids) if k % self.world_size == self.rank and s not in done]

    def add(self, sample_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        sample_id = str(sample_id)
        if sample_id in self.done_ids():
            raise InvalidArgument(f"sample {sample_id!r} is already written; skip done ids (my_work / done_ids)")
        if not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise InvalidArgument(f"sample {sample_id!r}: tensors must be a non-empty dict of torch.Tensor")
        bad = [k for k in tensors if "/" in k]
        if bad:
            raise InvalidArgument(f"tensor names must not contain '/', got {bad}")
        check_all_finite(f"{self.directory}: sample {sample_id!r} not written", tensors)
        self._buffer.append((sample_id, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))
        if len(self._buffer) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> Optional[Path]:
        """Write buffered samples as one new shard (atomically); returns its path or None if empty."""
        if not self._buffer:
            return None
        from safetensors.torch import save_file

        flat = {f"{k}/{name}": t for k, (_, tensors) in enumerate(self._buffer) for name, t in tensors.items()}
        ids = [sid for sid, _ in self._buffer]
        path = self.directory / f"rank{self.rank:05d}-{self._next_seq:06d}.safetensors"
        atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"sample_ids": json.dumps(ids)}))
        self._done.update(ids)
        self._buffer.clear()
        self._next_seq += 1
        return path

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Flush on success and on exceptions alike: finished samples are kept either way.
        self.flush()


class ShardReader:
    def __init__(self, directory):
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise InvalidArgument(f"{self.directory}: no {MANIFEST}; not a shard directory")
        self.meta = manifest["meta"]
        self._index: list[tuple[Path, list[str]]] = [(p, _shard_ids(p)) for p in _shard_files(self.directory)]
        seen: dict[str, Path] = {}
        self.shard_of = seen  # sample id -> the shard file holding it
        for path, ids in self._index:
            for sid in ids:
                if sid in seen:
                    raise InvalidArgument(f"sample {sid!r} appears in both {seen[sid].name} and {path.name}")
                seen[sid] = path

    def sample_ids(self) -> list[str]:
        return [sid for _, ids in self._index for sid in ids]

    def __len__(self) -> int:
        return sum(len(ids) for _, ids in self._index)

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        from safetensors.torch import load_file

        for path, ids in self._index:
            try:
                flat = load_file(str(path))
            except Exception as e:  # safetensors' own error type does not name the file
                raise CheckpointError(f"{path}: unreadable shard, truncated or not safetensors ({e}); delete it "
                                      f"and rerun to redo its samples") from None
            per_sample: list[dict[str, torch.Tensor]] = [{} for _ in ids]
            for key, t in flat.items():
                k, _, name = key.partition("/")
                if not k.isdigit() or int(k) >= len(ids) or not name:
                    raise CheckpointError(f"{path}: tensor key {key!r} is not '<sample number>/<name>' of the "
                                          f"{len(ids)} samples listed in its metadata")
                per_sample[int(k)][name] = t
            yield from zip(ids, per_sample)

    def load_all(self, names: Optional[Iterable[str]] = None) -> tuple[list[str], dict[str, torch.Tensor]]:
        """All samples sorted by id, each tensor name stacked along a new dim 0."""
        samples = sorted(iter(self), key=lambda s: s[0])
        if not samples:
            return [], {}
        keys = list(names) if names is not None else sorted(samples[0][1])
        out = {}
        for name in keys:
            try:
                out[name] = torch.stack([tensors[name] for _, tensors in samples])
            except KeyError:
                raise InvalidArgument(f"some samples lack tensor {name!r}") from None
            except RuntimeError as e:
                raise InvalidArgument(f"tensor {name!r} has different shapes across samples ({e})") from None
        return [sid for sid, _ in samples], out
