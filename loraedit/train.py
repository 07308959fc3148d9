"""Stage 3 of 4 — train: the per-video LoRA, stage 1 on the video, stage 2 on the references.

A two-expert model (Wan2.2-I2V-A14B) gets one LoRA per expert, each trained on the noise levels
of its own side of the boundary (as the Wan LoRA trainers do), one expert after the other so that
only one is ever in memory; `experts = "low"` trains only the low-noise expert's.

A short, linear loop. Every random draw of step s comes from a generator seeded by (seed, s),
and a checkpoint holds the LoRA and the optimizer state, so a killed run resumed from its last
checkpoint gives exactly the same LoRA as an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraedit import method
from loraedit.errors import InputError
from loraedit.files import atomic_output, canonical_safetensors, read_json, sha256_file, write_json
from loraedit import family
from loraedit.settings import TrainSettings
from loraedit.models import (add_lora, check_attention, load_transformer, lora_folders, lora_parameters, memory_mode, model_family, peak_memory_gb,
                             release_memory, save_lora, setup_training, speed_up, wan_lora_name)

log = logging.getLogger("loraedit")


# ---------------------------------------------------------------- the pure parts


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_for_step(step: int, steps: int, ref_keys: list[int], video_every: int, g: torch.Generator,
                    colour_copies: int = 0) -> int | str | None:
    """Which sample trains at `step`: None = the video, k = reference frame k, "hueI" = colour copy I.

    Stage 1 (step < steps) is the video, in turn with its colour copies (step s: copy s mod (N+1),
    0 = the video itself). Stage 2 draws a reference at random each step and mixes the video in
    every `video_every`-th step (the original code: ~1 video per 9 references), its copies in turn.
    """
    def video(n: int) -> str | None:  # the n-th video step: the video or one of its colour copies
        return f"hue{n % (colour_copies + 1)}" if colour_copies and n % (colour_copies + 1) else None

    if step < steps or not ref_keys:
        return video(step) if step < steps else None
    i = step - steps
    if video_every > 0 and i % video_every == video_every - 1:
        return video(i // video_every)
    return ref_keys[int(torch.randint(len(ref_keys), (1,), generator=g))]


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as the original implementation (betas 0.9, 0.99); fused: one kernel for all LoRA tensors."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay, fused=True)


def training_step(transformer, optimizer, x0, condition, text, image, sigma, noise, grad_clip: float) -> float:
    """One optimisation step of the velocity loss; returns the loss."""
    loss = method.velocity_loss(transformer, x0, condition, text, image, sigma, noise)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------- checkpoints (safetensors, no pickle)


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, losses: list[float]) -> None:
    names = list(params)
    tensors = {f"lora.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    state = optimizer.state_dict()
    for idx, st in state["state"].items():
        for k, v in st.items():
            tensors[f"optim.{names[idx]}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    canonical_safetensors(tmp / "state.safetensors")  # the same run gives the same bytes
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "param_groups": state["param_groups"]}, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a checkpoint exists whole or not at all


def load_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], optimizer) -> tuple[int, list[float]]:
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    names = list(params)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"lora.{n}"])
    state = {"state": {}, "param_groups": meta["param_groups"]}
    for idx, n in enumerate(names):
        st = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
        if st:
            state["state"][idx] = st
    optimizer.load_state_dict(state)
    return meta["step"], meta["losses"]


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


# ---------------------------------------------------------------- outputs a person looks at


def write_losses(train_dir: Path, losses: list[float], samples: list[str], steps: int) -> None:
    with atomic_output(train_dir / "losses.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "stage", "sample", "loss"])
            for i, (loss, s) in enumerate(zip(losses, samples)):
                w.writerow([i + 1, 1 if i < steps else 2, s, f"{loss:.6f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    xs = range(1, len(losses) + 1)
    ax.plot(xs, losses, lw=0.8, alpha=0.4, color="tab:blue", label="step loss")
    k = max(1, len(losses) // 20)
    if len(losses) >= k:
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(xs, smooth, lw=1.6, color="tab:blue", label=f"mean of {k}")
    if 0 < steps < len(losses):
        ax.axvline(steps + 0.5, color="gray", ls="--", lw=1)
        ax.text(steps + 1, ax.get_ylim()[1], " stage 2", va="top", fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("velocity MSE")
    ax.set_title("LoRA training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(train_dir / "losses.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- the stage


def sample_names(total: int, args: TrainSettings, ref_keys: list[int], steps: int | None = None, seed: int | None = None) -> list[str]:
    steps = args.steps if steps is None else steps
    seed = args.seed if seed is None else seed
    keys = (sample_for_step(s, steps, ref_keys, args.ref_video_every, step_generator(seed, s), args.colour_copies) for s in range(total))
    return ["video" if k is None else k if isinstance(k, str) else f"ref{k}" for k in keys]


def experts_to_train(fam: family.ModelFamily, experts: str) -> tuple[str, ...]:
    """'both' → every expert of the model; 'low' → a two-expert model's low-noise expert only."""
    if experts == "low":
        if not fam.two_experts:
            raise InputError(f"--experts low: {fam.name} has one transformer; --experts applies to Wan2.2-I2V-A14B")
        return (family.LOW,)
    return fam.experts


