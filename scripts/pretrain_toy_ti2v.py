#!/usr/bin/env python
"""Pre-train a toy Wan2.2-TI2V model on the procedural world (loraedit/world.py).

    # on one GPU, writing only what is new (the transformer, model_index.json, training.json)
    python scripts/pretrain_toy_ti2v.py --device cuda --init-from loraedit/toymodel --out /tmp/o/ti2v \
        --frozen none --budget 290 --dit-steps 20000 --check-determinism 20

    # on a CPU, a complete model folder (the frozen parts copied from --init-from)
    python scripts/pretrain_toy_ti2v.py --device cpu --out runs/toy_ti2v --dit-clips 256 --dit-batch 8 --dit-steps 3000

    # a complete folder from a --frozen none run's output and --init-from
    python scripts/pretrain_toy_ti2v.py --assemble /tmp/o/ti2v --init-from loraedit/toymodel --out runs/toy_ti2v

What it makes: a `WanPipeline` folder with `expand_timesteps: true` — the layout of
Wan-AI/Wan2.2-TI2V-5B-Diffusers, which loraedit loads as the TI2V family — whose transformer has
TI2V's architecture: no mask channels (in_channels = out_channels = the VAE's z_dim), no image
cross-attention, per-token timesteps. It is pre-trained as a real TI2V model keeps its first frame:
the first latent frame's tokens take the clean latents of the first frame and timestep 0, every other
token is denoised (the **stock** TI2V condition only: never loraedit's mask-aware one). Velocity MSE
over the generated tokens only (method.velocity_loss), σ half uniform and half shifted, 10% empty
captions, EMA.

What it reuses: the VAE, text encoder, tokenizer and scheduler of --init-from (the bundled toy
Wan2.1 model: 16 latent channels, 8x spatial), unchanged. The method's difference on TI2V (keep
tokens at timestep 0 instead of mask channels) is in the transformer's conditioning, not in the VAE;
the Wan2.2 VAE's own layout (48 channels, 16x spatial) is covered by the tiny random folders of the
tests (loraedit/tiny.py), not by this model. The world rendering, caption encoding, determinism
settings, learning-rate schedule and summary come from scripts/pretrain_toy.py (imported by path);
the training loop is a copy of its `train_transformer` with the TI2V condition in place of the
36-channel one (that function builds the Wan2.1 mask condition inside its loop).

Deterministic as scripts/pretrain_toy.py: every schedule counts steps, every random draw comes from a
generator seeded from --seed; --budget times the first steps (inside the fixed warm-up) and lowers
--dit-steps to what fits, printing the --dit-steps that reproduces the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraedit import method  # noqa: E402


def _import_toy():
    """scripts/pretrain_toy.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("pretrain_toy", ROOT / "scripts" / "pretrain_toy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_toy"] = module
    spec.loader.exec_module(module)
    return module


toy = _import_toy()
log = toy.log
T_START = time.time()

# what the folder takes over from --init-from unchanged (a WanPipeline has no image encoder)
SHARED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
EVAL_SEEDS = toy.EVAL_SEEDS
TRAIN_SEED_BASE = toy.TRAIN_SEED_BASE + 300_000  # clips of their own (the Wan2.1 toy trains from +100_000)


def transformer_config(args, z_dim: int, text_dim: int) -> dict:
    """TI2V's transformer: the latents alone in and out (no mask channels), no image cross-attention."""
    from loraedit.tiny import tiny_transformer_config

    return tiny_transformer_config(in_channels=z_dim, out_channels=z_dim, image_dim=None, added_kv_proj_dim=None,
                                   text_dim=text_dim, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                                   ffn_dim=args.ffn, num_layers=args.layers, freq_dim=64, rope_max_seq_len=64)


