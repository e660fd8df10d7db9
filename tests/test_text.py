"""CaptionEncoder / left_pad_captions tests with a tiny T5 and a tokenizer built offline."""
from __future__ import annotations

import pytest
import torch

from llamagen_core2.encoders.text import CAPTION_MAX_LENGTH, CaptionEncoder, left_pad_captions
from llamagen_core2.errors import CheckpointError, InvalidArgument

WORDS = "a photo of an astronaut riding horse in the forest blue car parked front yellow brick wall cat dog".split()


def _reference_left_pad(features, mask):
    """Row-by-row: valid features (the first n rows) placed at the end, zeros before."""
    out = torch.zeros_like(features)
    out_mask = torch.zeros(mask.shape, dtype=torch.bool)
    L = features.shape[1]
    for b in range(features.shape[0]):
        n = int(mask[b].sum())
        if n:
            out[b, L - n:] = features[b, :n]
            out_mask[b, L - n:] = True
    return out, out_mask


# ---------------------------------------------------------------- left_pad_captions (pure)

@pytest.mark.parametrize("lengths", [[3, 0, 7, 1], [7], [0, 0], [5, 7, 2]])
def test_left_pad_matches_reference(lengths):
    torch.manual_seed(0)
    L, D = 7, 5
    feats = torch.randn(len(lengths), L, D)
    mask = torch.tensor([[1] * n + [0] * (L - n) for n in lengths])  # int64 like the tokenizer
    got, got_mask = left_pad_captions(feats, mask)
    want, want_mask = _reference_left_pad(feats, mask)
    assert got.dtype == feats.dtype and got_mask.dtype == torch.bool
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got_mask, want_mask)
    assert got_mask.sum(1).tolist() == lengths


def test_left_pad_hand_made_example():
    feats = torch.arange(1.0, 5.0).reshape(1, 4, 1)  # rows 1,2,3,4; first two valid
    got, got_mask = left_pad_captions(feats, torch.tensor([[True, True, False, False]]))
    assert got.flatten().tolist() == [0.0, 0.0, 1.0, 2.0]
    assert got_mask.tolist() == [[False, False, True, True]]


def test_left_pad_never_leaks_nan_from_pad_rows():
    feats = torch.ones(1, 4, 2)
    feats[0, 3] = float("nan")
    got, _ = left_pad_captions(feats, torch.tensor([[1, 1, 0, 0]]))
    assert torch.isfinite(got).all()


def test_left_pad_rejects_bad_inputs():
    with pytest.raises(InvalidArgument, match="right-padded"):
        left_pad_captions(torch.zeros(1, 4, 2), torch.tensor([[0, 1, 1, 0]]))
    with pytest.raises(InvalidArgument, match=r"\[B, L, D\]"):
        left_pad_captions(torch.zeros(1, 4, 2), torch.ones(1, 5))


