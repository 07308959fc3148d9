#!/usr/bin/env python
"""Pre-train the bundled toy Wan2.1-I2V model on the procedural world (loraedit/world.py).

    # new transformers on one GPU; the VAE, text/image encoders, tokenizer and scheduler are those of
    # --init-from (the bundled model), byte for byte, and --weights-only does not copy them; two candidate
    # shapes train side by side; --budget fits the schedule into the minutes lent
    python scripts/pretrain_toy.py --device cuda --init-from loraedit/toymodel --out runs/toy-gpu --weights-only \
        --candidates 6x4x32x512,8x6x32x768 --budget 295 --check-determinism 5 --log-file runs/toy-gpu/log.txt
    # a candidate as a model folder:
    cp -r loraedit/toymodel M && rm -r M/transformer && cp -r runs/toy-gpu/dit-6x4x32x512/transformer M/

    # the decoder alone, refined (the encoder and every latent stay as they were); writes OUT/vae. Use whole
    # 17-frame clips: with --dec-frames 9 the decoding of the last latent frames drifted (-2 dB)
    python scripts/pretrain_toy.py --device cpu --threads 2 --workers 1 --init-from M --decoder-only \
        --out runs/toy_dec17 --dec-steps 400 --dec-batch 1 --dec-frames 17 --dec-crop 64 --dec-first-frames 2 \
        --dec-lr 2e-4 --vae-clips 192

    # everything, the VAE included: run 1 of the bundled model (one NVIDIA H200, 421 s, 2026-11-27; MODEL_CARD.md
    # has these flags with the budgets' results filled in, which reproduce it without the budgets)
    python scripts/pretrain_toy.py --device cuda --init-from none --seed 0 --out M --vae-steps 8000 \
        --vae-batch 8 --vae-crop 128 --vae-warmup 100 --vae-calibrate 60 --vae-budget 180 --vae-clips 512 \
        --vae-first-frames 8 --layers 6 --heads 4 --head-dim 32 --ffn 512 --dit-clips 2048 --object-weight 0 \
        --dit-steps 20000 --dit-batch 64 --dit-lr 5e-4 --ema 0.998 --dec-steps 150 --dec-crop 128 \
        --dec-first-frames 4 --budget 480 --budget-reserve 45 --check-determinism 5 --workers 14

    # the same VAE and transformer trained further (run 2, the bundled model: one NVIDIA H200, 493 s,
    # 2026-11-27; R1 is the folder the command above made, in git at 5933aa1)
    python scripts/pretrain_toy.py --device cuda --init-from none --seed 0 --out M --vae-init R1 \
        --dit-init R1/transformer --vae-steps 8000 --vae-batch 8 --vae-crop 128 --vae-lr 3e-4 --vae-warmup 100 \
        --vae-calibrate 60 --vae-budget 270 --vae-clips 512 --vae-first-frames 8 --dit-clips 2048 \
        --object-weight 0 --dit-steps 20000 --dit-batch 64 --dit-lr 3e-4 --ema 0.998 --dec-steps 150 \
        --dec-crop 128 --dec-first-frames 4 --budget 550 --budget-reserve 45 --check-determinism 5 --workers 14

The bundled model is the output of the last command (commit a3fd077 of this script), which continued
the output of the one before it (commit c98e706); the model card has both with the budgets' results
filled in, and the sha256 of every file. The model before them was made on a 2-core CPU by this script as of commit
8f2eca5 (79 minutes) and a --decoder-only refinement (14 minutes); it is in git history. The defaults
here are the GPU recipe of 2026-11-26 evening for transformers alone: 4096 clips as source and edited
truth, batch 256 at lr 1e-3, the velocity loss weighted on the moving object, EMA 0.996.

Same classes and folder layout as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (see loraedit/tiny.py for the
text/image encoders); only the sizes differ. Four phases:

1. VAE (AutoencoderKLWan, real 4x temporal / 8x spatial factors, 16 latent channels): reconstruction
   (L1 + MSE of the decoded distribution mode, weighted up on the main object, a small L2 on the
   latents) on random 9-frame 64x64 crops (first frame alone + two 4-frame chunks, so the causal
   cache is trained) of world clips, source and edited truth, half of the crops centred on the object.
   Skipped with --init-from FOLDER: that folder's VAE (and latent mean/std) is used unchanged.
   --vae-init FOLDER (with --init-from none) starts this phase from FOLDER's VAE instead of a fresh one.
2. Data: world clips rendered by --workers processes (each clip is a pure function of its seed), encoded
   with the VAE in batches on --device: source and edited truth (--dit-variants; mirrored copies optional),
   stock I2V condition latents (`method.stock_plan`: first frame, then zeros), CLIP embeddings of the
   first frame, UMT5 embeddings of the caption. Without --init-from the per-channel latent mean/std
   are measured here and written into the VAE config, the convention of the real model.
3. Transformer (WanTransformer3DModel, 36-channel I2V input): flow matching with the **stock** I2V
   condition only (first frame kept, everything else generated), captions from the world (10% empty),
   the velocity error weighted up on the moving object's latent cells (--object-weight); weights averaged
   with an EMA (the EMA is what is saved). --candidates trains several shapes side by side (threads). A held-out evaluation follows: velocity
   loss at fixed noise levels and stock-I2V rollouts (20 sampling steps) scored against the world's truth.
4. Decoder refinement (when the VAE was trained here, or alone with --decoder-only): the decoder alone on
   17-frame crops (--dec-frames, --dec-crop) and, with --dec-first-frames, whole single frames, the path
   a video's first frame takes through the causal VAE (encoder frozen, so the transformer's latents and
   the latent mean/std stay valid).

Every number that shapes the result is a flag. Every schedule counts steps, never wall time, and every
random draw comes from a generator seeded from --seed, so the weights are a pure function of the flags,
the torch build and the device kind (and --threads on a CPU). On CUDA the run is made deterministic
(torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, cuDNN deterministic, the math attention
kernel, TF32 fixed on) and --check-determinism trains a few steps twice and compares the bytes.

--budget S is a guard for machines lent by the minute: after --dit-calibrate steps (still inside the
fixed-length warm-up, whose learning rates do not depend on --dit-steps) it times the transformer's
steps and, if --dit-steps would not finish within S seconds of the start, lowers --dit-steps to what
fits. The value used is printed and recorded in training.json; rerunning with that --dit-steps (and no
--budget) gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

# before torch loads OpenMP / CUDA: sleeping worker threads (see loraedit/__init__.py), and the cuBLAS
# workspace setting that deterministic CUDA matrix products require
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraedit import method  # noqa: E402
from loraedit.models import onednn_conv3d  # noqa: E402
from loraedit.world import make_clip  # noqa: E402

TRAIN_SEED_BASE = 1_000_000  # world seeds used for pre-training start here (demo/bench/tests use small seeds)
EVAL_SEEDS = [3, 101, 102, 103, 104, 105, 106, 107, 108]  # the demo's clip and the claims bench's: never trained on

VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                  temperal_downsample=[False, True, True])
# components other than the transformer that --init-from takes over byte for byte
FROZEN_PARTS = ("vae", "text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor")

T_START = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T_START:5.0f}s] {msg}", flush=True)


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 → (3, F, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def transformer_config(args) -> dict:
    from loraedit.tiny import tiny_transformer_config

    return tiny_transformer_config(num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                                   ffn_dim=args.ffn, num_layers=args.layers, freq_dim=64, rope_max_seq_len=64)


def new_transformer(args, device):
    """A freshly initialised transformer, built on the CPU from the seed so the start is the same on any device;
    with --dit-init, that folder's weights."""
    from diffusers import WanTransformer3DModel

    if getattr(args, "dit_init", None):  # continue from trained weights (its shape was taken in parse_args)
        return WanTransformer3DModel.from_pretrained(args.dit_init, torch_dtype=torch.float32).to(device)
    torch.manual_seed(args.seed + 5)
    return WanTransformer3DModel(**transformer_config(args)).to(device)