def new_transformer(args, z_dim: int, text_dim: int, device):
    """Built on the CPU from the seed, so the start is the same on any device."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed + 5)
    return WanTransformer3DModel(**transformer_config(args, z_dim, text_dim)).to(device)


def build_pipeline(args, device):
    """A WanPipeline with expand_timesteps: --init-from's VAE, text encoder, tokenizer, scheduler and a new transformer."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    init = Path(args.init_from)
    vae = AutoencoderKLWan.from_pretrained(init / "vae")
    text_encoder = UMT5EncoderModel.from_pretrained(init / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(init / "tokenizer")
    scheduler = UniPCMultistepScheduler.from_pretrained(init / "scheduler")
    transformer = new_transformer(args, vae.config.z_dim, text_encoder.config.d_model, torch.device("cpu"))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer, expand_timesteps=True)
    pipe.to(device)
    pipe.vae.eval(), pipe.text_encoder.eval()
    return pipe


# ---------------------------------------------------------------- data: source latents and captions


@torch.no_grad()
def encode_dataset(vae, clips, names, batch: int, device, log_every: int = 0) -> dict:
    """World clips (each as the `names` of toy.VARIANTS) → raw latents (N, C, T, h, w) and caption
    indices. A TI2V condition needs nothing else: its kept tokens take the video's own latents (the
    Wan VAE encodes frame 0 alone, so latent frame 0 is exactly the first frame's encoding)."""
    xs, caption_of, pending = [], [], []
    t0, n_clips = time.time(), 0

    def flush():
        video = torch.from_numpy(np.stack([v for v, _ in pending])).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        xs.append(vae.encode(video).latent_dist.mode())
        caption_of.extend(c for _, c in pending)
        pending.clear()

    for clip in clips:
        pending.extend(toy.clip_variants(clip, names))
        n_clips += 1
        if len(pending) >= batch:
            flush()
        if log_every and n_clips % log_every == 0:
            log(f"encoded {n_clips} clips ({len(caption_of) + len(pending)} videos, {time.time() - t0:.0f}s)")
    if pending:
        flush()
    captions = sorted(set(caption_of))
    index = {c: i for i, c in enumerate(captions)}
    return {"x0": torch.cat(xs), "text_idx": torch.tensor([index[c] for c in caption_of], device=device),
            "captions": captions}


def finish_dataset(pipe, data: dict, device) -> dict:
    """Latents into model space (the VAE's latents_mean/std), captions encoded once each."""
    mean, std = torch.tensor(pipe.vae.config.latents_mean), torch.tensor(pipe.vae.config.latents_std)
    data["x0"] = method.normalize_latents(data["x0"], mean, std)
    data["text"] = toy.encode_captions(pipe, data["captions"], device)
    data["empty_text"] = toy.encode_captions(pipe, [""], device)[0]
    return data


def stock_condition(x0: torch.Tensor) -> torch.Tensor:
    """x0 (B, C, T, h, w) → the stock TI2V condition (B, 1+C, T, h, w): latent frame 0 kept, the rest generated."""
    T, h, w = x0.shape[2:]
    keep = torch.zeros(T, h, w, device=x0.device)
    keep[0] = 1.0
    return method.ti2v_condition(x0, keep)


# ---------------------------------------------------------------- the transformer


def train_transformer(tr, data: dict, args, device, history: dict | None = None, stop_at: int | None = None):
    """Flow matching on the stock TI2V condition (no image embedding); returns (the EMA copy, steps planned, steps
    run). The loop, its random draws and its budget are pretrain_toy.train_transformer's; only the loss differs,
    and no later phase needs budget time."""
    def batch_loss(model, idx, text, sigma, noise):
        x0 = data["x0"][idx]
        return method.velocity_loss(model, x0, stock_condition(x0), text, None, sigma, noise)

    return toy.train_transformer(tr, data, args, device, history, stop_at, batch_loss=batch_loss, reserve=lambda: 0.0)


# ---------------------------------------------------------------- held-out evaluation


@torch.no_grad()
def velocity_eval(transformer, data: dict, seed: int, device) -> dict:
    """Velocity loss (generated tokens) at fixed σ with fixed noise on held-out clips, stock condition."""
    gen = torch.Generator().manual_seed(seed)
    cond = stock_condition(data["x0"])
    text = data["text"][data["text_idx"]]
    out = {}
    with toy.attention_kernel(device):
        for s in (0.25, 0.5, 0.75):
            noise = torch.randn(data["x0"].shape, generator=gen).to(device)
            sigma = torch.full((data["x0"].shape[0],), s, device=device)
            out[f"sigma_{s}"] = round(float(method.velocity_loss(transformer, data["x0"], cond, text, None, sigma, noise)), 4)
    return out