def expert_sigma(sigma: torch.Tensor, fam: family.ModelFamily, expert: str) -> torch.Tensor:
    """σ ∈ (0, 1) drawn for the whole range → the same draw within the expert's own range."""
    lo, hi = fam.sigma_range(expert)
    return lo + (hi - lo) * sigma


def run(args: TrainSettings, run_dir: Path, cache: dict[str, torch.Tensor], device: torch.device, progress=None) -> dict:
    """Train (or resume) every expert's LoRA and write lora/; returns timing and memory figures."""
    fam = model_family(args.model)
    experts = experts_to_train(fam, args.experts)
    if not fam.two_experts:
        return train_expert(args, run_dir, cache, device, fam, family.HIGH, progress)
    figures = {}
    for expert in experts:
        figures[family.EXPERT_NAMES[expert]] = train_expert(args, run_dir, cache, device, fam, expert, progress)
    parts = list(figures.values())
    out = {"experts": figures, "total": sum(f["total"] for f in parts), "seconds": sum(f["seconds"] for f in parts),
           "peak_memory_gb": max(f.get("peak_memory_gb", 0.0) for f in parts),
           "lora_sha256": {f"{e}/{k}": v for e, f in figures.items() for k, v in f.get("lora_sha256", {}).items()}}
    if all(f.get("reused") for f in parts):
        out["reused"] = True
    return out