def build_pipeline(args, device):
    """The pipeline whose transformer is trained: frozen parts from --init-from, or all new (VAE to train)."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline

    from loraedit.tiny import build_tiny_pipeline

    transformer = new_transformer(args, torch.device("cpu"))
    if args.init_from:
        pipe = WanImageToVideoPipeline.from_pretrained(args.init_from, transformer=transformer)
    else:
        pipe = build_tiny_pipeline(seed=args.seed)
        torch.manual_seed(args.seed + 1)
        pipe.vae = AutoencoderKLWan(**VAE_CONFIG)
        if getattr(args, "vae_init", None):  # continue the VAE phase from trained weights (same shape, strict)
            trained = AutoencoderKLWan.from_pretrained(args.vae_init, subfolder="vae", torch_dtype=torch.float32)
            pipe.vae.load_state_dict(trained.state_dict(), strict=True)
        pipe.transformer = transformer
        pipe.register_modules(vae=pipe.vae, transformer=transformer)
    pipe.to(device)
    for part in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
        part.eval()
    onednn_conv3d(pipe.vae)  # the CPU's no-grad encodes and decodes at batch 1 (loraedit/models.py); training unchanged
    return pipe


def progress(step: int, steps: int) -> float:
    return min(step / max(steps, 1), 1.0)


def lr_at(p: float, base: float, warmup: float = 0.03) -> float:
    if p < warmup:
        return base * (0.1 + 0.9 * p / warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (p - warmup) / (1 - warmup))))


def lr_at_step(step: int, steps: int, warmup: int, base: float) -> float:
    """Linear warm-up over a fixed number of steps (independent of `steps`, so --budget can shorten a run
    during it), then a cosine down to 0.1 x base at `steps`."""
    if step < warmup:
        return base * (0.1 + 0.9 * step / warmup)
    p = (step - warmup) / max(steps - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def configure_determinism(device: torch.device) -> None:
    # warn_only: an op without a deterministic kernel would show up as a warning in the log instead of
    # ending a run on a machine lent for minutes; --check-determinism then says whether the bytes repeat
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # TF32 is fixed on (not left to a default that may differ between builds): same kernels, same bits
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def attention_kernel(device: torch.device):
    """The math kernel for scaled-dot-product attention on CUDA: the fused kernels' backward passes add with
    atomics (not bitwise repeatable); at 320 tokens the math kernel costs little."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ScheduleBudget:
    """The --budget guard of a step schedule, for machines lent by the minute. It times the steps from
    `calibrate // 3` to `calibrate` (inside a warm-up of fixed length, so no step already taken depends on
    the schedule's length) and then cuts the schedule to what fits in `seconds_left()`. The cut value is
    printed and recorded (HISTORY[KEY_steps_requested], KEY_seconds_per_step): rerunning with it, without
    the budget, gives the same weights."""

    def __init__(self, calibrate: int, seconds_left, flag: str, history: dict, key: str, device, say=None):
        self.calibrate, self.seconds_left, self.flag = calibrate, seconds_left, flag
        self.history, self.key, self.device, self.say = history, key, device, say or log
        self.t_start = None

    def after_step(self, done: int, steps: int) -> int:
        """Call after each step with the steps done so far; returns the (perhaps shortened) schedule."""
        if done == self.calibrate // 3:
            sync(self.device)
            self.t_start = time.time()
        elif done == self.calibrate and self.t_start is not None:
            sync(self.device)
            per_step = (time.time() - self.t_start) / (done - self.calibrate // 3)
            left = self.seconds_left()
            fits = done + int(left / per_step)
            self.history[f"{self.key}_seconds_per_step"] = per_step
            self.say(f"budget: {per_step * 1000:.1f} ms/step; {left:.0f}s left for {self.key} → {fits} steps fit")
            if fits < steps:
                self.history[f"{self.key}_steps_requested"] = steps
                requested, steps = steps, max(fits, done + 1)
                self.say(f"budget: {self.flag} {requested} → {steps} (rerun with {self.flag} {steps} "
                         "to reproduce these weights)")
        return steps


def state_digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- world clips, rendered on every core


def _render_init() -> None:
    import cv2

    cv2.setNumThreads(1)


def _render(seed: int):
    return make_clip(seed)


def latent_coverage(alpha: np.ndarray, temporal: int = 4, spatial: int = 8) -> np.ndarray:
    """The main object's mean coverage per latent cell: (F, H, W) float → (1 + (F-1)/temporal, H/spatial,
    W/spatial), grouped as the causal VAE groups frames (frame 0 alone, then chunks of `temporal`)."""
    F_, H, W = alpha.shape
    a = alpha.astype(np.float32)
    groups = np.concatenate([a[:1], a[1:].reshape((F_ - 1) // temporal, temporal, H, W).mean(1)])
    return groups.reshape(len(groups), H // spatial, spatial, W // spatial, spatial).mean((2, 4))


@dataclasses.dataclass
class TrainingClip:
    """What the transformer's data set needs of a WorldClip (a third of its bytes to send between processes)."""
    source: np.ndarray
    truth: np.ndarray
    caption: str
    edited_caption: str
    cover: np.ndarray  # latent_coverage of the main object (the source's and the truth's are the same)
    seed: int  # the world seed (the vivid variants draw their gain from it)


def _render_for_training(seed: int) -> TrainingClip:
    c = make_clip(seed)
    return TrainingClip(c.source, c.truth, c.caption, c.edited_caption, latent_coverage(c.alpha), seed)


class ClipRenderer:
    """World clips rendered by a pool of processes. Each clip is a pure function of its seed, so how the
    work is spread changes nothing. The pool is forked at start-up, before torch has started any threads
    or touched the GPU, and renders while the models load; results come back in the order asked for."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_render_init)

    def clips(self, seeds, for_training: bool = False):
        fn = _render_for_training if for_training else _render
        if self.pool is None:
            return (fn(s) for s in seeds)
        return self.pool.imap(fn, list(seeds), chunksize=2)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


# ---------------------------------------------------------------- phase 1: the VAE (skipped with --init-from)


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


def vae_pool(args, renderer: ClipRenderer) -> list:
    pool_seeds = [TRAIN_SEED_BASE + i for i in range(args.vae_clips)]
    log(f"VAE: rendering {len(pool_seeds)} clips")
    return list(renderer.clips(pool_seeds))


def vae_lr(step: int, steps: int, args) -> float:
    """--vae-warmup 0: warm-up over the first 3 % of the steps (the CPU model's schedule, 2026-11-24); N: over N steps,
    fixed, so that --vae-budget can shorten the schedule inside the warm-up without changing a step done."""
    if args.vae_warmup:
        return lr_at_step(step, steps, args.vae_warmup, args.vae_lr)
    return lr_at(progress(step, steps), args.vae_lr)


def train_vae(vae, args, history: dict, eval_clips, pool: list, device, stop_at: int | None = None) -> None:
    """Phase 1. stop_at: end after that many steps of the schedule (the determinism check)."""
    rng = np.random.default_rng(args.seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    steps = args.vae_steps
    budget = None
    if args.vae_budget and stop_at is None:  # --vae-budget: seconds for this phase
        budget = ScheduleBudget(args.vae_calibrate, lambda: args.vae_budget - (time.time() - t0), "--vae-steps",
                                history, "vae", device)
    step = 0
    while step < min(steps, stop_at or steps):
        for g in opt.param_groups:
            g["lr"] = vae_lr(step, steps, args)
        crops = [vae_crop(pool[rng.integers(len(pool))], rng, args.vae_frames, args.vae_crop, 0.5)
                 for _ in range(args.vae_batch)]
        batches = [crops]
        if args.vae_first_frames:  # whole single frames: frame 0's own path, which must hold every channel
            batches.append([first_frame_sample(pool[rng.integers(len(pool))], rng)
                            for _ in range(args.vae_first_frames)])
        l1 = mse = kl = 0.0
        for part in batches:  # clips and single frames differ in size: one pass each, losses averaged
            x = torch.stack([to_tensor(c) for c, _ in part]).to(device)
            alpha = torch.from_numpy(np.stack([a for _, a in part])).to(device)
            # deterministic: the engine encodes with the distribution's mode, and sampling with the
            # untrained (unit) variance drowns the latents in noise and stalls training at ~17 dB
            z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample
            pl1, pmse = reconstruction_loss(rec, x, alpha, args.vae_object_weight)
            l1, mse = l1 + pl1 / len(batches), mse + pmse / len(batches)
            kl = kl + z.pow(2).mean() / len(batches)  # keeps the latents' scale bounded (normalised afterwards)
        loss = l1 + mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        history["vae"].append({"step": step, "l1": l1.item(), "mse": mse.item(), "kl": kl.item(),
                               "seconds": time.time() - t0})
        if step % 25 == 0:
            el = time.time() - t0
            eta = el / max(step, 1) * (steps - step)
            log(f"VAE step {step}/{steps} l1={float(l1):.4f} mse={float(mse):.5f} kl={float(kl):.3f} "
                f"({el / 60:.1f} min, ETA {eta / 60:.1f} min)")
        step += 1
        if budget is not None:
            steps = budget.after_step(step, steps)
        if args.vae_eval_every and step % args.vae_eval_every == 0 and step < steps:
            vae.eval()
            m = vae_eval(vae, eval_clips)
            history.setdefault("vae_eval_curve", []).append({"step": step, **m})
            log(f"VAE eval at step {step}: {m}")
            vae.train()
    history["vae_steps"] = steps
    history["vae_seconds"] = time.time() - t0
    vae.eval()


def first_frame_sample(clip, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One whole frame (any frame of the source or truth can be the first frame of an edit) as a 1-frame
    video, and the object's coverage: the causal VAE encodes and decodes a video's first frame alone, from
    one latent frame, so this trains exactly that path at the size the demo and the bench use."""
    video = clip.truth if rng.uniform() < 0.5 else clip.source
    f = int(rng.integers(0, len(video)))
    frame, a = video[f:f + 1], clip.alpha[f:f + 1]
    if rng.uniform() < 0.5:
        frame, a = frame[:, :, ::-1], a[:, :, ::-1]
    return np.ascontiguousarray(frame), np.ascontiguousarray(a)


def refine_decoder(vae, args, history: dict, renderer: ClipRenderer, device) -> None:
    """Phase 4: more training for the decoder alone. The encoder is frozen, so the latents the
    transformer was trained on (and their mean/std) do not change; only the pictures get sharper.
    --dec-first-frames adds whole single frames to each step: the first frame's own decoding path."""
    rng = np.random.default_rng(args.seed + 3)
    pool = list(renderer.clips([TRAIN_SEED_BASE + 200_000 + i for i in range(args.vae_clips)]))
    for q in vae.parameters():
        q.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.dec_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    vae.train()
    for step in range(args.dec_steps):
        if args.dec_stop_at and step >= args.dec_stop_at:
            break
        # --budget: a decoder that would run past it stops (the weights so far are kept, never lost to a kill);
        # the summary says where, and --dec-stop-at reproduces it
        if args.budget and step and time.time() - T_START > args.budget - args.budget_reserve / 3:
            history["dec_stopped_at"] = step
            log(f"budget: decoder stopping at step {step} of {args.dec_steps} (reproduce with --dec-stop-at {step})")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(progress(step, args.dec_steps), args.dec_lr, warmup=0.0)
        crops = [vae_crop(pool[rng.integers(len(pool))], rng, args.dec_frames, args.dec_crop or args.vae_crop, 0.5)
                 for _ in range(args.dec_batch)]
        batches = [crops]
        if args.dec_first_frames:
            batches.append([first_frame_sample(pool[rng.integers(len(pool))], rng) for _ in range(args.dec_first_frames)])
        l1 = mse = 0.0
        for part in batches:  # clips and single frames differ in size: one forward each, losses averaged
            x = torch.stack([to_tensor(c) for c, _ in part]).to(device)
            alpha = torch.from_numpy(np.stack([a for _, a in part])).to(device)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample
            pl1, pmse = reconstruction_loss(rec, x, alpha, args.vae_object_weight)
            l1, mse = l1 + pl1 / len(batches), mse + pmse / len(batches)
        loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history["dec"].append({"step": step, "l1": l1.item(), "mse": mse.item(), "seconds": time.time() - t0})
        if step % 25 == 0:
            el = time.time() - t0
            log(f"decoder step {step}/{args.dec_steps} l1={l1.item():.4f} mse={mse.item():.5f} "
                f"({el / 60:.1f} min, ETA {el / max(step, 1) * (args.dec_steps - step) / 60:.1f} min)")
    vae.eval()
    for q in vae.parameters():
        q.requires_grad_(False)
    history["dec_steps"] = args.dec_steps
    history["dec_steps_run"] = len(history["dec"])
    history["dec_seconds"] = time.time() - t0


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


# ---------------------------------------------------------------- phase 2: the data set, encoded on --device


VARIANTS = ("source", "source mirrored", "truth", "truth mirrored", "source vivid", "truth vivid")


def vivid(frames: np.ndarray, seed: int) -> np.ndarray:
    """The clip with every pixel's saturation raised by a gain in [1.6, 2.4] drawn from the clip's seed
    (each pixel pushed away from its own grey). The premise: the world's backgrounds are muted (saturation
    0.2-0.6) and only the main object (5% of the latent cells) is vivid (0.65-0.95), and on a static clip the
    bundled model keeps a muted object's colour (error 24-33 on frames 1-5) and loses a vivid one (60-109).
    Measured (docs/toy.md, "Where the colour goes"): a fine-tune with these variants did not carry the colour
    better; the cause is the VAE's code (frame 0's latent holds little green). (F, H, W, 3) uint8 → the same."""
    gain = 1.6 + 0.8 * float(np.random.default_rng([int(seed), 1729]).uniform())
    f = frames.astype(np.float32)
    grey = f.mean(-1, keepdims=True)
    return np.clip(grey + gain * (f - grey) + 0.5, 0, 255).astype(np.uint8)


def clip_variants(clip, names):
    """Videos made from one clip, by name (VARIANTS: the edited truth gives more colours — the same scene with
    the object recoloured, what teaches a model to carry frame 0's colour — mirroring more directions of
    motion, vivid more saturated colours over the whole frame) — (frames, caption) each."""
    out = []
    for name in names:
        frames = clip.truth if name.startswith("truth") else clip.source
        caption = clip.edited_caption if name.startswith("truth") else clip.caption
        if name.endswith("mirrored"):
            frames = frames[:, :, ::-1]
        if name.endswith("vivid"):
            frames = vivid(frames, clip.seed)
        out.append((np.ascontiguousarray(frames), caption))
    return out


def variant_covers(clip, names) -> list[np.ndarray]:
    """The main object's latent_coverage for each of clip_variants(clip, names)."""
    cover = clip.cover if hasattr(clip, "cover") else latent_coverage(clip.alpha)
    return [np.ascontiguousarray(cover[:, :, ::-1] if n.endswith("mirrored") else cover) for n in names]


def variant_names(spec) -> tuple[str, ...]:
    """--dit-variants: a count (the first N of VARIANTS) or comma-separated names."""
    if str(spec).isdigit() and 1 <= int(spec) <= len(VARIANTS):
        return VARIANTS[:int(spec)]
    names = tuple(n.strip() for n in str(spec).split(","))
    if not names or any(n not in VARIANTS for n in names):
        raise ValueError(spec)
    return names


@torch.no_grad()
def encode_videos(pipe, videos: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F, H, W, 3) uint8 videos → raw source latents, raw stock-condition latents (B, 16, T, h, w) and
    CLIP embeddings of the first frames, all computed on `device`."""
    from PIL import Image

    # uint8 to the device, converted there: the host would otherwise spend longer than the encoder
    video = torch.from_numpy(np.stack(videos)).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    # (B, 3, F, H, W) in [-1, 1]
    cond = torch.zeros_like(video)
    cond[:, :, 0] = video[:, :, 0]  # method.stock_plan for the batch: first frame, then zeros
    z = pipe.vae.encode(torch.cat([video, cond])).latent_dist.mode()
    image = pipe.encode_image([Image.fromarray(v[0]) for v in videos], device=device)
    return z[:len(videos)], z[len(videos):], image


@torch.no_grad()
def encode_dataset(pipe, clips, variants: int, batch: int, device, log_every: int = 0, names=None) -> dict:
    """Encode clips (an iterable of WorldClip; `variants` (see variant_names), or those `names`, of each)
    in batches of `batch` videos. Raw latents; captions as indices into `captions` (each distinct caption
    is encoded once)."""
    names = names or variant_names(variants)
    xs, ys, imgs, caption_of, covers = [], [], [], [], []
    pending: list[tuple[np.ndarray, str]] = []
    t0 = time.time()
    n_clips = 0

    def flush():
        x, y, img = encode_videos(pipe, [v for v, _ in pending], device)
        xs.append(x), ys.append(y), imgs.append(img)
        caption_of.extend(c for _, c in pending)
        pending.clear()

    for clip in clips:
        pending.extend(clip_variants(clip, names))
        covers.extend(variant_covers(clip, names))
        n_clips += 1
        if len(pending) >= batch:
            flush()
        if log_every and n_clips % log_every == 0:
            log(f"encoded {n_clips} clips ({len(caption_of) + len(pending)} videos, {time.time() - t0:.0f}s)")
    if pending:
        flush()
    captions = sorted(set(caption_of))
    index = {c: i for i, c in enumerate(captions)}
    return {"x0": torch.cat(xs), "y": torch.cat(ys), "image": torch.cat(imgs),
            "cover": torch.from_numpy(np.stack(covers))[:, None].to(device),  # (N, 1, T, h, w)
            "text_idx": torch.tensor([index[c] for c in caption_of], device=device), "captions": captions}


@torch.no_grad()
def encode_captions(pipe, captions: list[str], device, batch: int = 64) -> torch.Tensor:
    """UMT5 embeddings (N, 512, D) of distinct captions (Wan pads every prompt to 512 tokens)."""
    out = [pipe.encode_prompt(captions[i:i + batch], do_classifier_free_guidance=False, max_sequence_length=512,
                              device=device)[0] for i in range(0, len(captions), batch)]
    return torch.cat(out)


def finish_dataset(pipe, data: dict, mean: torch.Tensor, std: torch.Tensor, device) -> dict:
    """Normalise the latents into model space and encode the captions (and the empty one)."""
    data["x0"] = method.normalize_latents(data["x0"], mean, std)
    data["y"] = method.normalize_latents(data["y"], mean, std)
    data["text"] = encode_captions(pipe, data["captions"], device)
    data["empty_text"] = encode_captions(pipe, [""], device)[0]
    return data


# ---------------------------------------------------------------- phase 3: the transformer


def stock_keep(data: dict) -> torch.Tensor:
    T, h, w = data["x0"].shape[2:]
    keep = torch.zeros(1 + 4 * (T - 1), h, w)
    keep[0] = 1.0  # the stock I2V mask: frame 0 kept, everything else generated
    return keep


def object_weighted_loss(transformer, x0, condition, text, image, sigma, noise, cover, object_weight: float):
    """Velocity MSE with the main object's latent cells weighted by 1 + object_weight * coverage (normalised
    to a mean weight of 1). The object is ~5% of the latent cells but, measured on held-out clips with the
    bundled model, its velocity error is 2-9x the background's (most at high noise, where colour and
    layout are decided), and it is what an edit changes. x0, noise (B, C, T, h, w); cover (B, 1, T, h, w)."""
    x_t, v = method.noisy_latents(x0, noise, sigma)
    pred = method.predict_velocity(transformer, x_t, condition, sigma, text, image)
    err = (pred.float() - v.float()).pow(2)
    if not object_weight:
        return err.mean()
    w = 1.0 + object_weight * cover.float()
    return (err * w).mean() / w.mean()


def stock_i2v_batch_loss(data: dict, args):
    """The loss of one batch on the stock I2V condition (frame 0 kept), weighted on the object (--object-weight):
    (transformer, idx (B,), text (B, L, D), sigma (B,), noise (B, C, T, h, w)) → scalar."""
    keep = stock_keep(data)

    def loss(tr, idx, text, sigma, noise):
        cond = method.condition_tensor(data["y"][idx], keep)
        return object_weighted_loss(tr, data["x0"][idx], cond, text, data["image"][idx], sigma, noise,
                                    data["cover"][idx], args.object_weight)
    return loss


def train_transformer(tr, data: dict, args, device, history: dict | None = None, stop_at: int | None = None,
                      tag: str = "", batch_loss=None, reserve=None):
    """Flow matching; returns (the EMA copy, steps planned, steps run). batch_loss (default: stock I2V,
    `stock_i2v_batch_loss`) is what differs between model families; the batches, noise levels, noise, caption
    dropout, schedule, EMA and budget are this loop's, drawn in the same order for every family. reserve()
    is the seconds --budget keeps back for later phases (default: the decoder refinement's).
    Touches nothing global (own generators, own history), so candidates can train side by side in threads."""
    say = (lambda m: log(f"[{tag}] {m}")) if tag else log
    batch_loss = batch_loss or stock_i2v_batch_loss(data, args)
    reserve = reserve or (lambda: decoder_reserve(args, history))
    tr.train()
    ema = copy.deepcopy(tr).eval()
    for q in ema.parameters():
        q.requires_grad_(False)
    params = [p for p in tr.parameters()]
    ema_params = [p for p in ema.parameters()]
    opt = torch.optim.AdamW(params, lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 7)  # batches, caption dropout, noise
    sigma_gen = torch.Generator().manual_seed(args.seed + 8)  # noise levels (method.sample_sigma draws on the CPU)
    n = data["x0"].shape[0]
    B = args.dit_batch
    half = B // 2
    steps = args.dit_steps
    stop = min(steps, stop_at if stop_at is not None else (args.dit_stop_at or steps))
    losses: list[torch.Tensor] = []
    t0 = time.time()
    budget = None
    if args.budget and history is not None:  # --budget: seconds from the script's start, less the reserve
        budget = ScheduleBudget(args.dit_calibrate, lambda: args.budget - args.budget_reserve
                                - reserve() - (time.time() - T_START),
                                "--dit-steps", history, "dit", device, say)
    step = 0
    with attention_kernel(device):  # (entered around all the threads too: the kernel choice is process-wide)
        while step < min(steps, stop):
            for g in opt.param_groups:
                g["lr"] = lr_at_step(step, steps, args.dit_warmup, args.dit_lr)
            idx = torch.randint(0, n, (B,), generator=gen, device=device)
            drop = torch.rand(B, generator=gen, device=device) < 0.1
            text = torch.where(drop[:, None, None], data["empty_text"][None], data["text"][data["text_idx"][idx]])
            sigma = torch.cat([method.sample_sigma(half, "uniform", sigma_gen),
                               method.sample_sigma(B - half, "shifted", sigma_gen, shift=3.0)]).to(device)
            noise = torch.randn((B, *data["x0"].shape[1:]), generator=gen, device=device)
            loss = batch_loss(tr, idx, text, sigma, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - d)
            losses.append(loss.detach())
            step += 1
            if history is None:
                continue
            if budget is not None:
                steps = budget.after_step(step, steps)
            if step % args.log_every == 0 or step == min(steps, stop):
                vals = torch.stack(losses).float().cpu().tolist()
                history["dit"].extend({"step": step - len(vals) + i, "loss": v} for i, v in enumerate(vals))
                losses.clear()
                el = time.time() - t0
                recent = float(np.mean([r["loss"] for r in history["dit"][-args.log_every:]]))
                eta = el / step * (min(steps, stop) - step)
                say(f"DiT step {step}/{steps} loss {recent:.4f} (mean of last {args.log_every}) "
                    f"lr {lr_at_step(step, steps, args.dit_warmup, args.dit_lr):.2e} ({el:.0f}s, ETA {eta:.0f}s)")
                if (args.budget and args.dit_calibrate < step < min(steps, stop)
                        and time.time() - T_START > args.budget - args.budget_reserve / 2 - reserve()):
                    history["dit_stopped_at"] = step
                    say(f"budget: stopping at step {step} of {steps} (reproduce with --dit-steps {steps} "
                        f"--dit-stop-at {step})")
                    break
    sync(device)
    if history is not None:
        history["dit_steps"] = steps
        history["dit_steps_run"] = step
        history["dit_seconds"] = time.time() - t0
    return ema, steps, step


def decoder_reserve(args, history: dict) -> float:
    """Seconds the decoder refinement after the transformer will take, kept out of the transformer's --budget:
    estimated from the VAE's measured step time (a decoder step decodes --dec-batch clips of --dec-frames,
    a VAE step encodes and decodes --vae-batch of --vae-frames; the causal chunks run one after another)."""
    per_vae_step = history.get("vae_seconds_per_step")
    if args.init_from or not args.dec_steps or not per_vae_step:
        return 0.0
    return args.dec_steps * per_vae_step * max(1.0, args.dec_frames / args.vae_frames)


def candidate_args(args) -> list[tuple[str, argparse.Namespace]]:
    """(name, args with that transformer's shape) per --candidates entry LAYERSxHEADSxHEAD_DIMxFFN; without
    --candidates the one transformer of --layers/--heads/--head-dim/--ffn, named ''."""
    if not args.candidates:
        return [("", args)]
    out = []
    for spec in args.candidates.split(","):
        layers, heads, head_dim, ffn = (int(v) for v in spec.lower().split("x"))
        out.append((f"dit-{layers}x{heads}x{head_dim}x{ffn}",
                    argparse.Namespace(**{**vars(args), "layers": layers, "heads": heads, "head_dim": head_dim,
                                          "ffn": ffn})))
    return out


def train_side_by_side(models: dict, data: dict, device, stop_at: int | None = None, histories: dict | None = None):
    """Train {name: (transformer, args)} on the same data, each in a thread of its own: one step of these
    small models is bound by the CPU's per-operation overhead, not by the GPU, and torch releases Python's
    lock inside each operation and for the whole backward pass, so two models share the GPU better than
    they would one after the other. Each has its own generators (the same seeds: the same batches and
    noise) and deterministic kernels, so a model's bytes do not depend on what trains beside it.
    Returns {name: (ema, steps planned, steps run)}; with several models a failed one is logged and None."""
    def one(name):
        tr, a = models[name]
        return train_transformer(tr, data, a, device, None if histories is None else histories[name], stop_at,
                                 tag=name)

    if len(models) == 1:
        return {name: one(name) for name in models}
    import concurrent.futures

    results = {}
    # the attention kernel choice is process-wide: set once here, around every thread
    with attention_kernel(device), concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        futures = {name: pool.submit(one, name) for name in models}
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except Exception as exc:  # noqa: BLE001 - the other candidates' weights are still worth keeping
                log(f"[{name}] training failed: {type(exc).__name__}: {exc}")
                results[name] = None
    if all(r is None for r in results.values()):
        raise RuntimeError("every candidate failed to train")
    return results


# ---------------------------------------------------------------- held-out evaluation


@torch.no_grad()
def velocity_eval(transformer, data: dict, seed: int, device) -> dict:
    """Velocity loss at fixed σ with fixed noise on held-out clips: a comparable number across runs."""
    gen = torch.Generator().manual_seed(seed)
    keep = stock_keep(data)
    cond = method.condition_tensor(data["y"], keep)
    text = data["text"][data["text_idx"]]
    out = {}
    obj = data["cover"] > 0.5  # (N, 1, T, h, w): latent cells mostly inside the main object
    with attention_kernel(device):
        for s in (0.25, 0.5, 0.75, 0.9):
            noise = torch.randn(data["x0"].shape, generator=gen).to(device)
            sigma = torch.full((data["x0"].shape[0],), s, device=device)
            x_t, v = method.noisy_latents(data["x0"], noise, sigma)
            err = (method.predict_velocity(transformer, x_t, cond, sigma, text, data["image"]).float() - v).pow(2)
            out[f"sigma_{s}"] = round(float(err.mean()), 4)
            if obj.any():  # the error inside the object (what an edit changes; the mean hides it: ~5% of cells)
                out[f"object_sigma_{s}"] = round(float(err.mean(1, keepdim=True)[obj].mean()), 4)
    return out


@torch.no_grad()
def rollout_eval(pipe, transformer, data: dict, clips, args, device) -> dict:
    """Stock I2V with no LoRA, as `loraedit edit --steps 0 --mode naive` renders it: from each held-out
    clip's source first frame (scored against the source) and from its edited first frame (scored
    against the true edit); 20 UniPC steps, shift 5, guidance 1. Means of world.clip_metrics."""
    from diffusers import UniPCMultistepScheduler

    from loraedit.world import clip_metrics

    scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=args.eval_shift)
    keep = stock_keep(data)
    cond = method.condition_tensor(data["y"], keep)
    text = data["text"][data["text_idx"]]
    noise = torch.randn(data["x0"].shape, generator=torch.Generator().manual_seed(args.seed + 13)).to(device)
    with attention_kernel(device):
        lat = method.sample_latents(transformer, scheduler, noise, cond, text, None, data["image"],
                                    steps=args.eval_render_steps, guidance=1.0)
    vae = pipe.vae
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    rows = {"from source frame 0": [], "from edited frame 0": []}
    for i, clip in enumerate(clips):
        for j, (name, target) in enumerate((("from source frame 0", dataclasses.replace(clip, truth=clip.source)),
                                            ("from edited frame 0", clip))):
            z = method.denormalize_latents(lat[2 * i + j:2 * i + j + 1], mean, std)
            video = vae.decode(z).sample[0].clamp(-1, 1)
            frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().cpu().numpy()
            rows[name].append(clip_metrics(frames, target))
    keys = ("psnr_in", "colour_err_in", "psnr_out", "first_psnr", "temporal_err")
    return {name: {k: round(float(np.nanmean([r[k] for r in rs])), 2) for k in keys} for name, rs in rows.items()}


# ---------------------------------------------------------------- saving and packing


def save_model(pipe, ema, args, out: Path, subdir: str = "") -> None:
    """The model folder: the trained transformer (safetensors, sharded at --max-shard-size; in out/SUBDIR/ for
    a candidate) and, with --init-from and without --weights-only, that folder's other parts copied byte for
    byte (with --weights-only, assemble a model as: cp -r INIT M; rm -r M/transformer; cp -r OUT/[SUBDIR/]transformer M/)."""
    out.mkdir(parents=True, exist_ok=True)
    init = Path(args.init_from) if args.init_from else None
    if init is None:
        pipe.transformer = ema
        pipe.register_modules(transformer=ema)
        pipe.save_pretrained(out, safe_serialization=True)
    elif args.weights_only:
        pass
    elif init.resolve() != out.resolve():
        for part in FROZEN_PARTS:
            if (init / part).is_dir():
                shutil.rmtree(out / part, ignore_errors=True)
                shutil.copytree(init / part, out / part)
        shutil.copy2(init / "model_index.json", out / "model_index.json")
    folder = out / subdir / "transformer"
    shutil.rmtree(folder, ignore_errors=True)  # no stale shard may outlive a new save
    ema.to("cpu").save_pretrained(folder, safe_serialization=True, max_shard_size=args.max_shard_size)


def weight_hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.safetensors"))}


def pack(folder: Path, dest: Path, part_bytes: int) -> list[Path]:
    """The model folder as one tar (sorted, fixed times and owners) split into parts of ≤ part_bytes,
    for return paths that limit the size and number of files: cat PARTS > x.tar; tar xf x.tar."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in [folder, *sorted(folder.rglob("*"))]:
            info = tar.gettarinfo(str(p), arcname=(Path(folder.name) / p.relative_to(folder)).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o644 if p.is_file() else 0o755
            if p.is_file():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    data = buf.getvalue()
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), part_bytes):
        parts.append(dest / f"{folder.name}.tar.part{i // part_bytes:02d}")
        parts[-1].write_bytes(data[i:i + part_bytes])
    (dest / f"{folder.name}.tar.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {folder.name}.tar\n")
    return parts


# ---------------------------------------------------------------- the run


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda (the shipped run) or cpu")
    ap.add_argument("--init-from", dest="init_from", default=str(ROOT / "loraedit" / "toymodel"),
                    help="take the VAE, text/image encoders, tokenizer and scheduler from this model folder unchanged "
                         "and train only a new transformer (default: the bundled model); 'none': train the VAE too")
    ap.add_argument("--out", default="runs/toymodel")
    ap.add_argument("--pack", default=None, metavar="DIR",
                    help="also write the model folder as a tar split into parts of --pack-part-mb in DIR")
    ap.add_argument("--pack-part-mb", type=float, default=15.0)
    ap.add_argument("--max-shard-size", default="15MB", help="safetensors shard size of the transformer")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads; on a CPU part of what the result depends on (the first model used 2)")
    ap.add_argument("--workers", type=int, default=max(1, min(10, (os.cpu_count() or 2) - 1)),
                    help="processes that render world clips (does not change the result)")
    ap.add_argument("--budget", type=float, default=0.0, metavar="SECONDS",
                    help="lower --dit-steps, after timing the first steps, so the run ends within this many seconds")
    ap.add_argument("--budget-reserve", type=float, default=25.0,
                    help="seconds kept for the evaluation and saving after training")
    ap.add_argument("--weights-only", action="store_true",
                    help="write only the new transformer(s) and training.json, not the --init-from parts (byte-identical copies)")
    ap.add_argument("--log-file", default=None, help="also write everything printed to this file")
    ap.add_argument("--check-determinism", type=int, default=0, metavar="STEPS",
                    help="before training, train this many steps twice from scratch and compare the weights' bytes")
    # transformer
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--dit-init", dest="dit_init", default="", metavar="FOLDER",
                    help="start the transformer from these weights (a transformer folder, e.g. "
                         "loraedit/toymodel/transformer) instead of a fresh initialisation; its config sets the shape")
    ap.add_argument("--candidates", default="", metavar="LxHxDxF[,...]",
                    help="train these transformers (layers x heads x head dim x FFN) side by side on the same data, "
                         "each saved in OUT/dit-LxHxDxF/transformer; overrides --layers/--heads/--head-dim/--ffn")
    ap.add_argument("--dit-clips", type=int, default=4096, help="world clips to train on")
    ap.add_argument("--dit-variants", default="source,truth",
                    help=f"videos per clip: comma-separated names of {', '.join(VARIANTS)}, or a count (the first N)")
    ap.add_argument("--object-weight", type=float, default=4.0,
                    help="extra velocity-loss weight on the main object's latent cells (1 + w * coverage); 0: plain MSE")
    ap.add_argument("--encode-batch", type=int, default=64, help="videos per VAE encoding batch")
    ap.add_argument("--dit-steps", type=int, default=6000)
    ap.add_argument("--dit-stop-at", type=int, default=0, help="stop after this many steps of the --dit-steps schedule")
    ap.add_argument("--dit-batch", type=int, default=256)
    ap.add_argument("--dit-lr", type=float, default=1e-3)
    ap.add_argument("--dit-warmup", type=int, default=150, help="warm-up steps (fixed, so --budget can shorten a run)")
    ap.add_argument("--dit-calibrate", type=int, default=100, help="--budget times the steps up to this one")
    ap.add_argument("--ema", type=float, default=0.996)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-clips", type=int, default=len(EVAL_SEEDS), help=f"held-out clips (world seeds {EVAL_SEEDS})")
    ap.add_argument("--eval-render-steps", type=int, default=20)
    ap.add_argument("--eval-shift", type=float, default=5.0)
    ap.add_argument("--no-eval-baseline", dest="eval_baseline", action="store_false",
                    help="skip evaluating the --init-from folder's own transformer for comparison")
    # VAE (only without --init-from)
    ap.add_argument("--vae-init", dest="vae_init", default="", metavar="FOLDER",
                    help="start the VAE phase from this model folder's VAE (e.g. loraedit/toymodel) instead of a fresh "
                         "initialisation; its warm-up and cosine run again from --vae-lr (needs --init-from none)")
    ap.add_argument("--vae-steps", type=int, default=2200)
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--vae-frames", type=int, default=9)
    ap.add_argument("--vae-crop", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the latent L2 penalty")
    ap.add_argument("--vae-warmup", type=int, default=0,
                    help="warm-up steps of the VAE, fixed (0: the first 3 %% of --vae-steps, the CPU model's of 2026-11-24)")
    ap.add_argument("--vae-budget", type=float, default=0.0, metavar="SECONDS",
                    help="lower --vae-steps, after timing steps inside the fixed --vae-warmup, so the VAE phase takes "
                         "at most this long (its step time also sizes the decoder phase's share of --budget)")
    ap.add_argument("--vae-calibrate", type=int, default=30, help="--vae-budget times the VAE's steps up to this one")
    ap.add_argument("--vae-first-frames", type=int, default=0,
                    help="whole single frames per VAE step (as Wan's VAE trains on images too): the VAE of 2026-11-24, "
                         "trained without them, kept little green in its frame-0 latent (bench/toy_colour_probe.py)")
    ap.add_argument("--vae-object-weight", type=float, default=4.0,
                    help="extra loss weight on the main object's pixels (1 + w * coverage)")
    ap.add_argument("--vae-clips", type=int, default=96)
    ap.add_argument("--vae-eval-every", type=int, default=300)
    ap.add_argument("--vae-eval-clips", type=int, default=4,
                    help="clips of the VAE's own held-out check during and after its phase (an evaluation only: the "
                         "weights do not depend on it; 17-frame clips cost ~6 s each on a CPU)")
    ap.add_argument("--dec-steps", type=int, default=300)
    ap.add_argument("--dec-lr", type=float, default=2e-4)
    ap.add_argument("--dec-frames", type=int, default=17, help="full clips, so every causal chunk is refined")
    ap.add_argument("--dec-batch", type=int, default=2)
    ap.add_argument("--dec-crop", type=int, default=0, help="crop size of the decoder's clips (0: --vae-crop)")
    ap.add_argument("--dec-first-frames", type=int, default=0,
                    help="whole single frames per decoder step: the first frame's own decoding path")
    ap.add_argument("--dec-stop-at", type=int, default=0, help="stop the decoder after this many steps of its schedule")
    ap.add_argument("--decoder-only", action="store_true",
                    help="with --init-from: refine that folder's VAE decoder alone (phase 4: --dec-* flags) and write "
                         "OUT/vae and training.json; the encoder, so every latent and the transformer, stays valid")
    args = ap.parse_args(argv)
    if args.init_from and args.init_from.lower() == "none":
        args.init_from = None
    if args.init_from and not (Path(args.init_from) / "model_index.json").is_file():
        ap.error(f"--init-from {args.init_from}: not a model folder (no model_index.json); pass one, or 'none'")
    if args.vae_budget and not 0 < args.vae_calibrate < args.vae_warmup:
        ap.error(f"--vae-budget needs 0 < --vae-calibrate ({args.vae_calibrate}) < --vae-warmup ({args.vae_warmup}): "
                 "the budget may only shorten the VAE's schedule inside a warm-up of fixed length")
    if args.budget and args.dit_calibrate >= args.dit_warmup:
        ap.error("--dit-calibrate must be below --dit-warmup (the budget may only shorten a run inside the warm-up)")
    try:
        variant_names(args.dit_variants)
    except ValueError:
        ap.error(f"--dit-variants {args.dit_variants}: give a count (1-4) or names from {', '.join(VARIANTS)}")
    if args.candidates:
        try:
            candidate_args(args)
        except ValueError:
            ap.error(f"--candidates {args.candidates}: give LAYERSxHEADSxHEAD_DIMxFFN[,...], e.g. 6x4x32x512,8x6x32x768")
        if not args.init_from:
            ap.error("--candidates trains transformers only: it needs --init-from (a folder with the VAE)")
    if args.dit_init:
        cfg_file = Path(args.dit_init) / "config.json"
        if not cfg_file.is_file():
            ap.error(f"--dit-init {args.dit_init}: not a transformer folder (no config.json); pass e.g. "
                     "loraedit/toymodel/transformer")
        if args.candidates:
            ap.error("--dit-init continues one transformer: leave out --candidates")
        cfg = json.loads(cfg_file.read_text())
        args.layers, args.heads = cfg["num_layers"], cfg["num_attention_heads"]
        args.head_dim, args.ffn = cfg["attention_head_dim"], cfg["ffn_dim"]
    if args.vae_eval_clips < 1:
        ap.error(f"--vae-eval-clips {args.vae_eval_clips}: give at least 1 (the VAE's held-out check)")
    if args.vae_init:
        if args.init_from:
            ap.error(f"--vae-init trains the VAE further, but --init-from {args.init_from} freezes it: add --init-from none")
        if not (Path(args.vae_init) / "vae" / "config.json").is_file():
            ap.error(f"--vae-init {args.vae_init}: not a model folder with a vae/ (no vae/config.json); pass e.g. "
                     "loraedit/toymodel")
    if args.decoder_only and not args.init_from:
        ap.error("--decoder-only refines the decoder of --init-from's VAE: pass --init-from (e.g. loraedit/toymodel)")
    if args.dit_batch < 2:
        ap.error("--dit-batch must be at least 2 (half the noise levels uniform, half shifted)")
    return args


class Tee:
    """A text stream written to two (--log-file: the log beside the weights, warnings and tracebacks included)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for st in self.streams:
            st.write(text)
        return len(text)

    def flush(self):
        for st in self.streams:
            st.flush()

    def isatty(self):
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.log_file:
        Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
        sink = open(args.log_file, "a", buffering=1, encoding="utf-8")
        sys.stdout, sys.stderr = Tee(sys.stdout, sink), Tee(sys.stderr, sink)
    device = torch.device(args.device)
    renderer = ClipRenderer(args.workers)  # forked first: before torch starts threads or touches the GPU
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            print("pretrain_toy: error: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
            return 2
        return run(args, device, renderer)
    finally:
        renderer.close()


def run(args, device, renderer: ClipRenderer) -> int:
    import diffusers

    torch.set_num_threads(args.threads)
    configure_determinism(device)
    np.random.seed(args.seed)
    history: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "pack")},
                     "argv": sys.argv[1:], "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "vae": [], "dit": [], "dec": []}
    if args.dit_init:  # the starting weights are an input of the result: record which bytes they were
        history["dit_init_sha256"] = weight_hashes(Path(args.dit_init))
    if args.vae_init:
        history["vae_init_sha256"] = weight_hashes(Path(args.vae_init) / "vae")
    log(f"device {history['device']}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    eval_iter = renderer.clips(EVAL_SEEDS[:args.eval_clips])
    if args.decoder_only:
        return run_decoder_only(args, device, renderer, history, eval_iter)
    train_seeds = [TRAIN_SEED_BASE + 100_000 + i for i in range(args.dit_clips)]
    train_iter = renderer.clips(train_seeds, True) if args.init_from else None  # renders while the models load
    cands = candidate_args(args)
    pipe = build_pipeline(cands[0][1], device)
    log(f"VAE {sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.2f}M params"
        f"{' (from ' + args.init_from + ', frozen)' if args.init_from else ''}, transformer "
        f"{sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f}M params"
        + "".join(f"; candidate {name}: {sum(p.numel() for p in new_transformer(c, torch.device('cpu')).parameters()) / 1e6:.2f}M"
                  for name, c in cands[1:]))
    eval_clips = list(eval_iter)

    if not args.init_from:
        vae_pool_clips = list(renderer.clips(range(TRAIN_SEED_BASE + 900_000, TRAIN_SEED_BASE + 900_000 + args.vae_eval_clips)))
        pool = vae_pool(args, renderer)
        if args.check_determinism:
            with optional("VAE determinism check"):
                start = copy.deepcopy(pipe.vae.state_dict())
                digests = []
                for _ in range(2):  # the real schedule's first steps, twice from the same initial weights
                    pipe.vae.load_state_dict(start)
                    train_vae(pipe.vae, args, {"vae": []}, vae_pool_clips, pool, device, stop_at=args.check_determinism)
                    digests.append(state_digest(pipe.vae))
                pipe.vae.load_state_dict(start)
                history["vae_determinism_check"] = {"steps": args.check_determinism, "identical": digests[0] == digests[1],
                                                    "sha256": digests}
                log(f"VAE determinism check: {args.check_determinism} steps trained twice → "
                    f"{'identical bytes' if digests[0] == digests[1] else 'DIFFERENT bytes'}")
        train_vae(pipe.vae, args, history, vae_pool_clips, pool, device)
        history["vae_eval"] = vae_eval(pipe.vae, vae_pool_clips)
        log(f"VAE done: {history['vae_steps']} steps, {history['vae_seconds']:.0f}s, held-out {history['vae_eval']}")
        train_iter = renderer.clips(train_seeds, True)

    t0 = time.time()
    data = encode_dataset(pipe, train_iter, args.dit_variants, args.encode_batch, device, log_every=256)
    if args.init_from:  # the VAE's own convention, measured when it was trained
        mean, std = torch.tensor(pipe.vae.config.latents_mean), torch.tensor(pipe.vae.config.latents_std)
    else:
        mean, std = data["x0"].mean(dim=(0, 2, 3, 4)).cpu(), data["x0"].std(dim=(0, 2, 3, 4)).cpu()
        pipe.vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                                    latents_std=[round(float(v), 5) for v in std])
        mean, std = torch.tensor(pipe.vae.config.latents_mean), torch.tensor(pipe.vae.config.latents_std)
    data = finish_dataset(pipe, data, mean, std, device)
    eval_data = finish_dataset(pipe, encode_dataset(pipe, eval_clips, 0, args.encode_batch, device, names=("source", "truth")),
                               mean, std, device)
    history["encode_seconds"] = time.time() - t0
    history["dit_samples"] = int(data["x0"].shape[0])
    log(f"data: {args.dit_clips} clips → {data['x0'].shape[0]} videos, {len(data['captions'])} distinct captions, "
        f"latents {tuple(data['x0'].shape[1:])}, {history['encode_seconds']:.0f}s")

    init_tr = Path(args.init_from or "") / "transformer"
    if args.init_from and args.eval_baseline and (init_tr / "config.json").is_file():
        with optional("baseline evaluation"):
            from diffusers import WanTransformer3DModel

            old = WanTransformer3DModel.from_pretrained(init_tr).to(device).eval()
            history["baseline_eval"] = {"velocity": velocity_eval(old, eval_data, args.seed + 11, device),
                                        "rollout": rollout_eval(pipe, old, eval_data, eval_clips, args, device),
                                        "params": sum(p.numel() for p in old.parameters())}
            log(f"baseline (the --init-from transformer) held-out: {history['baseline_eval']}")
            del old

    # one history per candidate (without --candidates: the top level itself, the layout of earlier runs)
    hists = {"": history} if not args.candidates else {}
    for name, c in cands:
        if args.candidates:
            hists[name] = history.setdefault("candidates", {}).setdefault(name, {"dit": []})
        hists[name]["architecture"] = {k: getattr(c, k) for k in ("layers", "heads", "head_dim", "ffn")}
    models = {name: ((pipe.transformer if k == 0 else new_transformer(c, device)), c) for k, (name, c) in enumerate(cands)}
    for name, (tr, _) in models.items():
        hists[name]["params"] = sum(p.numel() for p in tr.parameters())
        hists[name]["dit_eval_before"] = velocity_eval(tr, eval_data, args.seed + 11, device)
    if args.check_determinism:
        with optional("determinism check"):
            digests = []
            for _ in range(2):  # side by side as in the real run, so the threads are part of what is checked
                fresh = {name: (new_transformer(c, device), c) for name, c in cands}
                train_side_by_side(fresh, data, device, stop_at=args.check_determinism)
                digests.append({name: state_digest(tr) for name, (tr, _) in fresh.items()})
                del fresh
            same = digests[0] == digests[1]
            history["determinism_check"] = {"steps": args.check_determinism, "identical": same,
                                            "sha256": [d[""] for d in digests] if not args.candidates else digests}
            log(f"determinism check: {args.check_determinism} steps trained twice from scratch → "
                f"{'identical bytes' if same else 'DIFFERENT bytes'}")

    results = train_side_by_side(models, data, device, histories=hists)
    del data
    out = Path(args.out)
    for name, res in results.items():  # the weights first: nothing after training may cost them
        if res is not None:
            log(f"{name or 'DiT'} done: {res[2]} of {res[1]} steps in {hists[name]['dit_seconds']:.0f}s")
            if args.init_from:
                save_model(pipe, res[0], args, out, name)  # OUT/transformer, or OUT/dit-.../transformer
    if not args.init_from:  # the decoder is refined and everything saved before the evaluation, so the
        ema = results[cands[0][0]][0]  # rollouts are scored through the decoder that is shipped
        if args.dec_steps:
            refine_decoder(pipe.vae, args, history, renderer, device)
            history["vae_eval_refined"] = vae_eval(pipe.vae, eval_clips)
            log(f"decoder refined: {history['dec_steps_run']} of {history['dec_steps']} steps, "
                f"held-out {history['vae_eval_refined']}")
        save_model(pipe, ema, args, out)
    for name, res in results.items():
        if res is None:
            continue
        ema = res[0].to(device)
        h = hists[name]
        with optional(f"held-out evaluation {name}"):
            h["dit_eval_after"] = velocity_eval(ema, eval_data, args.seed + 11, device)
            log(f"{name} held-out velocity loss {h['dit_eval_before']} → {h['dit_eval_after']}")
            h["rollout_after"] = rollout_eval(pipe, ema, eval_data, eval_clips, args, device)
            log(f"{name} held-out stock I2V rollouts: {h['rollout_after']}")
        ema.to("cpu")
    history["weights_sha256"] = weight_hashes(out)
    history["total_seconds"] = time.time() - T_START
    write_summary(out / "training.json", history)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved to {out} ({size / 1e6:.1f} MB); total {history['total_seconds']:.0f}s")
    for name, digest in history["weights_sha256"].items():
        log(f"sha256 {digest}  {name}")
    if args.pack:
        parts = pack(out, Path(args.pack), int(args.pack_part_mb * 1e6))
        log(f"packed into {len(parts)} parts in {args.pack}: {', '.join(p.name for p in parts)}")
    return 0


def run_decoder_only(args, device, renderer: ClipRenderer, history: dict, eval_iter) -> int:
    """--decoder-only: the --init-from VAE with its decoder refined; written as OUT/vae (cp it over a model
    folder's vae/). The held-out VAE evaluation before and after is in training.json."""
    from diffusers import AutoencoderKLWan

    vae = onednn_conv3d(AutoencoderKLWan.from_pretrained(args.init_from, subfolder="vae").to(device).eval())
    eval_clips = list(eval_iter)
    history["vae_eval_before"] = vae_eval(vae, eval_clips)
    log(f"VAE from {args.init_from}: held-out {history['vae_eval_before']}")
    refine_decoder(vae, args, history, renderer, device)
    history["vae_eval_refined"] = vae_eval(vae, eval_clips)
    log(f"decoder refined: {history['dec_steps']} steps in {history['dec_seconds']:.0f}s, held-out "
        f"{history['vae_eval_refined']}")
    out = Path(args.out)
    shutil.rmtree(out / "vae", ignore_errors=True)
    vae.to("cpu").save_pretrained(out / "vae", safe_serialization=True)
    history["weights_sha256"] = weight_hashes(out)
    history["total_seconds"] = time.time() - T_START
    write_summary(out / "training.json", history)
    for name, digest in history["weights_sha256"].items():
        log(f"sha256 {digest}  {name}")
    return 0


@contextmanager
def optional(what: str):
    """A part of the run whose failure is logged, not fatal: on a machine lent for minutes, an evaluation
    that breaks must not cost the trained weights."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
        log(f"{what} failed: {type(exc).__name__}: {exc}")


def compact(history: dict) -> dict:
    summary = {k: v for k, v in history.items() if k not in ("vae", "dit", "dec", "candidates")}
    # a compact loss record: means over windows of 25 steps
    for key, field in (("vae", "l1"), ("dit", "loss"), ("dec", "l1")):
        rows = history.get(key) or []
        if rows:
            summary[f"{key}_{field}_curve"] = [
                [rows[i]["step"], round(float(np.mean([r[field] for r in rows[i:i + 25]])), 5)]
                for i in range(0, len(rows), 25)]
    if "candidates" in history:
        summary["candidates"] = {name: compact(h) for name, h in history["candidates"].items()}
    return summary


def write_summary(path: Path, history: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(compact(history), indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