@torch.no_grad()
def rollout_eval(pipe, transformer, clips, args, device) -> dict:
    """No LoRA, 20 UniPC steps, shift 5, guidance 1, scored by world.clip_metrics (means over clips):
    stock TI2V from the source frame 0 (against the source) and from the edited frame 0 (against the
    true edit), and the mask-aware condition from the edited frame 0 (the object's true region
    generated in every frame, everything else kept from the source: what `loraedit edit --steps 0`
    renders on this model)."""
    from diffusers import UniPCMultistepScheduler

    from loraedit.world import clip_metrics

    vae = pipe.vae
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    fam_spatial, temporal, patch = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal, tuple(transformer.config.patch_size)

    def encode(frames: np.ndarray) -> torch.Tensor:
        video = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        return method.normalize_latents(vae.encode(video).latent_dist.mode(), mean, std)

    rows: dict[str, list] = {"stock, from source frame 0": [], "stock, from edited frame 0": [],
                             "mask-aware, from edited frame 0": []}
    conds, texts, targets = [], [], []
    for clip in clips:
        x0 = encode(clip.source)
        first = encode(clip.truth[:1])
        edited = torch.cat([first, x0[:, :, 1:]], dim=2)
        keep = method.token_keep_mask(torch.from_numpy(clip.region), fam_spatial, temporal, patch).to(device)
        keep[0] = 1.0
        conds += [stock_condition(x0), stock_condition(edited), method.ti2v_condition(edited, keep)]
        texts += [clip.caption, clip.edited_caption, clip.edited_caption]
        targets += [dataclasses.replace(clip, truth=clip.source), clip, clip]
    cond = torch.cat(conds)
    text = toy.encode_captions(pipe, texts, device)
    scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=args.eval_shift)
    noise = torch.randn((cond.shape[0], cond.shape[1] - 1, *cond.shape[2:]),
                        generator=torch.Generator().manual_seed(args.seed + 13)).to(device)
    with toy.attention_kernel(device):
        lat = method.sample_latents(transformer, scheduler, noise, cond, text, None, None,
                                    steps=args.eval_render_steps, guidance=1.0)
    for i, target in enumerate(targets):
        z = method.denormalize_latents(lat[i:i + 1], mean, std)
        video = vae.decode(z).sample[0].clamp(-1, 1)
        frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().cpu().numpy()
        rows[list(rows)[i % 3]].append(clip_metrics(frames, target))
    keys = ("psnr_in", "colour_err_in", "psnr_out", "first_psnr", "temporal_err")
    return {name: {k: round(float(np.nanmean([r[k] for r in rs])), 2) for k in keys} for name, rs in rows.items()}


# ---------------------------------------------------------------- the folder


def save_model(pipe, ema, args, out: Path) -> None:
    """model_index.json (a WanPipeline with expand_timesteps) and the trained transformer; with
    --frozen copy also --init-from's shared parts, byte for byte (a complete, loadable folder)."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_config(out)  # model_index.json only
    shutil.rmtree(out / "transformer", ignore_errors=True)  # no stale shard may outlive a new save
    ema.to("cpu").save_pretrained(out / "transformer", safe_serialization=True, max_shard_size=args.max_shard_size)
    if args.frozen == "copy":
        copy_shared_parts(Path(args.init_from), out)


def copy_shared_parts(init: Path, out: Path) -> None:
    for part in SHARED_PARTS:
        if (out / part).resolve() != (init / part).resolve():
            shutil.rmtree(out / part, ignore_errors=True)
            shutil.copytree(init / part, out / part)


def assemble(trained: Path, init: Path, out: Path) -> None:
    """A complete model folder at `out` from a --frozen none run's output and --init-from."""
    if not (trained / "model_index.json").is_file() or not (trained / "transformer" / "config.json").is_file():
        raise SystemExit(f"pretrain_toy_ti2v: error: --assemble {trained}: no model_index.json and transformer/ there "
                         "(the output of a --frozen none run)")
    out.mkdir(parents=True, exist_ok=True)
    if trained.resolve() != out.resolve():
        for name in ("model_index.json", "training.json"):
            if (trained / name).is_file():
                shutil.copy2(trained / name, out / name)
        shutil.rmtree(out / "transformer", ignore_errors=True)
        shutil.copytree(trained / "transformer", out / "transformer")
    copy_shared_parts(init, out)


