"""Tests for the VQ tokenizer (llamagen_core2.encoders.vq) and the image helpers (llamagen_core2.io.images).

Tiny CPU configs (ch 32, z 16, codebook 64x8, GroupNorm(8)) so the whole file runs in seconds.
References: brute-force nearest neighbour, a naive attention written out here, hand-computed
pixel values, and the official LlamaGen parameter counts (see `test_official_presets_on_meta`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import llamagen_core2.encoders.vq as vq_module
from llamagen_core2.config import VQConfig
from llamagen_core2.encoders.vq import AttnBlock, Downsample, Upsample, VQModel
from llamagen_core2.errors import CheckpointError, InvalidArgument
from llamagen_core2.io import images as img

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: tiny convs are ~100x slower with 2


TINY = dict(ch=32, z_channels=16, codebook_size=64, codebook_embed_dim=8, norm_groups=8)


def tiny_model(ch_mult=(1, 2), seed=0) -> VQModel:
    torch.manual_seed(seed)
    model = VQModel(VQConfig(ch_mult=ch_mult, **TINY)).eval()
    # Default init gives near-constant outputs; widen the weights so codes and pixels vary.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 4:
                p.normal_(0.0, 0.2)
    return model


def images(batch=2, height=16, width=16, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


def assert_same_outputs(a: VQModel, b: VQModel, x: torch.Tensor) -> None:
    codes = a.encode(x)
    assert torch.equal(codes, b.encode(x))
    assert torch.equal(a.decode_codes(codes), b.decode_codes(codes))


# ------------------------------------------------------------------------- shapes / semantics
def test_encode_decode_shapes_square_and_rectangular():
    model = tiny_model()
    codes = model.encode(images(2, 16, 16))
    assert codes.shape == (2, 64) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert model.decode_codes(codes).shape == (2, 3, 16, 16)

    codes = model.encode(images(1, 16, 32))  # grid 8 x 16
    assert codes.shape == (1, 128)
    assert model.decode_codes(codes, grid=(8, 16)).shape == (1, 3, 16, 32)
    with pytest.raises(InvalidArgument, match="grid"):
        model.decode_codes(codes[:, :127])  # 127 is not a square and no grid given


def test_codes_are_raster_order():
    model = tiny_model()
    codes = torch.randint(0, 64, (1, 8 * 16))
    latents = model.lookup_codes(codes, grid=(8, 16))  # [1, 8, 8, 16]
    table = F.normalize(model.quantize.embedding.weight, dim=-1)
    for r, c in [(0, 0), (0, 15), (1, 0), (7, 15), (3, 9)]:
        torch.testing.assert_close(latents[0, :, r, c], table[codes[0, r * 16 + c]])


def test_forward_is_decode_of_encode_and_quantizer_is_idempotent():
    model = tiny_model()
    x = images()
    codes = model.encode(x)
    torch.testing.assert_close(model(x), model.decode_codes(codes), rtol=0, atol=0)
    # Re-quantizing a looked-up (l2-normalised) code vector returns the same code.
    all_codes = torch.arange(64).reshape(1, 64)
    assert torch.equal(model.quantize.nearest_codes(model.lookup_codes(all_codes)), all_codes)


def test_quantizer_matches_brute_force_nearest_normalised_code(monkeypatch):
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(torch.randn(64, 8, generator=g) * torch.rand(64, 1, generator=g) * 5)
    z = torch.randn(3, 8, 5, 7, generator=g) * 3
    # Reference: explicit pairwise Euclidean distances between l2-normalised vectors.
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    table = F.normalize(model.quantize.embedding.weight, dim=-1)
    expected = torch.cdist(flat.double(), table.double()).argmin(dim=1).reshape(3, 35)
    assert torch.equal(model.quantize.nearest_codes(z), expected)
    # Without normalisation the answer differs (codebook norms vary), so the l2-norm is exercised.
    raw = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8), model.quantize.embedding.weight).argmin(1)
    assert not torch.equal(raw.reshape(3, 35), expected)
    # Chunked search (several chunks with a ragged tail) gives the same codes.
    monkeypatch.setattr(vq_module, "DISTANCE_CHUNK_ELEMENTS", 64 * 8)
    assert torch.equal(model.quantize.nearest_codes(z), expected)


def test_attention_block_matches_naive_reference():
    torch.manual_seed(0)
    block = AttnBlock(16, groups=4).eval()
    x = torch.randn(2, 16, 3, 5)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, HW]
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 16 ** 0.5, dim=-1)  # [B, HWq, HWk]
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 16, 3, 5)
        expected = x + block.proj_out(out)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def _center_tap(conv: torch.nn.Conv2d, row: int, col: int) -> None:
    """Make a 3x3 conv copy input channel c to output channel c from kernel tap (row, col)."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(conv.weight.shape[0]):
            conv.weight[c, c, row, col] = 1.0


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(2)
    x = torch.randn(1, 2, 6, 6)
    _center_tap(down.conv, 1, 1)
    # Pad (0,1,0,1) + stride 2: output (i, j) is centred on input (2i+1, 2j+1).
    torch.testing.assert_close(down(x), x[:, :, 1::2, 1::2], rtol=0, atol=0)
    _center_tap(down.conv, 2, 2)
    out = down(x)
    torch.testing.assert_close(out[:, :, :2, :2], x[:, :, 2::2, 2::2][:, :, :2, :2], rtol=0, atol=0)
    assert torch.all(out[:, :, 2, :] == 0) and torch.all(out[:, :, :, 2] == 0)  # the zero pad row/col
    _center_tap(down.conv, 0, 0)  # no top/left pad: tap (0, 0) reads input (2i, 2j)
    torch.testing.assert_close(down(x), x[:, :, 0::2, 0::2], rtol=0, atol=0)