def train_expert(args: TrainSettings, run_dir: Path, cache: dict[str, torch.Tensor], device: torch.device, fam: family.ModelFamily, expert: str,
                 progress=None) -> dict:
    """Train (or resume) one transformer's LoRA: the only model, or one expert of two."""
    from tqdm.auto import tqdm

    two = fam.two_experts
    train_dir = run_dir / "train" / family.EXPERT_NAMES[expert] if two else run_dir / "train"
    lora_dir = lora_folders(run_dir, fam)[expert]
    # the high-noise expert may get its own stage-1 budget; each expert draws its own noise
    steps = args.steps
    if two and expert == family.HIGH and args.high_noise_steps is not None:
        steps = args.high_noise_steps
    seed = args.seed + (1_000 if two and expert == family.LOW else 0)
    ref_keys = sorted(int(k.split(".")[1]) for k in cache if k.startswith("ref.") and k.endswith(".x0"))
    total = steps + (args.ref_steps if ref_keys else 0)
    done_file = train_dir / "done.json"
    if done_file.is_file() and read_json(done_file).get("total") == total and (lora_dir / "pytorch_lora_weights.safetensors").is_file():
        log.info("training already finished (%d steps); reusing %s", total, lora_dir)
        return dict(read_json(done_file), reused=True)
    if total == 0:
        return {"total": 0, "seconds": 0.0}

    check_attention(args.attention, device)  # before any weights load
    memory = memory_mode(args.memory, device, args.model, tuple(cache["x0"].shape[2:]))
    transformer = load_transformer(args.model, device, memory, subfolder=expert)
    add_lora(transformer, args.rank, args.alpha, args.lora_targets, seed=args.seed)
    # checkpointing (and activation offload / block swap) as the memory mode says; --gradient-checkpointing overrides
    setup_training(transformer, device, {"on": True, "off": False}.get(args.gradient_checkpointing, device.type == "cuda" or None))
    speed_up(transformer, device, args.attention, args.compile)
    transformer.train()
    params = lora_parameters(transformer)
    optimizer = make_optimizer(params.values(), args.lr, args.weight_decay)

    start, losses = 0, []
    ckpt_dir = train_dir / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        start, losses = load_checkpoint(last, params, optimizer)
        log.info("resuming from %s (step %d of %d)", last, start, total)

    def on_device(t):
        return None if t is None else t.to(device)

    # the video trains with the source's caption and first frame; a reference (it shows the edit)
    # with the edited video's caption and the edited first frame's CLIP embedding (caption.py)
    text, text_edit = on_device(cache["text"]), on_device(cache.get("text_edit", cache["text"]))
    samples = {None: (on_device(cache["x0"]), on_device(cache["cond_train"]), on_device(cache.get("image_train")), text)}
    positions = {None: list(range(samples[None][0].shape[2]))}  # rotary time position of each latent frame
    for i, name in enumerate(method.colour_copy_angles(args.colour_copies), 1):  # stage 1's colour copies: the video, hues turned
        samples[f"hue{i}"] = (on_device(cache[f"{name}.x0"]), on_device(cache[f"{name}.cond"]), on_device(cache.get(f"{name}.image")), text)
        positions[f"hue{i}"] = positions[None]
    for k in ref_keys:
        x0, cond = on_device(cache[f"ref.{k}.x0"]), on_device(cache[f"ref.{k}.cond"])
        positions[k] = [0]
        if args.ref_sample == "pair":
            # the edited first frame (latent frame 0 of the render condition, its last C channels are the latents), then k
            first_cond = on_device(cache["cond_render"][:, :, :1])
            x0, cond = method.reference_pair(first_cond[:, -x0.shape[1]:], first_cond, x0, cond)
            positions[k] = [0, method.latent_index(k, fam.temporal)]
        samples[k] = (x0, cond, on_device(cache.get("image_render")), text_edit)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    desc = f"train {family.EXPERT_NAMES[expert].replace('_', '-')}" if two else "train"
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=progress is False)
    for step in range(start, total):
        g = step_generator(seed, step)
        key = sample_for_step(step, steps, ref_keys, args.ref_video_every, g, args.colour_copies)
        x0, cond, image, text = samples[key]
        sigma = expert_sigma(method.sample_sigma(1, args.timesteps, g, shift=args.train_shift), fam, expert)
        noise = torch.randn(x0.shape, generator=g).to(device)
        with method.rope_time_positions(transformer, positions[key]):
            loss = training_step(transformer, optimizer, x0, cond, text, image, sigma.to(device), noise, args.grad_clip)
        if not math.isfinite(loss):
            bar.close()
            # stop at once: the LoRA is now non-finite too; the checkpoints on disk are all from finite steps
            last = latest_checkpoint(ckpt_dir)
            kept = f"the last good checkpoint ({last.name}) is kept" if last is not None else "no checkpoint was saved before it"
            raise InputError(f"training diverged at step {step + 1}: the loss is {loss} (not finite); {kept}; lower --lr "
                             f"(now {args.lr:g}; try {args.lr / 10:g}) and run again with --restart")
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", stage=1 if step < steps else 2)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == total:
            save_checkpoint(ckpt_dir / f"step-{step + 1:06d}", step + 1, params, optimizer, losses)
            for old in sorted(ckpt_dir.glob("step-*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
            write_losses(train_dir, losses, sample_names(step + 1, args, ref_keys, steps, seed), steps)
    bar.close()
    seconds = time.perf_counter() - t0
    saved = save_lora(transformer, lora_dir, args.rank, args.alpha, args.lora_targets, wan_name=wan_lora_name(fam, expert))
    for path in saved.values():
        canonical_safetensors(path)  # the same run gives the same bytes (and the sha256 renders record)
    peak = peak_memory_gb(device)
    del transformer, optimizer, params, samples
    release_memory()
    result = {
        "total": total, "stage1_steps": steps, "stage2_steps": total - steps, "resumed_from": start,
        "seconds": seconds, "seconds_per_step": seconds / max(1, total - start), "memory_mode": memory,
        "peak_memory_gb": peak, "final_loss": losses[-1] if losses else None,
    }
    result["lora_sha256"] = {name: sha256_file(path) for name, path in saved.items()}
    write_json(done_file, result)
    return result