# ---------------------------------------------------------------- the run


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--init-from", dest="init_from", default=str(ROOT / "loraedit" / "toymodel"),
                    help="the model folder whose VAE, text encoder, tokenizer and scheduler are used unchanged")
    ap.add_argument("--out", default="runs/toy_ti2v")
    ap.add_argument("--frozen", choices=("copy", "none"), default="copy",
                    help="copy: also copy --init-from's shared parts into --out (a complete folder); "
                         "none: write only what is new (assemble later with --assemble)")
    ap.add_argument("--assemble", default=None, metavar="DIR",
                    help="make a complete folder at --out from DIR (a --frozen none output) and --init-from; no training")
    ap.add_argument("--log", default=None, metavar="FILE", help="also write the progress log to this file")
    ap.add_argument("--max-shard-size", default="15MB")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (on a CPU part of what the result depends on)")
    ap.add_argument("--workers", type=int, default=max(1, min(5, (os.cpu_count() or 2) - 1)),
                    help="processes that render world clips (at most 5; does not change the result)")
    ap.add_argument("--budget", type=float, default=0.0, metavar="SECONDS",
                    help="lower --dit-steps, after timing the first steps, so the run ends within this many seconds")
    ap.add_argument("--budget-reserve", type=float, default=30.0, help="seconds kept for evaluation and saving")
    ap.add_argument("--check-determinism", type=int, default=0, metavar="STEPS",
                    help="before training, train this many steps twice from scratch and compare the weights' bytes")
    # the transformer: the bundled toy transformer's size by default
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--dit-clips", type=int, default=2048, help="world clips to train on")
    ap.add_argument("--dit-variants", type=int, default=4, choices=(1, 2, 4),
                    help="per clip: source; + mirrored; + the edited truth and its mirror")
    ap.add_argument("--encode-batch", type=int, default=64, help="videos per VAE encoding batch")
    ap.add_argument("--dit-steps", type=int, default=6000)
    ap.add_argument("--dit-stop-at", type=int, default=0, help="stop after this many steps of the --dit-steps schedule")
    ap.add_argument("--dit-batch", type=int, default=128)
    ap.add_argument("--dit-lr", type=float, default=5e-4)
    ap.add_argument("--dit-warmup", type=int, default=300, help="warm-up steps (fixed, so --budget can shorten a run)")
    ap.add_argument("--dit-calibrate", type=int, default=120, help="--budget times the steps up to this one")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-clips", type=int, default=len(EVAL_SEEDS), help=f"held-out clips (world seeds {EVAL_SEEDS})")
    ap.add_argument("--eval-render-steps", type=int, default=20)
    ap.add_argument("--eval-shift", type=float, default=5.0)
    args = ap.parse_args(argv)
    init = Path(args.init_from)
    missing = [p for p in SHARED_PARTS if not (init / p).is_dir()]
    if missing:
        ap.error(f"--init-from {args.init_from}: not a model folder with {', '.join(missing)}; pass one (e.g. loraedit/toymodel)")
    if args.workers > 5:
        ap.error(f"--workers {args.workers}: at most 5")
    if args.budget and args.dit_calibrate >= args.dit_warmup:
        ap.error("--dit-calibrate must be below --dit-warmup (the budget may only shorten a run inside the warm-up)")
    if args.dit_batch < 2:
        ap.error("--dit-batch must be at least 2 (half the noise levels uniform, half shifted)")
    return args