def test_upsample_is_nearest_neighbour():
    up = Upsample(2)
    _center_tap(up.conv, 1, 1)
    x = torch.randn(1, 2, 3, 4)
    expected = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), expected, rtol=0, atol=0)


def _reference_forward(stack, h, levels, n_res, resample, is_decoder):
    """Official block order, spelled out over the submodules by their checkpoint key names:
    encoder: conv_in, per level (res.j, attn.j)*, downsample; mid.0-2; norm_out, swish, conv_out.
    decoder: conv_in, mid.0-2, per level (deepest first) (res.j, attn.j)*, upsample; same tail."""
    h = stack.conv_in(h)
    if is_decoder:
        h = stack.mid[2](stack.mid[1](stack.mid[0](h)))
    for i in range(levels):
        block = stack.conv_blocks[i]
        for j in range(n_res):
            h = block.res[j](h)
            if i == (0 if is_decoder else levels - 1):  # attention lives at the deepest level only
                h = block.attn[j](h)
        if i != levels - 1:
            h = getattr(block, resample)(h)
    if not is_decoder:
        h = stack.mid[2](stack.mid[1](stack.mid[0](h)))
    return stack.conv_out(F.silu(stack.norm_out(h)))


def test_block_order_matches_reference_walk():
    model = tiny_model(ch_mult=(1, 2, 2))
    x = images()
    with torch.no_grad():
        z = _reference_forward(model.encoder, x, 3, 2, "downsample", is_decoder=False)
        latents = model.quant_conv(z)
        torch.testing.assert_close(model.encoder(x), z, rtol=0, atol=0)
        assert torch.equal(model.encode(x), model.quantize.nearest_codes(latents))
        q = model.lookup_codes(model.encode(x))
        expected = _reference_forward(model.decoder, model.post_quant_conv(q), 3, 3, "upsample", is_decoder=True)
        torch.testing.assert_close(model.decode_codes(model.encode(x)), expected, rtol=0, atol=0)


def test_bad_inputs_raise_invalid_argument():
    model = tiny_model()
    with pytest.raises(InvalidArgument, match="multiples of the downsampling factor 2"):
        model.encode(images(1, 15, 16))
    with pytest.raises(InvalidArgument, match=r"\[0, 63\]"):
        model.decode_codes(torch.full((1, 64), 64))
    with pytest.raises(InvalidArgument, match="integer tensor"):
        model.decode_codes(torch.zeros(1, 64))
    with pytest.raises(InvalidArgument, match="shape"):
        model.encode(torch.zeros(1, 4, 16, 16))