# ---------------------------------------------------------------- CaptionEncoder with a tiny T5

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    directory = tmp_path_factory.mktemp("tiny_t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder(t5_dir):
    return CaptionEncoder.from_pretrained(t5_dir)


PROMPTS = ["A photo of an astronaut riding a horse in the forest", "blue car", "Cat"]


def test_encode_shapes_and_mask_counts(encoder):
    feats, mask = encoder.encode(PROMPTS)
    assert feats.shape == (3, CAPTION_MAX_LENGTH, 32) and feats.dtype == torch.float32
    assert mask.shape == (3, CAPTION_MAX_LENGTH) and mask.dtype == torch.bool
    n_tokens = [len(p.split()) + 1 for p in PROMPTS]  # words + </s>
    assert mask.sum(1).tolist() == n_tokens
    for b, n in enumerate(n_tokens):
        assert mask[b, -n:].all() and not mask[b, :-n].any()
        assert (feats[b, :-n] == 0).all()
        assert (feats[b, -n:].abs().sum(-1) > 0).all()


def test_encode_matches_direct_transformers_and_reference_padding(encoder, t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    feats, mask = encoder.encode(PROMPTS)
    tok = AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)
    model = T5EncoderModel.from_pretrained(t5_dir, local_files_only=True).eval()
    batch = tok([p.lower() for p in PROMPTS], max_length=120, padding="max_length", truncation=True,
                return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    want, want_mask = _reference_left_pad(hidden, batch["attention_mask"])
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask, want_mask)

    # One prompt on its own (no batch padding effects): the valid rows equal T5's unpadded output.
    single = tok(["blue car"], return_tensors="pt")
    with torch.no_grad():
        direct = model(**single).last_hidden_state[0]  # [3, D]
    one, one_mask = encoder.encode(["blue car"])
    n = direct.shape[0]
    torch.testing.assert_close(one[0, -n:], direct, rtol=1e-5, atol=1e-5)
    assert int(one_mask.sum()) == n


def test_too_long_prompt_raises_and_truncate_works(encoder):
    long_prompt = " ".join(["cat"] * 130)  # 131 tokens with </s>
    with pytest.raises(InvalidArgument, match=r"prompts\[1\] is 131 tokens.*max_length=120"):
        encoder.encode(["dog", long_prompt])
    exact = " ".join(["cat"] * 119)  # 120 tokens: fits exactly
    feats, mask = encoder.encode([exact])
    assert mask.all()
    feats, mask = encoder.encode(["dog", long_prompt], truncate=True)
    assert mask.sum(1).tolist() == [2, 120] and feats.shape == (2, 120, 32)


def test_bad_prompts_and_options(encoder, t5_dir):
    with pytest.raises(InvalidArgument, match="non-empty list"):
        encoder.encode([])
    with pytest.raises(InvalidArgument, match="non-empty list"):
        encoder.encode("a single string")
    with pytest.raises(InvalidArgument, match=r"prompts\[1\] must be a str"):
        encoder.encode(["cat", 3])
    with pytest.raises(InvalidArgument, match="max_length"):
        CaptionEncoder.from_pretrained(t5_dir, max_length=0)


def test_max_length_and_dtype_options(t5_dir):
    enc = CaptionEncoder.from_pretrained(t5_dir, max_length=8, dtype=torch.bfloat16)
    assert enc.model.dtype == torch.bfloat16 and enc.caption_dim == 32
    feats, mask = enc.encode(["blue car"])
    assert feats.shape == (1, 8, 32) and feats.dtype == torch.float32 and mask.sum() == 3


def test_missing_or_incomplete_directory(tmp_path, t5_dir):
    with pytest.raises(CheckpointError, match="not an existing directory"):
        CaptionEncoder.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        CaptionEncoder.from_pretrained(empty)
    # config + weights but no tokenizer files
    import shutil

    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in t5_dir.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, no_tok / f.name)
    with pytest.raises(CheckpointError, match="tokenizer"):
        CaptionEncoder.from_pretrained(no_tok)
    # tokenizer + config but no weights
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for f in t5_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, no_weights / f.name)
    with pytest.raises(CheckpointError, match="T5 encoder"):
        CaptionEncoder.from_pretrained(no_weights)


def test_preprocess_options(t5_dir, encoder):
    raw = CaptionEncoder.from_pretrained(t5_dir, preprocess=None)
    custom = CaptionEncoder.from_pretrained(t5_dir, preprocess=lambda s: s.replace("kitty", "cat"))
    lowered, _ = encoder.encode(["  Cat "])  # default: strip + lower -> "cat" (in vocab)
    unknown, _ = raw.encode(["Cat"])  # raw text: "Cat" is <unk> in the tiny vocab
    replaced, _ = custom.encode(["kitty"])
    torch.testing.assert_close(replaced, lowered, rtol=0, atol=0)
    assert not torch.allclose(unknown, lowered)
    with pytest.raises(InvalidArgument, match="preprocess"):
        CaptionEncoder.from_pretrained(t5_dir, preprocess="upper")
