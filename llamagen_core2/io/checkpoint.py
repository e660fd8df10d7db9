"""Checkpoint I/O: read official LlamaGen files safely, validate keys/shapes, write safetensors.

Reading (`read_state_dict`):
  * `.pt` / `.pth` / `.bin`: `torch.load(weights_only=True)` — a pickle that tries to build
    arbitrary objects is refused with CheckpointError. Wrappers `{"model": sd}`, `{"module": sd}`,
    `{"state_dict": sd}` and flat (FSDP-consolidated) dicts are accepted (docs/design.md#checkpoints).
  * `.safetensors` files.
  * a directory written by `save_pretrained`: `config.json` + `model.safetensors`, or shards
    listed in `model.safetensors.index.json`.
Writing (`save_pretrained`) is atomic per file (files.atomic_write: temp file + os.replace, user's umask),
refuses NaN/inf weights (NonFiniteError naming the tensor) and shards past a size threshold with a
HuggingFace-style index json. Every unreadable file (not JSON, truncated safetensors, not a torch.save file)
raises CheckpointError naming the file.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import CheckpointError, check_all_finite
from .files import atomic_write, atomic_write_json  # noqa: F401  (atomic_write_json: re-exported)

WRAPPER_KEYS = ("model", "module", "state_dict")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def _unwrap(obj, path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path}: no state dict found; expected a dict of tensors or one wrapped under "
        f"{list(WRAPPER_KEYS)}, got {type(obj).__name__} with keys {list(obj)[:8] if isinstance(obj, Mapping) else '-'}")


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" not in text:  # not a pickle at all (text, JSON, random bytes)
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (not a file written by torch.save)") from None
        detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(
            f"{path}: refused to unpickle — the file contains objects other than tensors and plain "
            f"containers, and loading it could run arbitrary code (torch.load weights_only=True said: "
            f"{detail})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError) as e:  # truncated zip, text file ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'})") from None
    return _unwrap(obj, path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON object from `path`; CheckpointError naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: a {what} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a directory written by save_pretrained")
    return read_json(path, "config.json")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from any supported file or directory (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state.update(_load_safetensors(path / name))
            return state
        if (path / WEIGHTS_NAME).is_file():
            return _load_safetensors(path / WEIGHTS_NAME)
        raise CheckpointError(f"{path}: directory holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_pickle(path)


def validate_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor | torch.Size],
    *,
    ignore_prefixes: Iterable[str] = (),
    ignore_substrings: Iterable[str] = (),
    what: str = "model",
    hint: str = "",
) -> dict[str, torch.Tensor]:
    """Return the entries of `state` that `expected` names, after strict key, shape and dtype checks.

    `expected` maps each key to the model's tensor (a meta tensor is enough) or just its shape. Keys starting with
    one of `ignore_prefixes` or containing one of `ignore_substrings` (e.g. the `kv_cache` buffers some LlamaGen
    checkpoints carry) are dropped silently; any other missing, unexpected or mis-shaped key, and a
    non-floating tensor where the model has a floating one (an int32 norm weight), raises CheckpointError
    naming them (up to 10 of each) and the dtype found.
    """
    prefixes, substrings = tuple(ignore_prefixes), tuple(ignore_substrings)
    kept = {k: v for k, v in state.items()
            if not (prefixes and k.startswith(prefixes)) and not any(s in k for s in substrings)}
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))

    def shape(spec) -> tuple:
        return tuple(spec.shape) if isinstance(spec, torch.Tensor) else tuple(spec)

    common = set(expected) & set(kept)
    wrong = sorted(f"{k}: checkpoint {list(kept[k].shape)} vs expected {list(shape(expected[k]))}"
                   for k in common if tuple(kept[k].shape) != shape(expected[k]))
    # A float weight stored as integers would fail inside load_state_dict ("only floating point ... gradients").
    wrong_dtype = sorted(f"{k}: {kept[k].dtype}, expected a floating-point tensor" for k in common
                         if isinstance(expected[k], torch.Tensor) and expected[k].is_floating_point()
                         and not kept[k].is_floating_point())
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {wrong[:10]}")
    if wrong_dtype:
        problems.append(f"wrong dtypes ({len(wrong_dtype)}): {wrong_dtype[:10]}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the {what}: " + "; ".join(problems) + (f". {hint}" if hint else ""))
    return kept


def save_pretrained(
    directory: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: dict,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write config.json + safetensors weights (sharded with an index past `max_shard_bytes`).

    NaN/inf weights are refused (NonFiniteError) before anything is written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    # clone: tensors may be views of one storage (w1 | w3 of FeedForward.w13), which safetensors refuses to save
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    check_all_finite(f"refusing to write {directory}", tensors)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    written = []
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
        written.append(directory / name)
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(directory / INDEX_NAME)
    elif (directory / INDEX_NAME).exists():
        (directory / INDEX_NAME).unlink()  # a stale index from an earlier sharded save would shadow the new file
    atomic_write_json(directory / CONFIG_NAME, config)
    written.append(directory / CONFIG_NAME)
    return written
