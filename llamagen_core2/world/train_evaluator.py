"""Train the mini-world evaluator classifier on real dataset images (seeded, CPU, a few minutes).

    python -m llamagen_core2.world.train_evaluator --out checkpoints/world_evaluator

Train and held-out sets come from different dataset seeds. Augmentation: random blur of
random strength (decoded VQ images are softer than the renders) — still real images only. Prints held-out
accuracy and the time taken; refuses to save if held-out accuracy is below --min-accuracy.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .dataset import NUM_CLASSES, make_dataset
from .evaluator import Evaluator, class_accuracy


def _binomial_blur(images: torch.Tensor) -> torch.Tensor:
    """One pass of a 3x3 binomial filter with replicate padding (images [B, 3, H, W])."""
    kernel_1d = torch.tensor([0.25, 0.5, 0.25])
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def _random_blur(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: no blur (40%), or a random-strength blend towards one or two binomial blur passes (30% each).
    Decoded VQ images are soft and noise-free; the classifier must not key on crisp edges or pixel noise."""
    once = _binomial_blur(images)
    twice = _binomial_blur(once)
    u = torch.rand(images.shape[0], 1, 1, 1, generator=generator)
    strength = torch.rand(images.shape[0], 1, 1, 1, generator=generator)
    target = torch.where(u < 0.7, once, twice)
    return torch.where(u < 0.4, images, images + strength.clamp(min=0.5) * (target - images))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="checkpoints/world_evaluator")
    p.add_argument("--train-per-class", type=int, default=600)
    p.add_argument("--heldout-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-accuracy", type=float, default=0.95)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    train_x, train_y = make_dataset(args.train_per_class, seed=1000 + args.seed)
    test_x, test_y = make_dataset(args.heldout_per_class, seed=2000 + args.seed)
    model = Evaluator(NUM_CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(train_x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for idx in order.split(args.batch_size):
            if len(idx) < args.batch_size:
                continue
            x = _random_blur(train_x[idx], generator)
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f}  ({time.time() - start:.0f}s)", flush=True)
        acc = class_accuracy(model, test_x, test_y)
        print(f"epoch {epoch}: held-out accuracy {acc:.4f} on {len(test_x)} images", flush=True)
    if acc < args.min_accuracy:
        raise SystemExit(f"held-out accuracy {acc:.4f} < --min-accuracy {args.min_accuracy}; not saving")
    model.eval().save_pretrained(args.out)
    print(f"saved {args.out}; held-out accuracy {acc:.4f}; time {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
