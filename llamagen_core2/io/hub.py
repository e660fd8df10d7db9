"""Where a checkpoint comes from: a local path, or a Hugging Face Hub repo id resolved through the HF cache.

Contract (one resolver for GPT, VQ, T5, weak models, the pipeline and `diffuse --model`):
  * `resolve(source, filename=None, ...) -> Path`: an existing local path is returned as is (`source/filename`
    when a filename is given and `source` is a directory). Otherwise `source` must look like a repo id
    (`org/repo`): with `filename` (single-file releases such as FoundationVision/LlamaGen's `c2i_B_256.pt`)
    `huggingface_hub.hf_hub_download` fetches that file, without it `snapshot_download` fetches the repo
    (restricted to `allow_patterns`). The path returned lives in the HF cache (`snapshots/<commit>/...`); its
    file name is the repo's, so file-name hints (`_256` image sizes) keep working.
  * Offline and cache settings are read when the call is made, not when huggingface_hub was imported:
    `local_files_only=None` means "offline if HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set", and
    `cache_dir=None` means HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default.
  * A source that is neither an existing path nor resolvable (not cached while offline, unknown repo, missing
    file) raises one CheckpointError naming the source, the local path tried (resolved against the working
    directory), the Hub repo and cache directory, and what to do.
  * `pretrained_kwargs(...)` gives the same settings as keyword arguments for libraries that resolve repo ids
    themselves (diffusers pipelines), and `hub_error(...)` the same one-line error for their failures.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import CheckpointError, InvalidArgument

Source = Union[str, os.PathLike]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def is_repo_id(source) -> bool:
    """`org/repo` that is not an existing local path."""
    return isinstance(source, str) and bool(REPO_ID.match(source)) and not Path(source).expanduser().exists() \
        and ".." not in source.split("/")


def offline() -> bool:
    return any(os.environ.get(name, "").upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir(explicit: Optional[Source] = None) -> Path:
    """The HF hub cache directory a call would use."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def pretrained_kwargs(*, revision: Optional[str] = None, cache_dir: Optional[Source] = None,
                      local_files_only: Optional[bool] = None) -> dict:
    """Keyword arguments for `from_pretrained(repo_id, ...)` of transformers / diffusers, resolved now."""
    kwargs = dict(cache_dir=str(hub_cache_dir(cache_dir)),
                  local_files_only=offline() if local_files_only is None else bool(local_files_only))
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def hub_error(source: str, what: str, exc: BaseException, *, filename: Optional[str] = None,
              cache: Optional[Path] = None, local_files_only: bool = False) -> CheckpointError:
    """One-line error for a repo id that could not be resolved: it names both places looked at, the local path
    (resolved against the working directory) and the Hub repo."""
    target = f"{source}/{filename}" if filename else source
    where = f"the Hugging Face cache {cache}" if cache is not None else "the Hugging Face cache"
    if local_files_only:
        hub = (f"the Hub repo {source!r} is not in {where} and the Hub is offline (HF_HUB_OFFLINE / "
               f"local_files_only): download it once with network access, or pass a local path")
    else:
        hub = (f"the Hub repo {source!r} could not be fetched into {where}: check the repo id / filename, or pass "
               f"a local path")
    local = Path(source).expanduser().absolute()
    hint = ""
    if Path(source).name.startswith("world_"):  # the shipped mini world, named relative to the repository root
        hint = "; the shipped mini-world models are found from any directory with llamagen_core2.world.shipped_paths()"
    return CheckpointError(f"{what} {target!r}: no local path {str(local)!r}, and {hub}{hint} "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def resolve(source: Source, *, filename: Optional[str] = None, subfolder: Optional[str] = None,
            allow_patterns: Optional[Sequence[str]] = None, revision: Optional[str] = None,
            cache_dir: Optional[Source] = None, local_files_only: Optional[bool] = None,
            what: str = "checkpoint") -> Path:
    """Local path of `source` (a path or a repo id), downloading into the HF cache when needed."""
    if source is None or not isinstance(source, (str, os.PathLike)):
        raise InvalidArgument(f"{what} must be a local path or a Hugging Face repo id 'org/repo', got {source!r}")
    for name, value in (("filename", filename), ("subfolder", subfolder)):
        if value is not None and (not isinstance(value, str) or not value or value.startswith("/")
                                  or ".." in value.split("/")):
            raise InvalidArgument(f"{name} must be a relative path inside the repo, got {value!r}")
    local = Path(source).expanduser()
    if local.exists():
        for part in (subfolder, filename):
            if part is not None:
                local = local / part
        if not local.exists():
            raise CheckpointError(f"{what} {str(local)!r} does not exist")
        return local
    if not is_repo_id(str(source)):
        raise CheckpointError(f"{what} {str(source)!r} does not exist (looked at {str(local.absolute())!r}; and it is "
                              f"not a Hugging Face repo id 'org/repo')")
    repo_id = str(source)
    opts = pretrained_kwargs(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, **opts))
        root = Path(snapshot_download(repo_id, allow_patterns=None if allow_patterns is None else list(allow_patterns),
                                      **opts))
    except Exception as exc:  # huggingface_hub raises many types (offline, 404, gated, network, incomplete)
        raise hub_error(repo_id, what, exc, filename=filename, cache=Path(opts["cache_dir"]),
                        local_files_only=opts["local_files_only"]) from None
    path = root / subfolder if subfolder is not None else root
    if not path.exists():
        raise CheckpointError(f"{what} {repo_id!r}: the snapshot {root} has no {subfolder!r}")
    return path
