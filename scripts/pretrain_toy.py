#!/usr/bin/env python
"""Pre-train the bundled toy Wan2.1-I2V model on the procedural world (loraedit/world.py).

    python scripts/pretrain_toy.py --seed 0 --out loraedit/toymodel

Same classes and folder layout as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (see loraedit/tiny.py for the
text/image encoders); only the sizes differ. Four phases, all on the CPU:

1. VAE (AutoencoderKLWan, real 4x temporal / 8x spatial factors, 16 latent channels): reconstruction
   (L1 + MSE of the decoded distribution mode, weighted up on the main object, a small L2 on the
   latents) on random 9-frame 64x64 crops (first frame alone + two 4-frame chunks, so the causal
   cache is trained) of world clips, source and edited truth, half of the crops centred on the object.
2. Encoding: the per-channel latent mean/std are measured on the training clips and written into the
   VAE config (`latents_mean` / `latents_std`), exactly the convention of the real model.
3. Transformer (WanTransformer3DModel, 36-channel I2V input): flow matching with the **stock** I2V
   condition only (first frame kept, everything else generated: `method.stock_plan`), on
   17-frame 128x128 clips encoded once with the trained VAE, captions from the world (10% empty),
   CLIP image embeddings of the first frame; weights averaged with an EMA.
4. Decoder refinement: more reconstruction training for the VAE decoder alone on full 17-frame
   crops (encoder frozen, so the transformer's latents and the latent mean/std stay valid).

Every number that shapes the result is a flag; the defaults are the run that produced the shipped
weights (see loraedit/toymodel/MODEL_CARD.md). Every schedule counts steps, never wall time, and
every random draw comes from a generator seeded from --seed, so a run is a pure function of its
flags, the torch version and --threads (the shipped run: --seed 0 --threads 2, torch 2.13.0 CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraedit import method  # noqa: E402
from loraedit.world import make_clip  # noqa: E402

TRAIN_SEED_BASE = 1_000_000  # world seeds used for pre-training start here (demo/bench/tests use small seeds)

VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                  temperal_downsample=[False, True, True])
TRANSFORMER_OVERRIDES = dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=6,
                             added_kv_proj_dim=128, freq_dim=64, rope_max_seq_len=64)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 → (3, F, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def build_pipeline(seed: int):
    from diffusers import AutoencoderKLWan

    from loraedit.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=seed, transformer_overrides=TRANSFORMER_OVERRIDES)
    torch.manual_seed(seed + 1)
    pipe.vae = AutoencoderKLWan(**VAE_CONFIG)
    pipe.register_modules(vae=pipe.vae)
    return pipe


def progress(step: int, steps: int) -> float:
    return min(step / max(steps, 1), 1.0)


def lr_at(p: float, base: float, warmup: float = 0.03) -> float:
    if p < warmup:
        return base * (0.1 + 0.9 * p / warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (p - warmup) / (1 - warmup))))


# ---------------------------------------------------------------- phase 1: the VAE


def vae_crop(clip, rng: np.random.Generator, frames: int, size: int, centred: float) -> tuple[np.ndarray, np.ndarray]:
    """A random (frames, size, size) crop of the source or the edited truth, and the object's coverage
    there; with probability `centred` the crop is centred (with jitter) on the main object."""
    video = clip.truth if rng.uniform() < 0.5 else clip.source
    F_, H, W = clip.alpha.shape
    f0 = int(rng.integers(0, F_ - frames + 1))
    alpha = clip.alpha[f0:f0 + frames]
    ys, xs = np.nonzero(alpha[0] > 0.5)
    if len(ys) and rng.uniform() < centred:
        cy, cx = ys.mean() + rng.uniform(-12, 12), xs.mean() + rng.uniform(-12, 12)
        y0 = int(np.clip(round(cy - size / 2), 0, H - size))
        x0 = int(np.clip(round(cx - size / 2), 0, W - size))
    else:
        y0, x0 = int(rng.integers(0, H - size + 1)), int(rng.integers(0, W - size + 1))
    crop = video[f0:f0 + frames, y0:y0 + size, x0:x0 + size]
    a = alpha[:, y0:y0 + size, x0:x0 + size]
    if rng.uniform() < 0.5:
        crop, a = crop[:, :, ::-1], a[:, :, ::-1]
    return np.ascontiguousarray(crop), np.ascontiguousarray(a)


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, object_weight: float):
    """L1 + MSE with the main object's pixels weighted up: the object is a small part of each frame, but it
    is what an edit changes and what the claims measure. rec, x: (B, 3, F, H, W); alpha: (B, F, H, W)."""
    w = (1.0 + object_weight * alpha)[:, None]
    w = w / w.mean()
    l1 = ((rec - x).abs() * w).mean()
    mse = ((rec - x).pow(2) * w).mean()
    return l1, mse


def train_vae(vae, args, history: dict, eval_clips) -> None:
    rng = np.random.default_rng(args.seed)
    pool_seeds = [TRAIN_SEED_BASE + i for i in range(args.vae_clips)]
    log(f"VAE: rendering {len(pool_seeds)} clips")
    pool = [make_clip(s) for s in pool_seeds]
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(progress(step, args.vae_steps), args.vae_lr)
        crops = [vae_crop(pool[rng.integers(len(pool))], rng, args.vae_frames, args.vae_crop, 0.5)
                 for _ in range(args.vae_batch)]
        x = torch.stack([to_tensor(c) for c, _ in crops])
        alpha = torch.from_numpy(np.stack([a for _, a in crops]))
        # deterministic: the engine encodes with the distribution's mode, and sampling with the
        # untrained (unit) variance drowns the latents in noise and stalls training at ~17 dB
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        l1, mse = reconstruction_loss(rec, x, alpha, args.vae_object_weight)
        kl = z.pow(2).mean()  # keeps the latents' scale bounded (they are normalised afterwards)
        loss = l1 + mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        history["vae"].append({"step": step, "l1": l1.item(), "mse": mse.item(), "kl": kl.item(),
                               "seconds": time.time() - t0})
        if step % 25 == 0:
            el = time.time() - t0
            eta = el / max(step, 1) * (args.vae_steps - step)
            log(f"VAE step {step}/{args.vae_steps} l1={float(l1):.4f} mse={float(mse):.5f} kl={float(kl):.3f} "
                f"({el / 60:.1f} min, ETA {eta / 60:.1f} min)")
        if args.vae_eval_every and step and step % args.vae_eval_every == 0:
            vae.eval()
            m = vae_eval(vae, eval_clips)
            history.setdefault("vae_eval_curve", []).append({"step": step, **m})
            log(f"VAE eval at step {step}: {m}")
            vae.train()
    history["vae_steps"] = args.vae_steps
    history["vae_seconds"] = time.time() - t0
    vae.eval()


def refine_decoder(vae, args, history: dict) -> None:
    """Phase 4: more training for the decoder alone. The encoder is frozen, so the latents the
    transformer was trained on (and their mean/std) do not change; only the pictures get sharper."""
    rng = np.random.default_rng(args.seed + 3)
    pool = [make_clip(TRAIN_SEED_BASE + 200_000 + i) for i in range(args.vae_clips)]
    for q in vae.parameters():
        q.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.dec_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    vae.train()
    for step in range(args.dec_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(progress(step, args.dec_steps), args.dec_lr, warmup=0.0)
        crops = [vae_crop(pool[rng.integers(len(pool))], rng, args.dec_frames, args.vae_crop, 0.5)
                 for _ in range(args.dec_batch)]
        x = torch.stack([to_tensor(c) for c, _ in crops])
        alpha = torch.from_numpy(np.stack([a for _, a in crops]))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        l1, mse = reconstruction_loss(rec, x, alpha, args.vae_object_weight)
        loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history["dec"].append({"step": step, "l1": l1.item(), "mse": mse.item(), "seconds": time.time() - t0})
        if step % 25 == 0:
            log(f"decoder step {step}/{args.dec_steps} l1={l1.item():.4f} mse={mse.item():.5f}")
    vae.eval()
    for q in vae.parameters():
        q.requires_grad_(False)
    history["dec_steps"] = args.dec_steps
    history["dec_seconds"] = time.time() - t0


# ---------------------------------------------------------------- phase 2: encode the data set


@torch.no_grad()
def encode_dataset(pipe, args, history: dict) -> dict:
    from PIL import Image

    vae = pipe.vae
    n = args.dit_clips
    t0 = time.time()
    xs, ys, imgs, texts = [], [], [], []
    empty_text = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=512)[0]
    for i in range(n):
        clip = make_clip(TRAIN_SEED_BASE + 100_000 + i)
        # a quarter of the clips are the edited truth (more colours), half are mirrored (more directions)
        src = clip.truth if i % 4 >= 2 else clip.source
        caption = clip.edited_caption if i % 4 >= 2 else clip.caption
        if i % 2 == 1:
            src = np.ascontiguousarray(src[:, :, ::-1])
        video = to_tensor(src)  # (3, F, H, W)
        cond, _keep = method.stock_plan(video[:, 0], video.shape[1])  # (F, 3, H, W)
        pair = torch.stack([video, cond.permute(1, 0, 2, 3)])
        z = vae.encode(pair).latent_dist.mode()
        xs.append(z[0])
        ys.append(z[1])
        imgs.append(pipe.encode_image(Image.fromarray(src[0]), device="cpu")[0])
        texts.append(pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=512)[0][0])
        if i % 20 == 0:
            log(f"encoded {i + 1}/{n} clips ({time.time() - t0:.0f}s)")
    x = torch.stack(xs)
    mean = x.mean(dim=(0, 2, 3, 4))
    std = x.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                           latents_std=[round(float(v), 5) for v in std])
    history["encode_seconds"] = time.time() - t0
    return {
        "x0": method.normalize_latents(x, mean, std),
        "y": method.normalize_latents(torch.stack(ys), mean, std),
        "image": torch.stack(imgs), "text": torch.stack(texts), "empty_text": empty_text[0],
    }


@torch.no_grad()
def vae_eval(vae, clips) -> dict:
    """The true edited video of held-out clips through the VAE, scored by the world's metrics: the
    ceiling any edit made with this model can reach (psnr_in / colour_err_in inside the object)."""
    from loraedit.world import clip_metrics, psnr, through_vae

    rows = []
    for clip in clips:
        rec = through_vae(vae, clip.truth)
        m = clip_metrics(rec, clip)
        rows.append({"psnr_all": psnr(rec, clip.truth), "psnr_in": m["psnr_in"], "colour_err_in": m["colour_err_in"],
                     "psnr_out": m["psnr_out"], "first_psnr": m["first_psnr"]})
    return {k: round(float(np.nanmean([r[k] for r in rows])), 3) for k in rows[0]}


# ---------------------------------------------------------------- phase 3: the transformer


def train_transformer(pipe, data: dict, args, history: dict):
    tr = pipe.transformer
    tr.train()
    ema = copy.deepcopy(tr).eval()
    for q in ema.parameters():
        q.requires_grad_(False)
    opt = torch.optim.AdamW(tr.parameters(), lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 7)
    n, T, h, w = data["x0"].shape[0], data["x0"].shape[2], data["x0"].shape[3], data["x0"].shape[4]
    keep = torch.zeros(1 + 4 * (T - 1), h, w)
    keep[0] = 1.0  # the stock I2V mask
    t0 = time.time()
    for step in range(args.dit_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(progress(step, args.dit_steps), args.dit_lr)
        idx = torch.randint(0, n, (args.dit_batch,), generator=gen)
        x0, y = data["x0"][idx], data["y"][idx]
        text = data["text"][idx].clone()
        drop = torch.rand(args.dit_batch, generator=gen) < 0.1
        text[drop] = data["empty_text"]
        cond = method.condition_tensor(y, keep)
        half = args.dit_batch // 2
        sigma = torch.cat([method.sample_sigma(half, "uniform", gen),
                           method.sample_sigma(args.dit_batch - half, "shifted", gen, shift=3.0)])
        noise = torch.randn(x0.shape, generator=gen)
        loss = method.velocity_loss(tr, x0, cond, text, data["image"][idx], sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pt in zip(ema.parameters(), tr.parameters()):
                pe.lerp_(pt, 1 - d)
        history["dit"].append({"step": step, "loss": float(loss), "seconds": time.time() - t0})
        if step % 25 == 0:
            recent = np.mean([r["loss"] for r in history["dit"][-25:]])
            el = time.time() - t0
            eta = el / max(step, 1) * (args.dit_steps - step)
            log(f"DiT step {step}/{args.dit_steps} loss={float(loss):.4f} (mean of last 25: {recent:.4f}) "
                f"({el / 60:.1f} min, ETA {eta / 60:.1f} min)")
    history["dit_steps"] = args.dit_steps
    history["dit_seconds"] = time.time() - t0
    return ema


@torch.no_grad()
def dit_eval(transformer, data: dict, n: int, seed: int) -> dict:
    """Velocity loss at fixed σ on the first n clips (same noise each time): a comparable number."""
    gen = torch.Generator().manual_seed(seed)
    n = min(n, data["x0"].shape[0])
    T, h, w = data["x0"].shape[2:]
    keep = torch.zeros(1 + 4 * (T - 1), h, w)
    keep[0] = 1.0
    out = {}
    for s in (0.25, 0.5, 0.75):
        losses = []
        for i in range(n):
            noise = torch.randn(data["x0"][i:i + 1].shape, generator=gen)
            cond = method.condition_tensor(data["y"][i:i + 1], keep)
            losses.append(float(method.velocity_loss(transformer, data["x0"][i:i + 1], cond, data["text"][i:i + 1],
                                                     data["image"][i:i + 1], torch.tensor([s]), noise)))
        out[f"sigma_{s}"] = float(np.mean(losses))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "loraedit" / "toymodel"))
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; part of what the result depends on (the shipped run used 2)")
    ap.add_argument("--vae-steps", type=int, default=2200)
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--vae-frames", type=int, default=9)
    ap.add_argument("--vae-crop", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the latent L2 penalty")
    ap.add_argument("--vae-object-weight", type=float, default=4.0,
                    help="extra loss weight on the main object's pixels (1 + w * coverage)")
    ap.add_argument("--vae-clips", type=int, default=96)
    ap.add_argument("--vae-eval-every", type=int, default=300)
    ap.add_argument("--eval-clips", type=int, default=4)
    ap.add_argument("--dit-clips", type=int, default=256)
    ap.add_argument("--dit-steps", type=int, default=4500)
    ap.add_argument("--dit-batch", type=int, default=4)
    ap.add_argument("--dit-lr", type=float, default=3e-4)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--dec-steps", type=int, default=300)
    ap.add_argument("--dec-lr", type=float, default=2e-4)
    ap.add_argument("--dec-frames", type=int, default=17, help="full clips, so every causal chunk is refined")
    ap.add_argument("--dec-batch", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_all = time.time()
    history: dict = {"args": {k: v for k, v in vars(args).items() if k != "out"},
                     "torch": torch.__version__, "vae": [], "dit": [], "dec": []}
    pipe = build_pipeline(args.seed)
    log(f"VAE {sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.2f}M params, transformer "
        f"{sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f}M params")

    eval_clips = [make_clip(TRAIN_SEED_BASE + 900_000 + i) for i in range(args.eval_clips)]
    train_vae(pipe.vae, args, history, eval_clips)
    history["vae_eval"] = vae_eval(pipe.vae, eval_clips)
    log(f"VAE done: {history['vae_steps']} steps, {history['vae_seconds']:.0f}s, held-out {history['vae_eval']}")

    data = encode_dataset(pipe, args, history)
    log(f"encoded {args.dit_clips} clips in {history['encode_seconds']:.0f}s")
    history["dit_eval_before"] = dit_eval(pipe.transformer, data, 8, args.seed + 11)
    ema = train_transformer(pipe, data, args, history)
    pipe.transformer = ema
    pipe.register_modules(transformer=ema)
    history["dit_eval_after"] = dit_eval(ema, data, 8, args.seed + 11)
    log(f"DiT done: {history['dit_steps']} steps, {history['dit_seconds']:.0f}s; "
        f"eval before {history['dit_eval_before']} after {history['dit_eval_after']}")
    del data
    if args.dec_steps:
        refine_decoder(pipe.vae, args, history)
        history["vae_eval_refined"] = vae_eval(pipe.vae, eval_clips)
        log(f"decoder refined: {history['dec_steps']} steps, held-out {history['vae_eval_refined']}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    history["total_seconds"] = time.time() - t_all
    write_summary(out / "training.json", history)
    log(f"saved to {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB); "
        f"total {history['total_seconds']:.0f}s")
    return 0


def write_summary(path: Path, history: dict) -> None:
    summary = {k: v for k, v in history.items() if k not in ("vae", "dit", "dec")}
    # a compact loss record: means over windows of 25 steps
    for key, field in (("vae", "l1"), ("dit", "loss"), ("dec", "l1")):
        rows = history.get(key) or []
        if rows:
            summary[f"{key}_{field}_curve"] = [
                [rows[i]["step"], round(float(np.mean([r[field] for r in rows[i:i + 25]])), 5), round(rows[i]["seconds"])]
                for i in range(0, len(rows), 25)]
    path.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
