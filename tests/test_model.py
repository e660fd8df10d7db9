"""GPT: presets, 2D RoPE quirks, cached decode vs full recompute, t2i masks, checkpoint formats and errors."""
import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from llamagen_core2.config import GPTConfig
from llamagen_core2.decode.block_ops import apply_rotary
from llamagen_core2.decode.model import GPT, rope_table_2d
from llamagen_core2.errors import CheckpointError, InvalidArgument
from tiny_models import captions, tiny_gpt, tiny_gpt_config


@pytest.mark.parametrize("preset,millions", [("GPT-B", 111), ("GPT-L", 343), ("GPT-XL", 775), ("GPT-XXL", 1411),
                                             ("GPT-3B", 3097)])
def test_preset_parameter_counts_match_llamagen(preset, millions):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.005, count


def test_preset_ffn_and_t2i_shapes():
    c = GPTConfig.from_preset("GPT-3B")
    assert (c.head_dim, c.ffn_dim) == (100, 8704)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("GPT-XL-t2i"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["cls_embedding.cap_proj.fc1.weight"] == (1280, 2048)
    assert shapes["cls_embedding.cap_proj.fc2.weight"] == (1280, 1280)
    assert shapes["cls_embedding.uncond_embedding"] == (120, 2048)
    assert shapes["layers.0.attention.wqkv.weight"] == (3 * 1280, 1280)
    assert not any("rope" in k or "cache" in k for k in shapes)


def test_rope_table_matches_explicit_formula_and_zero_prefix():
    grid, head_dim, T = 3, 8, 2
    table = rope_table_2d(grid, head_dim, T)
    assert table.shape == (T + grid * grid, head_dim // 2, 2)
    assert torch.count_nonzero(table[:T]) == 0  # zeros, not the identity rotation
    quarter = head_dim // 4
    for r in range(grid):
        for c in range(grid):
            w = [10000 ** (-2 * k / (head_dim // 2)) for k in range(quarter)]
            angles = [r * x for x in w] + [c * x for x in w]
            row = table[T + r * grid + c]
            assert torch.allclose(row[:, 0], torch.tensor([math.cos(a) for a in angles]), atol=1e-6)
            assert torch.allclose(row[:, 1], torch.tensor([math.sin(a) for a in angles]), atol=1e-6)


def test_apply_rotary_is_complex_multiplication_on_interleaved_pairs():
    x = torch.randn(2, 5, 3, 8)
    table = rope_table_2d(2, 8, 1)  # 5 positions
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 4, 2))
                             * torch.view_as_complex(table.contiguous())[None, :, None]).flatten(3)
    assert torch.allclose(apply_rotary(x, table), ref, atol=1e-6)
    assert torch.count_nonzero(apply_rotary(x, table)[:, 0]) == 0  # prefix position: q/k become zero


def _cached_logits(model, cond, tokens, mask=None, chunks=(1,), cache=None):
    """Prefill + decode through the KV cache, one token (or chunk) at a time -> fp32 logits [B, N, V]."""
    B, N = tokens.shape
    T = model.config.cls_token_num
    cache = cache or model.new_cache(B, T + N)
    cache.set_prefix_mask(mask)
    out = [model.head(model.forward_hidden(model.condition_embeddings(cond), cache)[:, -1:])]
    pos, i = T, 0
    while i < N - 1:
        step = min(chunks[len(out) % len(chunks)], N - 1 - i)
        h = model.forward_hidden(model.embed_tokens(tokens[:, i:i + step]), cache, start=pos)
        out.append(model.head(h))
        pos, i = pos + step, i + step
    return torch.cat(out, dim=1)


def test_cached_decode_equals_full_recompute_c2i():
    model = tiny_gpt()
    cond = torch.tensor([0, 3, 9])
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.logits(cond, tokens)
        assert full.shape == (3, 16, 97) and full.dtype == torch.float32
        assert torch.allclose(_cached_logits(model, cond, tokens), full, atol=1e-5)
        assert torch.allclose(_cached_logits(model, cond, tokens, chunks=(3, 1, 5)), full, atol=1e-5)


def test_cached_decode_equals_full_recompute_t2i_with_padding_mask():
    model = tiny_gpt("t2i")
    feats, mask = captions(model, 2, [2, 6])
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.logits(feats, tokens, cond_mask=mask)
        assert torch.allclose(_cached_logits(model, feats, tokens, mask), full, atol=1e-5)
        # Padded prefix positions are invisible to the image tokens: changing them changes nothing...
        noisy = feats + 5.0 * (~mask)[..., None] * torch.randn_like(feats)
        assert torch.allclose(model.logits(noisy, tokens, cond_mask=mask), full, atol=1e-5)
        # ...while without the mask they matter (so the check above can fail).
        assert not torch.allclose(model.logits(noisy, tokens), model.logits(feats, tokens), atol=1e-3)


def test_decode_reads_only_the_filled_cache():
    model = tiny_gpt()
    cond = torch.tensor([1, 2])
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.logits(cond, tokens)
        cache = model.new_cache(2)
        for t in cache.k + cache.v:  # poison every slot: a read of an unfilled entry would produce NaN
            t.fill_(float("nan"))
        assert torch.allclose(_cached_logits(model, cond, tokens, cache=cache), full, atol=1e-5)


def test_kv_cache_is_owned_by_the_caller_not_the_model():
    model = tiny_gpt()
    cache = model.new_cache(4, 17)
    assert len(cache.k) == model.config.n_layer and cache.k[0].shape == (4, model.config.n_head, 17,
                                                                          model.config.head_dim)
    assert cache.fits(2, 10, torch.float32, "cpu") and not cache.fits(8, 17, torch.float32, "cpu")
    assert not cache.fits(2, 10, torch.bfloat16, "cpu")
    assert not any("cache" in k for k in model.state_dict()) and not hasattr(model, "caches")
    with pytest.raises(InvalidArgument, match="cannot hold rows"):
        model.forward_hidden(torch.zeros(5, 1, model.config.dim), cache)


def test_ffn_keeps_llamagen_keys_and_one_gemm_weight():
    model = tiny_gpt()
    state = model.state_dict()
    ff = model.layers[0].feed_forward
    assert "layers.0.feed_forward.w1.weight" in state and "layers.0.feed_forward.w13" not in state
    assert torch.equal(torch.cat([state["layers.0.feed_forward.w1.weight"],
                                  state["layers.0.feed_forward.w3.weight"]]), ff.w13)
    x = torch.randn(3, model.config.dim)
    w1, w3 = state["layers.0.feed_forward.w1.weight"], state["layers.0.feed_forward.w3.weight"]
    reference = ff.w2(torch.nn.functional.silu(x @ w1.T) * (x @ w3.T))  # LlamaGen: w2(silu(w1 x) * w3 x)
    assert torch.allclose(ff(x), reference, atol=1e-6)
    other = tiny_gpt()
    other.load_state_dict(state)
    assert torch.equal(other.layers[0].feed_forward.w13, ff.w13)


def test_bf16_weights_run_and_stay_close_to_fp32():
    model = tiny_gpt()
    cond = torch.tensor([4])
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.logits(cond, tokens)
        low = model.to(torch.bfloat16).logits(cond, tokens)
    assert low.dtype == torch.float32 and model.rope.dtype == torch.float32
    assert (low - ref).abs().max() / ref.abs().max() < 0.05


def test_bad_conditions_raise():
    model = tiny_gpt()
    with pytest.raises(InvalidArgument, match="class ids must be in"):
        model.logits(torch.tensor([11]), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(InvalidArgument, match="integer tensor"):
        model.logits(torch.tensor([1.0]), torch.zeros(1, 4, dtype=torch.long))
    t2i = tiny_gpt("t2i")
    with pytest.raises(InvalidArgument, match="caption features"):
        t2i.logits(torch.zeros(1, 5, 24), torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------- checkpoint formats
def _official_state(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["freqs_cis"] = torch.zeros(3, 2)  # a stray key some official checkpoints carry
    state["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1)
    return state


@pytest.mark.parametrize("wrapper", ["model", "module", "state_dict", None])
def test_official_pt_wrappers_load_unchanged(tmp_path, wrapper):
    model = tiny_gpt()
    state = _official_state(model)
    path = tmp_path / "c2i_tiny_64.pt"
    torch.save({wrapper: state} if wrapper else state, path)
    loaded = GPT.from_pretrained(path, preset="GPT-B", **{k: v for k, v in tiny_gpt_config().to_dict().items()
                                                          if k != "preset"})
    cond, tokens = torch.tensor([5]), torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded.logits(cond, tokens), model.logits(cond, tokens))


def test_config_inferred_from_shapes_and_filename(tmp_path):
    model = tiny_gpt("t2i")
    torch.save({"model": model.state_dict()}, tmp_path / "t2i_tiny_64.pt")
    loaded = GPT.from_pretrained(tmp_path / "t2i_tiny_64.pt", n_head=4, downsample=16, multiple_of=32)
    c = loaded.config
    assert (c.model_type, c.dim, c.n_layer, c.cls_token_num, c.caption_dim, c.image_size) == ("t2i", 64, 2, 6, 24, 64)
    assert torch.equal(loaded.cls_embedding.uncond_embedding, model.cls_embedding.uncond_embedding)


def test_official_shapes_infer_preset(tmp_path):
    with torch.device("meta"):
        state = GPT(GPTConfig.from_preset("GPT-L")).state_dict()
    from llamagen_core2.decode.model import infer_gpt_config
    fields = infer_gpt_config(state, "c2i_L_384.pt")
    assert (fields["preset"], fields["n_head"], fields["image_size"], fields["num_classes"]) == ("GPT-L", 16, 384, 1000)


def test_safetensors_directory_and_sharded_roundtrip(tmp_path):
    model = tiny_gpt()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    kwargs = {k: v for k, v in tiny_gpt_config().to_dict().items() if k != "preset"}
    a = GPT.from_pretrained(tmp_path / "w.safetensors", preset="GPT-B", **kwargs)
    model.save_pretrained(tmp_path / "one")
    b = GPT.from_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=50_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    c = GPT.from_pretrained(tmp_path / "sharded")
    for m in (a, b, c):
        for k, v in model.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k


def test_checkpoint_errors_name_keys_and_suggest_preset(tmp_path):
    model = tiny_gpt()
    kwargs = {k: v for k, v in tiny_gpt_config().to_dict().items() if k != "preset"}
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    torch.save(missing, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"missing keys.*norm\.weight"):
        GPT.from_pretrained(tmp_path / "m.pt", preset="GPT-B", **kwargs)
    torch.save({**state, "layers.0.attention.bias": torch.zeros(1)}, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*layers\.0\.attention\.bias"):
        GPT.from_pretrained(tmp_path / "u.pt", preset="GPT-B", **kwargs)
    wide = tiny_gpt(dim=96)
    torch.save({"model": wide.state_dict()}, tmp_path / "c2i_wide_64.pt")
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wo\.weight: checkpoint \[96, 96\] vs "
                                              r"expected \[64, 64\].*The checkpoint has dim=96"):
        GPT.from_pretrained(tmp_path / "c2i_wide_64.pt", preset="GPT-B", **kwargs)


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError):
        GPT.from_pretrained(tmp_path / "evil.pt", preset="GPT-B")


def test_logits_checks_cond_mask_as_generate_does():
    """Issue 19: gpt.logits accepted a cond_mask on a class-conditional model silently (generate refuses it)."""
    from llamagen_core2.decode.generate import generate

    gpt, t2i = tiny_gpt(), tiny_gpt("t2i")
    labels, tokens = torch.tensor([1, 2]), torch.zeros(2, 4, dtype=torch.long)
    mask = torch.ones(2, 1, dtype=torch.bool)
    for call in (lambda: gpt.logits(labels, tokens, cond_mask=mask), lambda: generate(gpt, labels, cond_mask=mask)):
        with pytest.raises(InvalidArgument, match="cond_mask is only meaningful for text-conditional"):
            call()
    feats, t2i_mask = captions(t2i, 2, [3, 6])
    for bad, match in ((t2i_mask[:, 1:], r"cond_mask must be a tensor \[B=2, 6\]"),
                       (t2i_mask.float(), "cond_mask must be bool")):
        for call in (lambda: t2i.logits(feats, tokens, cond_mask=bad), lambda: generate(t2i, feats, cond_mask=bad)):
            with pytest.raises(InvalidArgument, match=match):
                call()
    assert t2i.logits(feats, tokens, cond_mask=t2i_mask).shape == (2, 4, t2i.config.vocab_size)


@pytest.mark.parametrize("key,dtype", [("norm.weight", torch.int32), ("tok_embeddings.weight", torch.int64),
                                       ("output.weight", torch.bool)])
def test_an_integer_float_weight_is_a_named_dtype_error(tmp_path, key, dtype):
    """Issue 19: an int32 norm.weight failed inside load_state_dict ('Only Tensors of floating point ... can require
    gradients') instead of naming the key and its dtype."""
    from llamagen_core2.core2.weak_model import WeakModel
    from llamagen_core2.encoders.vq import VQModel

    gpt = tiny_gpt()
    state = {k: v.clone() for k, v in gpt.state_dict().items()}
    state[key] = state[key].to(dtype)
    torch.save({"model": state}, tmp_path / "c2i_tiny_64.pt")
    with pytest.raises(CheckpointError, match=rf"{key}: torch.{str(dtype).split('.')[-1]}.*floating"):
        GPT.from_pretrained(tmp_path / "c2i_tiny_64.pt", **{k: getattr(gpt.config, k) for k in
                                                             ("n_head", "multiple_of", "downsample")})
    weak = WeakModel.for_base(gpt, "W-1", dim=32, n_head=4, multiple_of=32)
    weak.save_pretrained(tmp_path / "weak")
    weak_state = {k: v.contiguous() for k, v in weak.state_dict().items()}
    weak_state["norm.weight"] = weak_state["norm.weight"].to(torch.int32)
    save_file(weak_state, str(tmp_path / "weak" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"norm.weight: torch.int32.*floating"):
        WeakModel.from_pretrained(tmp_path / "weak", gpt)
    from llamagen_core2.config import VQConfig

    vq = VQModel(VQConfig(ch=16, z_channels=16, codebook_size=97, codebook_embed_dim=8, norm_groups=8,
                          ch_mult=(1, 1, 1))).eval()
    vq.save_pretrained(tmp_path / "vq")
    vq_state = {k: v.contiguous() for k, v in vq.state_dict().items()}
    vq_state["quant_conv.weight"] = vq_state["quant_conv.weight"].to(torch.int32)
    save_file(vq_state, str(tmp_path / "vq" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"quant_conv.weight: torch.int32.*floating"):
        VQModel.from_pretrained(tmp_path / "vq")
