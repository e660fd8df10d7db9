"""Tiny random models shared by the tests (CPU, fp32, seconds to build)."""
import torch

from llamagen_core2.config import GPTConfig
from llamagen_core2.decode.kv_cache import KVCache
from llamagen_core2.decode.model import GPT


def tiny_gpt_config(model_type="c2i", **overrides) -> GPTConfig:
    base = dict(dim=64, n_layer=2, n_head=4, vocab_size=97, num_classes=10, image_size=64, downsample=16,
                multiple_of=32)
    if model_type == "t2i":
        base.update(caption_dim=24, cls_token_num=6)
    base.update(overrides)
    return GPTConfig.from_preset("GPT-B" + ("-t2i" if model_type == "t2i" else ""), **base)


def tiny_gpt(model_type="c2i", seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_gpt_config(model_type, **overrides))
    # Random init gives near-uniform logits; a larger output scale makes guidance and sampling choices matter.
    with torch.no_grad():
        model.output.weight.mul_(20.0)
    return model.eval()


def captions(model: GPT, batch: int, valid_counts, seed=1):
    """Left-padded caption features [B, T, C] (zeros before the valid ones) and their mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    T, C = model.config.cls_token_num, model.config.caption_dim
    feats = torch.randn(batch, T, C, generator=g)
    mask = torch.zeros(batch, T, dtype=torch.bool)
    for b, n in enumerate(valid_counts):
        mask[b, T - n:] = True
    return feats * mask[..., None], mask


class ScaledCondWeak(torch.nn.Module):
    """A stand-in weak model for plumbing tests: predicts 1.5 x the conditional hidden state, hence 1.5 x the
    conditional logits through the linear head. It records the token index of every step (CPU only: it reads
    the device position on the host)."""

    def __init__(self, cls_token_num: int = 1):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.cls_token_num = cls_token_num
        self.started = 0
        self.steps = []

    def new_cache(self, rows, dtype=None, device=None):
        return KVCache(1, rows, 1, 1100, 2, dtype=dtype or torch.float32, device=device or "cpu")

    def prefill(self, cond, cache, cond_mask=None, backend="torch"):
        self.started += 1
        self.steps = []

    def step_hidden(self, hidden_cond, cache, *, start=None, position=None, max_end=None, backend="torch"):
        self.steps.append((start if position is None else int(position)) - self.cls_token_num)
        return self.scale * hidden_cond

    def window_hidden(self, hidden_cond, cache, *, start=None, position=None, max_end=None, backend="torch"):
        """hidden_cond [B, L, d]: L steps at once (Jacobi decoding); records the L token indices."""
        first = (start if position is None else int(position)) - self.cls_token_num
        self.steps.extend(range(first, first + hidden_cond.shape[1]))
        return self.scale * hidden_cond


TINY_VQ = dict(ch=16, z_channels=16, codebook_size=97, codebook_embed_dim=8, norm_groups=8, ch_mult=(1, 1, 1))


def save_tiny_world(root):
    """A tiny GPT (16x16 images, 16 tokens, 10 classes) and a matching VQ saved as directories under `root`
    -> (gpt, vq, gpt_dir, vq_dir), for end-to-end CLI tests."""
    from llamagen_core2.config import VQConfig
    from llamagen_core2.encoders.vq import VQModel

    gpt = tiny_gpt(image_size=16, downsample=4)
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY_VQ)).eval()
    gpt.save_pretrained(root / "gpt")
    vq.save_pretrained(root / "vq")
    return gpt, vq, root / "gpt", root / "vq"