class Tee:
    """stdout also written to a file (--log), line by line, so a run cut off by a timeout keeps its log."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.assemble:
        assemble(Path(args.assemble), Path(args.init_from), Path(args.out))
        log(f"assembled {args.out} from {args.assemble} and {args.init_from}")
        return 0
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        sys.stdout = Tee(sys.stdout, open(args.log, "w"))
    device = torch.device(args.device)
    renderer = toy.ClipRenderer(args.workers)  # forked first: before torch starts threads or touches the GPU
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            print("pretrain_toy_ti2v: error: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
            return 2
        return run(args, device, renderer)
    finally:
        renderer.close()


def run(args, device, renderer) -> int:
    import diffusers

    torch.set_num_threads(args.threads)
    toy.configure_determinism(device)
    np.random.seed(args.seed)
    history: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "assemble")},
                     "argv": sys.argv[1:], "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "condition": "stock TI2V (latent frame 0 kept at timestep 0; the rest generated)", "dit": []}
    log(f"device {history['device']}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    eval_iter = renderer.clips(EVAL_SEEDS[:args.eval_clips])
    train_seeds = [TRAIN_SEED_BASE + i for i in range(args.dit_clips)]
    train_iter = renderer.clips(train_seeds, True)  # renders while the models load
    pipe = build_pipeline(args, device)
    z = pipe.vae.config.z_dim
    log(f"transformer {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f}M params, "
        f"in/out {z} channels, expand_timesteps; VAE, text encoder, tokenizer, scheduler from {args.init_from}")
    eval_clips = list(eval_iter)

    t0 = time.time()
    data = finish_dataset(pipe, encode_dataset(pipe.vae, train_iter, toy.VARIANTS[:args.dit_variants], args.encode_batch,
                                               device, log_every=512), device)
    eval_data = finish_dataset(pipe, encode_dataset(pipe.vae, eval_clips, ("source", "truth"), args.encode_batch, device), device)
    history["encode_seconds"] = time.time() - t0
    history["dit_samples"] = int(data["x0"].shape[0])
    log(f"data: {args.dit_clips} clips → {data['x0'].shape[0]} videos, {len(data['captions'])} distinct captions, "
        f"latents {tuple(data['x0'].shape[1:])}, {history['encode_seconds']:.0f}s")

    history["dit_eval_before"] = velocity_eval(pipe.transformer, eval_data, args.seed + 11, device)
    if args.check_determinism:
        with toy.optional("determinism check"):
            digests = []
            for _ in range(2):
                tr = new_transformer(args, z, pipe.text_encoder.config.d_model, device)
                train_transformer(tr, data, args, device, stop_at=args.check_determinism)
                digests.append(toy.state_digest(tr))
                del tr
            same = digests[0] == digests[1]
            history["determinism_check"] = {"steps": args.check_determinism, "identical": same, "sha256": digests}
            log(f"determinism check: {args.check_determinism} steps trained twice from scratch → "
                f"{'identical bytes' if same else 'DIFFERENT bytes'}")

    ema, steps, ran = train_transformer(pipe.transformer, data, args, device, history)
    log(f"DiT done: {ran} of {steps} steps in {history['dit_seconds']:.0f}s")
    del data
    out = Path(args.out)
    save_model(pipe, ema, args, out)  # the weights first: nothing after training may cost them
    ema.to(device)
    with toy.optional("held-out evaluation"):
        history["dit_eval_after"] = velocity_eval(ema, eval_data, args.seed + 11, device)
        log(f"held-out velocity loss {history['dit_eval_before']} → {history['dit_eval_after']}")
        history["rollout_after"] = rollout_eval(pipe, ema, eval_clips, args, device)
        log(f"held-out rollouts (no LoRA): {history['rollout_after']}")
    history["weights_sha256"] = toy.weight_hashes(out / "transformer")
    history["total_seconds"] = time.time() - T_START
    summary = {k: v for k, v in history.items() if k != "dit"}
    rows = history["dit"]
    summary["dit_loss_curve"] = [[rows[i]["step"], round(float(np.mean([r["loss"] for r in rows[i:i + 25]])), 5)]
                                 for i in range(0, len(rows), 25)]
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved to {out} ({size / 1e6:.1f} MB); total {history['total_seconds']:.0f}s")
    for name, digest in history["weights_sha256"].items():
        log(f"sha256 {digest}  transformer/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
