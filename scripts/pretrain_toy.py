#!/usr/bin/env python
"""Pre-train the bundled toy Wan2.1-I2V model on the procedural world (loraedit/world.py).

    python scripts/pretrain_toy.py --seed 0 --out loraedit/toymodel

Same classes and folder layout as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (see loraedit/tiny.py for the
text/image encoders); only the sizes differ. Two phases, both on the CPU:

1. VAE (AutoencoderKLWan, real 4x temporal / 8x spatial factors, 16 latent channels): reconstruction
   (L1 + MSE of the decoded distribution mode, a small L2 on the latents) on random 5-frame 64x64 crops of world clips.  Then the per-channel
   latent mean/std are measured on the training clips and written into the VAE config
   (`latents_mean` / `latents_std`), exactly the convention of the real model.
2. Transformer (WanTransformer3DModel, 36-channel I2V input): flow matching with the **stock** I2V
   condition only (first frame kept, everything else generated: `method.stock_plan`), on
   17-frame 128x128 clips encoded once with the trained VAE, captions from the world (10% empty),
   CLIP image embeddings of the first frame; weights averaged with an EMA.
3. Decoder refinement: more reconstruction training for the VAE decoder alone (encoder frozen, so
   the transformer's latents and the latent mean/std stay valid).

Every number that shapes the result is a flag; the defaults are the run that produced the shipped
weights (see loraedit/toymodel/MODEL_CARD.md). `--vae-minutes/--dit-minutes` cap the wall time
of a phase (the learning-rate schedule then follows whichever of steps or time runs out first).
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraedit import method  # noqa: E402
from loraedit.world import make_clip  # noqa: E402

TRAIN_SEED_BASE = 1_000_000  # world seeds used for pre-training start here (demo/bench/tests use small seeds)

VAE_CONFIG = dict(base_dim=12, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
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


def progress(step: int, steps: int, t0: float, minutes: float | None) -> float:
    p = step / max(steps, 1)
    if minutes:
        p = max(p, (time.time() - t0) / (60 * minutes))
    return min(p, 1.0)


def lr_at(p: float, base: float, warmup: float = 0.03) -> float:
    if p < warmup:
        return base * (0.1 + 0.9 * p / warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (p - warmup) / (1 - warmup))))


# ---------------------------------------------------------------- phase 1: the VAE


def train_vae(vae, args, history: dict) -> None:
    rng = np.random.default_rng(args.seed)
    pool_seeds = [TRAIN_SEED_BASE + i for i in range(args.vae_clips)]
    log(f"VAE: rendering {len(pool_seeds)} clips")
    pool = [make_clip(s).source for s in pool_seeds]
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    step = 0
    c = args.vae_crop
    while True:
        p = progress(step, args.vae_steps, t0, args.vae_minutes)
        if p >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(p, args.vae_lr)
        batch = []
        for _ in range(args.vae_batch):
            clip = pool[rng.integers(len(pool))]
            f0 = rng.integers(0, clip.shape[0] - 5 + 1)
            y0, x0 = rng.integers(0, clip.shape[1] - c + 1), rng.integers(0, clip.shape[2] - c + 1)
            crop = clip[f0:f0 + 5, y0:y0 + c, x0:x0 + c]
            if rng.uniform() < 0.5:
                crop = crop[:, :, ::-1]
            batch.append(to_tensor(np.ascontiguousarray(crop)))
        x = torch.stack(batch)
        # deterministic: the engine encodes with the distribution's mode, and sampling with the
        # untrained (unit) variance drowns the latents in noise and stalls training at ~17 dB
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = z.pow(2).mean()  # keeps the latents' scale bounded (they are normalised afterwards)
        loss = l1 + mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        history["vae"].append({"step": step, "l1": l1.item(), "mse": mse.item(), "kl": kl.item(),
                               "seconds": time.time() - t0})
        if step % 25 == 0:
            psnr = 10 * math.log10(4.0 / max(float(mse), 1e-10))
            log(f"VAE step {step} p={p:.2f} l1={float(l1):.4f} mse={float(mse):.5f} psnr={psnr:.1f}dB kl={float(kl):.3f}")
        step += 1
    history["vae_steps"] = step
    history["vae_seconds"] = time.time() - t0
    vae.eval()


def refine_decoder(vae, args, history: dict) -> None:
    """Phase 4: more training for the decoder alone. The encoder is frozen, so the latents the
    transformer was trained on (and their mean/std) do not change; only the pictures get sharper."""
    rng = np.random.default_rng(args.seed + 3)
    pool = [make_clip(TRAIN_SEED_BASE + 200_000 + i).source for i in range(args.vae_clips)]
    for q in vae.parameters():
        q.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.dec_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    step = 0
    c = args.vae_crop
    vae.train()
    while True:
        p = progress(step, args.dec_steps, t0, args.dec_minutes)
        if p >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(p, args.dec_lr, warmup=0.0)
        batch = []
        for _ in range(args.dec_batch):
            clip = pool[rng.integers(len(pool))]
            n = args.dec_frames
            f0 = rng.integers(0, clip.shape[0] - n + 1)
            y0, x0 = rng.integers(0, clip.shape[1] - c + 1), rng.integers(0, clip.shape[2] - c + 1)
            batch.append(to_tensor(np.ascontiguousarray(clip[f0:f0 + n, y0:y0 + c, x0:x0 + c])))
        x = torch.stack(batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history["dec"].append({"step": step, "l1": l1.item(), "mse": mse.item(), "seconds": time.time() - t0})
        if step % 25 == 0:
            log(f"decoder step {step} p={p:.2f} l1={l1.item():.4f} psnr={10 * math.log10(4.0 / max(mse.item(), 1e-10)):.1f}dB")
        step += 1
    vae.eval()
    for q in vae.parameters():
        q.requires_grad_(False)
    history["dec_steps"] = step
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
        src = clip.source
        if i % 2 == 1:  # half the clips mirrored: more motion directions for the same world
            src = np.ascontiguousarray(src[:, :, ::-1])
        video = to_tensor(src)  # (3, F, H, W)
        cond, _keep = method.stock_plan(video[:, 0], video.shape[1])  # (F, 3, H, W)
        pair = torch.stack([video, cond.permute(1, 0, 2, 3)])
        z = vae.encode(pair).latent_dist.mode()
        xs.append(z[0])
        ys.append(z[1])
        imgs.append(pipe.encode_image(Image.fromarray(src[0]), device="cpu")[0])
        texts.append(pipe.encode_prompt(clip.caption, do_classifier_free_guidance=False, max_sequence_length=512)[0][0])
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
def vae_eval(vae, seeds) -> float:
    """Mean reconstruction PSNR (dB, uint8 scale) of full 17-frame clips the VAE never saw."""
    out = []
    for s in seeds:
        clip = make_clip(s)
        x = to_tensor(clip.source)[None]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = float(((rec - x) * 127.5).pow(2).mean())
        out.append(10 * math.log10(255 ** 2 / max(mse, 1e-10)))
    return float(np.mean(out))


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
    step = 0
    while True:
        p = progress(step, args.dit_steps, t0, args.dit_minutes)
        if p >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(p, args.dit_lr)
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
            log(f"DiT step {step} p={p:.2f} loss={float(loss):.4f} (mean of last 25: {recent:.4f})")
        step += 1
    history["dit_steps"] = step
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
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core CPU")
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-minutes", type=float, default=None)
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--vae-crop", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=4e-4)
    ap.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the latent L2 penalty")
    ap.add_argument("--vae-clips", type=int, default=64)
    ap.add_argument("--dit-clips", type=int, default=256)
    ap.add_argument("--dit-steps", type=int, default=4000)
    ap.add_argument("--dit-minutes", type=float, default=None)
    ap.add_argument("--dit-batch", type=int, default=4)
    ap.add_argument("--dit-lr", type=float, default=3e-4)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--dec-steps", type=int, default=600)
    ap.add_argument("--dec-minutes", type=float, default=None)
    ap.add_argument("--dec-lr", type=float, default=2e-4)
    ap.add_argument("--dec-frames", type=int, default=17,
                    help="clip length for the decoder refinement: 17 so the causal decoder learns its later chunks "
                         "(phase 1 sees 5 frames only, and the shipped VAE's encoder was trained that way)")
    ap.add_argument("--dec-batch", type=int, default=2)
    ap.add_argument("--refine-decoder-of", metavar="FOLDER",
                    help="only run phase 4 on an already trained model folder (rewrites its vae/ and training.json)")
    args = ap.parse_args(argv)
    if args.refine_decoder_of:
        return refine_only(args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_all = time.time()
    history: dict = {"args": vars(args), "vae": [], "dit": [], "dec": []}
    pipe = build_pipeline(args.seed)
    log(f"VAE {sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.2f}M params, transformer "
        f"{sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f}M params")

    train_vae(pipe.vae, args, history)
    eval_seeds = [TRAIN_SEED_BASE + 900_000 + i for i in range(4)]
    history["vae_eval_psnr"] = vae_eval(pipe.vae, eval_seeds)
    log(f"VAE done: {history['vae_steps']} steps, {history['vae_seconds']:.0f}s, held-out PSNR {history['vae_eval_psnr']:.2f} dB")

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
    refine_decoder(pipe.vae, args, history)
    history["vae_eval_psnr_refined"] = vae_eval(pipe.vae, eval_seeds)
    log(f"decoder refined: {history['dec_steps']} steps, held-out PSNR {history['vae_eval_psnr_refined']:.2f} dB")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    history["total_seconds"] = time.time() - t_all
    write_summary(out / "training.json", history, {})
    log(f"saved to {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB); "
        f"total {history['total_seconds']:.0f}s")
    return 0


def write_summary(path: Path, history: dict, old: dict) -> None:
    summary = dict(old)
    summary.update({k: v for k, v in history.items() if k not in ("vae", "dit", "dec")})
    # a compact loss record: means over windows of 25 steps
    for key, field in (("vae", "l1"), ("dit", "loss"), ("dec", "l1")):
        rows = history.get(key) or []
        if rows:
            summary[f"{key}_{field}_curve"] = [
                [rows[i]["step"], round(float(np.mean([r[field] for r in rows[i:i + 25]])), 5), round(rows[i]["seconds"])]
                for i in range(0, len(rows), 25)]
    path.write_text(json.dumps(summary, indent=1) + "\n")


def refine_only(args) -> int:
    from diffusers import AutoencoderKLWan

    folder = Path(args.refine_decoder_of)
    old = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else {}
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae")
    history: dict = {"dec": []}
    eval_seeds = [TRAIN_SEED_BASE + 900_000 + i for i in range(4)]
    refine_decoder(vae, args, history)
    history["vae_eval_psnr_refined"] = vae_eval(vae, eval_seeds)
    log(f"decoder refined: {history['dec_steps']} steps, held-out PSNR {history['vae_eval_psnr_refined']:.2f} dB")
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    history["refine_args"] = {k: v for k, v in vars(args).items() if k.startswith("dec") or k in ("seed", "vae_crop", "vae_batch")}
    write_summary(folder / "training.json", history, old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