# ------------------------------------------------------------------------- checkpoints
def test_official_wrapped_flat_and_safetensors_files_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    sd = model.state_dict()
    torch.save({"model": sd}, tmp_path / "official.pt")
    torch.save(sd, tmp_path / "flat.pt")
    torch.save({"module": sd}, tmp_path / "module.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x = images()
    for name in ("official.pt", "flat.pt", "module.pt", "w.safetensors"):
        loaded = VQModel.from_pretrained(tmp_path / name, preset="VQ-16", ch_mult=(1, 2), **TINY)
        assert not loaded.training
        assert_same_outputs(model, loaded, x)


def test_save_pretrained_roundtrip(tmp_path):
    model = tiny_model(ch_mult=(1, 1, 2))
    written = model.save_pretrained(tmp_path / "vq")
    assert {p.name for p in written} == {"model.safetensors", "config.json"}
    loaded = VQModel.from_pretrained(tmp_path / "vq")  # config comes from config.json, not the preset
    assert loaded.config.to_dict() == model.config.to_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert_same_outputs(model, loaded, images())


@pytest.mark.parametrize("corruption, message", [
    ("missing", "missing keys.*decoder.conv_out.bias"),
    ("unexpected", "unexpected keys.*encoder.extra.weight"),
    ("shape", r"shape mismatches.*quantize.embedding.weight: checkpoint \[64, 4\]"),
])
def test_mismatched_checkpoint_names_the_key(tmp_path, corruption, message):
    sd = dict(tiny_model().state_dict())
    if corruption == "missing":
        del sd["decoder.conv_out.bias"]
    elif corruption == "unexpected":
        sd["encoder.extra.weight"] = torch.zeros(3)
    else:
        sd["quantize.embedding.weight"] = torch.zeros(64, 4)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message):
        VQModel.from_pretrained(tmp_path / "bad.pt", ch_mult=(1, 2), **TINY)


def test_preset_mismatch_gives_hint(tmp_path):
    # A (tiny-width) VQ-8 layout loaded as VQ-16: the message must point at preset='VQ-8'.
    sd = tiny_model(ch_mult=(1, 2, 2, 4)).state_dict()
    torch.save({"model": sd}, tmp_path / "vq8.pt")
    with pytest.raises(CheckpointError, match=r"preset='VQ-8'") as info:
        VQModel.from_pretrained(tmp_path / "vq8.pt", preset="VQ-16", **TINY)
    assert "downsample 8" in str(info.value)
    loaded = VQModel.from_pretrained(tmp_path / "vq8.pt", preset="VQ-8", **TINY)
    assert loaded.downsample == 8


