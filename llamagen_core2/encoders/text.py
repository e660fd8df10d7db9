"""T5 caption encoder for LlamaGen t2i conditioning (docs/design.md#t2i-conditioning).

Contract
--------
`CaptionEncoder.from_pretrained(directory)` loads a transformers `T5EncoderModel` and its
tokenizer from a local directory or a Hub repo id (`google/flan-t5-xl`, fetched into the HF cache by
`hub.resolve`, offline with HF_HUB_OFFLINE=1); transformers itself only ever reads the resolved local
directory. For the official models this is FLAN-T5-XL (d_model = caption_dim = 2048).

`encoder.encode(prompts)` returns `(features, mask)` (`encode_in_batches(encoder, prompts)`: the same for any number
of prompts, 32 at a time, gathered on the CPU):
  * features: [B, 120, D] float32, LEFT-padded — the valid caption tokens occupy the LAST
    `n_valid` positions and every padded row is exactly zero;
  * mask: [B, 120] bool, True on the valid (last) positions.
This is LlamaGen's procedure (autoregressive/sample/sample_t2i.py): T5 is run on the usual
right-padded tokens (max_length 120, padding="max_length"), then each row is rotated so its
first `n_valid` rows move to the end, the 0/1 attention mask is flipped along the sequence, and
the features are multiplied by the flipped mask. `left_pad_captions` is that reordering alone.

A prompt longer than `max_length` tokens (the count includes T5's end-of-sequence token) raises
InvalidArgument naming its index and token count; LlamaGen silently truncates, which
`encode(..., truncate=True)` reproduces.

Text preprocessing: LlamaGen's T5Embedder cleans captions with `clean_caption` (ftfy + BeautifulSoup
+ ~50 regexes, lower-casing first). We do not depend on ftfy/bs4; the default `preprocess="lower"`
applies `text.strip().lower()` (LlamaGen's path with preprocessing disabled), which matches the
cleaned text for ordinary prompts. Pass `preprocess=None` for raw text or a callable for
your own cleaning (e.g. a port of clean_caption).

Combining with classifier-free guidance (the model module does this; shown for callers)
----------------------------------------------------------------------------------------
    cond, mask = encoder.encode(prompts)                        # [B,120,D], [B,120]
    null = gpt_state_dict["cls_embedding.uncond_embedding"]      # [120, D] buffer of the GPT ckpt
    uncond = null.expand(B, -1, -1)                              # the null caption
    captions = torch.cat([cond, uncond.to(cond)])                # [2B,120,D], cond half first
    prefix_mask = torch.cat([mask, mask])                        # the SAME mask for both halves
The prefix attention mask (over the 120 condition positions) is applied to both halves with the
diagonal forced true, so fully padded query rows still attend to themselves.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from ..errors import CheckpointError, InvalidArgument, check_int

CAPTION_MAX_LENGTH = 120  # LlamaGen t2i cls_token_num / --t5-feature-max-len

TOKENIZER_VOCAB_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")
# What a T5 Hub repo download fetches: config, safetensors weights (not the duplicate .bin / .h5 / .msgpack
# copies most T5 repos also hold) and the tokenizer files.
T5_REPO_FILES = ("*.json", "*.safetensors", "spiece.model", "tokenizer.model")

Preprocess = Union[str, None, Callable[[str], str]]


def left_pad_captions(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens to the end and zero the padded rows (LlamaGen left padding).

    features: [B, L, D] T5 output for right-padded tokens; mask: [B, L] (bool or 0/1 ints),
    each row a prefix of ones followed by zeros (the tokenizer pads on the right).
    Returns (features [B, L, D] same dtype, mask [B, L] bool) with row b's valid count n_b:
    out[b, L-n_b+j] = features[b, j] for j < n_b, out[b, :L-n_b] = 0, mask[b] = flip(mask[b]).
    """
    if features.dim() != 3 or mask.dim() != 2 or features.shape[:2] != mask.shape:
        raise InvalidArgument(
            f"left_pad_captions expects features [B, L, D] and mask [B, L]; got "
            f"features {tuple(features.shape)} and mask {tuple(mask.shape)}"
        )
    valid = mask.to(device=features.device, dtype=torch.bool)
    B, L, D = features.shape
    n_valid = valid.sum(dim=1)  # [B]
    positions = torch.arange(L, device=features.device)
    # The official code flips the mask, which is only a left-padding of the tokens when every
    # row is ones-then-zeros; refuse anything else rather than silently misalign.
    expected = positions[None, :] < n_valid[:, None]
    if not torch.equal(valid, expected):
        raise InvalidArgument(
            "mask must be right-padded (each row: ones, then zeros) as produced by the T5 "
            "tokenizer with padding_side='right'"
        )
    # Rotating row b left by n_b puts source row j at L - n_b + j: the pads come first.
    source = (positions[None, :] + n_valid[:, None]) % L  # [B, L]
    rotated = features.gather(1, source[:, :, None].expand(B, L, D))
    new_mask = valid.flip(dims=[-1])
    # where() instead of the official multiply: identical for finite values, and a pad row
    # can never leak a NaN/inf into the prefix.
    rotated = torch.where(new_mask[:, :, None], rotated, torch.zeros((), dtype=rotated.dtype, device=rotated.device))
    return rotated, new_mask


def _check_directory(name: str, directory) -> Path:
    if directory is None or not isinstance(directory, (str, os.PathLike)):
        raise InvalidArgument(f"{name} must be a path to a local directory, got {directory!r}")
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"{name} {str(path)!r} is not an existing directory (nor a Hugging Face repo id 'org/repo' such "
            "as google/flan-t5-xl)"
        )
    return path


