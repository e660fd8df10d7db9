"""Train the mini-world class-conditional GPT (LlamaGen architecture, dim 192, 4 layers) on VQ tokens.

    python -m llamagen_core2.world.train_gpt --vq checkpoints/world_vq --out checkpoints/world_gpt

Steps: render the procedural dataset (its own seed), tokenize it with the shipped VQ (raster-order
codes, 6x6 = 36 per image), then train with teacher-forced cross-entropy on `GPT.logits`. Class
dropout (LlamaGen `class_dropout_prob`, 0.1): the class id is replaced by the null id
`num_classes` so the same model also learns the unconditional distribution CFG needs.
Seeded; prints the held-out token loss and the time taken.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from ..config import GPTConfig
from ..decode.model import GPT, init_weights
from ..encoders.vq import VQModel
from .dataset import IMAGE_SIZE, NUM_CLASSES, make_dataset


def world_gpt_config(vocab_size: int, downsample: int, dim: int = 192, n_layer: int = 4, n_head: int = 6) -> GPTConfig:
    return GPTConfig.from_preset("GPT-B", dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size,
                                 num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, downsample=downsample)


@torch.no_grad()
def tokenize(vq: VQModel, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """images [N, 3, S, S] in [-1, 1] -> codes [N, (S/ds)^2] (int16 to keep the cache small)."""
    return torch.cat([vq.encode(chunk).to(torch.int16) for chunk in images.split(batch_size)])


def drop_classes(labels: torch.Tensor, prob: float, null_id: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class with probability `prob` (labels [B])."""
    drop = torch.rand(labels.shape, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_id), labels)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vq", default="checkpoints/world_vq")
    p.add_argument("--out", default="checkpoints/world_gpt")
    p.add_argument("--per-class", type=int, default=1500, help="training images per class")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    vq = VQModel.from_pretrained(args.vq)
    images, labels = make_dataset(args.per_class, seed=5000 + args.seed)
    tokens = tokenize(vq, images).long()
    val_images, val_labels = make_dataset(20, seed=6000 + args.seed)
    val_tokens = tokenize(vq, val_images).long()
    del images, val_images
    print(f"tokenized {len(tokens)} images -> {tuple(tokens.shape)}; {tokens.unique().numel()} distinct codes "
          f"({time.time() - start:.0f}s)", flush=True)

    config = world_gpt_config(vq.config.codebook_size, vq.config.downsample, args.dim, args.n_layer, args.n_head)
    gpt = GPT(config)
    init_weights(gpt)  # small init as in LlamaGen (normal std 0.02 for linears and embeddings)
    n_params = sum(p.numel() for p in gpt.parameters())
    print(f"GPT dim {config.dim} layers {config.n_layer} heads {config.n_head} vocab {config.vocab_size} "
          f"tokens {config.num_image_tokens}: {n_params / 1e6:.2f}M params", flush=True)
    opt = torch.optim.AdamW(gpt.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    generator = torch.Generator().manual_seed(args.seed)
    gpt.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(tokens), (args.batch_size,), generator=generator)
        cond = drop_classes(labels[idx], args.class_dropout, NUM_CLASSES, generator)
        logits = gpt.logits(cond, tokens[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss.item():.4f}  ({time.time() - start:.0f}s)", flush=True)
    gpt.eval()
    with torch.no_grad():
        val_cond = F.cross_entropy(gpt.logits(val_labels, val_tokens).flatten(0, 1), val_tokens.flatten()).item()
        null = torch.full_like(val_labels, NUM_CLASSES)
        val_uncond = F.cross_entropy(gpt.logits(null, val_tokens).flatten(0, 1), val_tokens.flatten()).item()
    print(f"held-out token loss: conditional {val_cond:.4f}, unconditional {val_uncond:.4f} (nats/token)")
    gpt.save_pretrained(args.out)
    print(f"saved {args.out}; time {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