class _RunsCodeOnLoad:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = dict(tiny_model().state_dict())
    torch.save({"model": sd, "payload": _RunsCodeOnLoad(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        VQModel.from_pretrained(tmp_path / "evil.pt", ch_mult=(1, 2), **TINY)
    assert not marker.exists()


# Reference counts obtained by instantiating the official LlamaGen VQ_16() / VQ_8()
# (tokenizer/tokenizer_image/vq_model.py, default ModelArgs) and summing p.numel() over
# parameters and len(state_dict()) — the paper's "72M" tokenizer.
OFFICIAL = {"VQ-16": (71_883_403, 344), "VQ-8": (70_109_835, 300)}


@pytest.mark.parametrize("preset", ["VQ-16", "VQ-8"])
def test_official_presets_on_meta(preset):
    with torch.device("meta"):
        model = VQModel(VQConfig.from_preset(preset))
    params, n_keys = OFFICIAL[preset]
    assert sum(p.numel() for p in model.parameters()) == params
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == n_keys
    deepest = len(model.config.ch_mult) - 1
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    assert shapes["quantize.codebook_used"] == (65536,)
    assert shapes["quant_conv.weight"] == (8, 256, 1, 1)
    assert shapes["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert shapes[f"encoder.conv_blocks.{deepest}.attn.1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_blocks.0.attn.2.proj_out.weight"] == (512, 512, 1, 1)  # deepest level first
    assert shapes["encoder.mid.1.k.weight"] == shapes["decoder.mid.1.v.weight"] == (512, 512, 1, 1)
    assert shapes[f"encoder.conv_blocks.{deepest - 1}.downsample.conv.weight"] == (256, 256, 3, 3)
    assert f"encoder.conv_blocks.{deepest}.downsample.conv.weight" not in shapes
    level1 = 128 * model.config.ch_mult[1]  # decoder block deepest-1 is level 1, the last with an upsample
    assert shapes[f"decoder.conv_blocks.{deepest - 1}.upsample.conv.weight"] == (level1, level1, 3, 3)
    assert f"decoder.conv_blocks.{deepest}.upsample.conv.weight" not in shapes
    assert shapes["decoder.conv_blocks.0.res.2.norm2.weight"] == (512,)  # num_res_blocks + 1 in decoder
    assert shapes["encoder.norm_out.weight"] == (512,) and shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert not any(k.startswith("encoder.conv_blocks.0.attn") for k in shapes)  # attention only at the deepest level


# ------------------------------------------------------------------------- images
def test_to_uint8_matches_llamagen_clamp_and_truncation():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 8).expand(1, 3, 1, 8)
    # 127.5 x + 128 = -127, 0.5, 64.25, 128, 191.75, 255.37, 255.5, 383 -> clamp -> truncate
    expected = np.array([0, 0, 64, 128, 191, 255, 255, 255], dtype=np.uint8)
    out = img.to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 8, 3)
    np.testing.assert_array_equal(out[0, 0, :, 0], expected)
    np.testing.assert_array_equal(out[..., 1], out[..., 2])
    with pytest.raises(InvalidArgument, match="NaN"):
        img.to_uint8(torch.full((1, 3, 1, 1), float("nan")))


def test_to_model_range_is_inverse_of_to_uint8():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = img.to_model_range(pixels)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    np.testing.assert_array_equal(img.to_uint8(x), pixels)
    assert img.to_model_range(pixels[0]).shape == (1, 3, 16, 16)  # a single [H, W, 3] image


def test_make_grid_layout():
    b, h, w = 5, 4, 3
    batch = np.stack([np.full((h, w, 3), 10 * (i + 1), dtype=np.uint8) for i in range(b)])
    grid = img.make_grid(batch, nrow=3, padding=2, pad_value=7)
    assert grid.shape == (2 * (h + 2) + 2, 3 * (w + 2) + 2, 3)
    for i in range(b):
        top, left = 2 + (i // 3) * (h + 2), 2 + (i % 3) * (w + 2)
        assert np.all(grid[top:top + h, left:left + w] == 10 * (i + 1))
    assert np.all(grid[:2] == 7) and np.all(grid[:, :2] == 7)
    assert np.all(grid[8:8 + h, 12:12 + w] == 7)  # the empty sixth slot stays padding
    assert (grid == 7).sum() == grid.size - b * h * w * 3
    assert img.make_grid(batch, nrow=8).shape == (1 * (h + 2) + 2, 5 * (w + 2) + 2, 3)  # nrow > B


def test_save_png_is_atomic_and_readable(tmp_path, monkeypatch):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = img.save_png(arr, tmp_path / "sub" / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), arr)
    assert os.listdir(tmp_path / "sub") == ["a.png"]

    def failing_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        img.save_png(np.zeros((5, 7, 3), np.uint8), path)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(Image.open(path)), arr)  # old file intact
    assert os.listdir(tmp_path / "sub") == ["a.png"]  # no temp file left behind
    with pytest.raises(InvalidArgument, match="uint8"):
        img.save_png(arr.astype(np.float32), tmp_path / "b.png")


def test_decoded_images_convert_to_pil():
    model = tiny_model()
    pil = img.to_pil_images(model.decode_codes(model.encode(images())))
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"


def test_center_crop_and_from_pil():
    # 96 wide x 32 tall: red | green | blue thirds; the central 16x16 crop must be pure green.
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :32, 0], arr[:, 32:64, 1], arr[:, 64:, 2] = 255, 255, 255
    crop = img.center_crop(Image.fromarray(arr), 16)  # 96x32 -> BOX halve to 48x16 -> centre 16x16
    assert crop.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(crop)[2:-2, 2:-2], np.broadcast_to([0, 255, 0], (12, 12, 3)))
    x = img.from_pil([Image.fromarray(arr), Image.fromarray(arr[:, ::-1])], size=16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
    with pytest.raises(InvalidArgument, match="same size"):
        img.from_pil([Image.fromarray(arr), Image.fromarray(arr[:16])])