class CaptionEncoder:
    """A frozen T5 encoder + tokenizer producing LlamaGen-style left-padded caption features."""

    def __init__(self, model, tokenizer, *, max_length: int = CAPTION_MAX_LENGTH, preprocess: Preprocess = "lower"):
        max_length = check_int("max_length", max_length, minimum=1)  # LlamaGen uses 120
        if not (preprocess is None or preprocess == "lower" or callable(preprocess)):
            raise InvalidArgument(f"preprocess must be 'lower', None or a callable str -> str, got {preprocess!r}")
        if tokenizer.pad_token_id is None:
            raise CheckpointError("the tokenizer has no pad token; T5 tokenizers pad with '<pad>'")
        tokenizer.padding_side = "right"  # left_pad_captions assumes right-padded masks
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.preprocess = preprocess

    @classmethod
    def from_pretrained(
        cls,
        directory,
        *,
        device=None,
        dtype: torch.dtype | None = None,
        max_length: int = CAPTION_MAX_LENGTH,
        tokenizer_directory=None,
        preprocess: Preprocess = "lower",
        revision: str | None = None,
        cache_dir=None,
        local_files_only: bool | None = None,
    ) -> "CaptionEncoder":
        """Load T5EncoderModel + AutoTokenizer from `directory`: a local directory or a Hub repo id
        (e.g. google/flan-t5-xl), resolved by `hub.resolve` (HF cache, HF_HUB_OFFLINE; only the config,
        safetensors weights and tokenizer files of a repo are fetched).

        dtype: weights dtype (None = as saved; bf16 is what LlamaGen uses; fp16 overflows in T5).
        tokenizer_directory: where the tokenizer lives if not next to the model (a directory or a repo id).
        """
        from transformers import AutoTokenizer, T5EncoderModel

        from ..io.hub import is_repo_id, resolve

        def local(name, source):
            if not is_repo_id(source):
                return _check_directory(name, source)
            return resolve(source, allow_patterns=T5_REPO_FILES, revision=revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, what=f"T5 {name}")

        model_dir = local("directory", directory)
        tok_dir = model_dir if tokenizer_directory is None else local("tokenizer_directory", tokenizer_directory)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise InvalidArgument(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"{str(model_dir)!r} has no config.json; it is not a saved T5 encoder directory")
        # transformers 5 silently builds an EMPTY T5 tokenizer from config.json alone, so require
        # the vocabulary file itself before asking AutoTokenizer.
        if not any((tok_dir / name).is_file() for name in TOKENIZER_VOCAB_FILES):
            raise CheckpointError(
                f"{str(tok_dir)!r} has no tokenizer vocabulary (expected one of "
                f"{', '.join(TOKENIZER_VOCAB_FILES)}); save the T5 tokenizer next to the model or "
                "pass tokenizer_directory"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/... with long messages
            raise CheckpointError(
                f"could not load a tokenizer from {str(tok_dir)!r} (expected tokenizer.json or "
                f"spiece.model + tokenizer_config.json; converting a bare spiece.model needs the "
                f"protobuf package, so prefer a directory that also has tokenizer.json): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            kwargs = {"local_files_only": True}
            if dtype is not None:
                kwargs["dtype"] = dtype
            model = T5EncoderModel.from_pretrained(str(model_dir), **kwargs)
        except Exception as exc:
            raise CheckpointError(
                f"could not load a T5 encoder from {str(model_dir)!r} (expected config.json + "
                f"model.safetensors / pytorch_model.bin): {type(exc).__name__}: {exc}"
            ) from exc
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, max_length=max_length, preprocess=preprocess)

    @property
    def caption_dim(self) -> int:
        """D of the features (2048 for FLAN-T5-XL, the GPT's caption_dim)."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _clean(self, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise InvalidArgument(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InvalidArgument(f"prompts[{i}] must be a str, got {type(p).__name__}")
        if self.preprocess is None:
            return list(prompts)
        if self.preprocess == "lower":
            return [p.strip().lower() for p in prompts]
        return [self.preprocess(p) for p in prompts]

    def tokenize(self, prompts: Sequence[str], *, truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, max_length] and 0/1 attention mask [B, max_length], right-padded."""
        texts = self._clean(prompts)
        if not truncate:
            lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
            for i, n in enumerate(lengths):
                if n > self.max_length:
                    raise InvalidArgument(
                        f"prompts[{i}] is {n} tokens long (including end-of-sequence); the caption "
                        f"limit is max_length={self.max_length}. Shorten it or pass truncate=True "
                        "(LlamaGen truncates silently)"
                    )
        batch = self.tokenizer(
            texts,
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts: B strings -> (features [B, max_length, D] float32 left-padded, mask [B, max_length] bool)."""
        input_ids, attention_mask = self.tokenize(prompts, truncate=truncate)
        device = self.device
        hidden = self.model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
        ).last_hidden_state  # [B, L, D], computed on right-padded tokens as in LlamaGen
        return left_pad_captions(hidden.float(), attention_mask.to(device))


ENCODE_BATCH = 32  # prompts per T5 forward when encoding many (the CLI's caption file, a pipeline's prompt list)


def encode_in_batches(encoder, prompts: Sequence[str],
                      batch_size: int = ENCODE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts: M strings -> (features [M, max_length, D] float32, mask [M, max_length] bool) on the CPU, encoded
    `batch_size` at a time by anything with `encode(prompts)` (a CaptionEncoder or a stand-in)."""
    features, masks = [], []
    for start in range(0, len(prompts), batch_size):
        f, m = encoder.encode(prompts[start:start + batch_size])
        features.append(f.cpu())
        masks.append(m.cpu())
    return torch.cat(features), torch.cat(masks)
