"""Train the mini-world VQ tokenizer (LlamaGen VQ architecture, tiny widths) on the procedural dataset.

    python -m llamagen_core2.world.train_vq --out checkpoints/world_vq

Loss (LlamaGen's VQ objective without the perceptual and GAN terms): L2 + L1 reconstruction,
codebook loss |sg(z) - e|^2 and commitment 0.25 |z - sg(e)|^2, with z and the codebook
l2-normalised (LlamaGen `codebook_l2_norm`) and a straight-through estimator. Codes unused over
the last `--restart-every` steps are re-seeded from current encoder outputs, so a small codebook
is fully used. Seeded and printing the time taken; saves with `VQModel.save_pretrained`.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ..config import VQConfig
from ..encoders.vq import VQModel
from .dataset import make_dataset

WORLD_VQ_CONFIG = dict(codebook_size=256, codebook_embed_dim=8, ch=32, z_channels=64, ch_mult=(1, 1, 2),
                       num_res_blocks=1, norm_groups=8, dropout=0.0)


def quantize_straight_through(vq: VQModel, images: torch.Tensor):
    """images [B, 3, H, W] -> (reconstruction [B, 3, H, W], codebook loss, commitment loss, codes [B*h*w])."""
    z = F.normalize(vq.quant_conv(vq.encoder(images)), p=2, dim=1)  # [B, D, h, w]
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    codebook = vq.quantize.normalized_codebook()  # [K, D]
    with torch.no_grad():
        codes = (flat @ codebook.t()).argmax(dim=1)  # unit vectors: max cosine == min L2
    zq = codebook[codes].reshape(b, h, w, d).permute(0, 3, 1, 2)
    codebook_loss = F.mse_loss(zq, z.detach())
    commit_loss = F.mse_loss(z, zq.detach())
    zq = z + (zq - z).detach()
    recon = vq.decoder(vq.post_quant_conv(zq))
    return recon, codebook_loss, commit_loss, codes, flat.detach()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="checkpoints/world_vq")
    p.add_argument("--per-class", type=int, default=600, help="training images per class")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--restart-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    images, _ = make_dataset(args.per_class, seed=3000 + args.seed)
    heldout, _ = make_dataset(20, seed=4000 + args.seed)
    vq = VQModel(VQConfig.from_dict(dict(WORLD_VQ_CONFIG)))
    opt = torch.optim.Adam(vq.parameters(), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(args.seed)
    k = vq.config.codebook_size
    used = torch.zeros(k, dtype=torch.bool)
    vq.train()
    for step in range(1, args.steps + 1):
        x = images[torch.randint(len(images), (args.batch_size,), generator=generator)]
        recon, cb_loss, commit_loss, codes, latents = quantize_straight_through(vq, x)
        rec_loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        loss = rec_loss + cb_loss + 0.25 * commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        used[codes] = True
        if step % args.restart_every == 0 and step < 0.8 * args.steps:
            dead = (~used).nonzero().flatten()
            if len(dead):  # re-seed dead codes at random current latents
                pick = torch.randint(len(latents), (len(dead),), generator=generator)
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = latents[pick] + 0.01 * torch.randn(len(dead), latents.shape[1], generator=generator)
            print(f"step {step}: loss {loss.item():.4f} rec {rec_loss.item():.4f} codebook {cb_loss.item():.4f} "
                  f"used {int(used.sum())}/{k} restarted {len(dead)}  ({time.time() - start:.0f}s)", flush=True)
            used.zero_()
        elif step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f} rec {rec_loss.item():.4f}  ({time.time() - start:.0f}s)", flush=True)
    vq.eval()
    with torch.no_grad():
        codes = vq.encode(heldout)
        recon = vq.decode_codes(codes)
        mse = F.mse_loss(recon, heldout).item()
    print(f"held-out recon MSE {mse:.4f} (images in [-1,1]); distinct codes on held-out {codes.unique().numel()}/{k}")
    vq.save_pretrained(args.out)
    print(f"saved {args.out}; time {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
