"""Stage 4 of 4 — render: sample the edited video with the trained LoRA and write what a person watches.

    render/edited.mp4          the result (H.264)
    render/side_by_side.mp4    source | edited
    render/contact_sheet.png   sampled frames, source row above edited row
    render/frames/NNN.png      the result losslessly, for metrics and further work
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from loraedit import family, method
from loraedit.models import (cfg_fits_batched, check_attention, enable_render_cache, tile_if_needed, load_scheduler, load_trained_lora,
                             load_transformer, load_vae, lora_folders, memory_mode, model_family, peak_memory_gb, release_memory, speed_up)
from loraedit.files import write_json
from loraedit.settings import RenderSettings
from loraedit.video import write_png, write_video

log = logging.getLogger("loraedit")


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents (1, C, T, h, w) → (F, H, W, 3) uint8 (diffusers' postprocessing arithmetic)."""
    device = next(vae.parameters()).device
    spatial = getattr(vae.config, "scale_factor_spatial", None) or 8
    tile_if_needed(vae, latents.shape[-1] * spatial, latents.shape[-2] * spatial, device)  # tiles only where memory is short
    z = method.denormalize_latents(latents.to(device, vae.dtype), torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std))
    video = vae.decode(z, return_dict=False)[0]  # (1, 3, F, H, W) in [-1, 1]
    video = (video / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0).float().cpu().numpy()
    return (video * 255).round().astype(np.uint8)


def composite(source: np.ndarray, edited: np.ndarray, region: np.ndarray, feather: int) -> np.ndarray:
    """Paste source pixels back outside the edit region, blending over a `feather`-pixel band."""
    out = np.empty_like(edited)
    k = 2 * feather + 1
    for i in range(len(edited)):
        a = cv2.dilate(region[i].astype(np.uint8), np.ones((k, k), np.uint8)).astype(np.float32)
        a = cv2.GaussianBlur(a, (k, k), feather / 2)[..., None] if feather > 0 else a[..., None]
        out[i] = (a * edited[i] + (1 - a) * source[i]).round().astype(np.uint8)
    return out


def contact_sheet(rows: list[np.ndarray], n: int = 6, tile_width: int = 320) -> np.ndarray:
    """Rows of (F, H, W, 3) frames → one image: n evenly spaced frames per row, labelled by index."""
    F, H, W = rows[0].shape[:3]
    pick = np.linspace(0, F - 1, min(n, F)).round().astype(int)
    tw = min(W, tile_width)
    th = round(H * tw / W)
    tiles = []
    for row in rows:
        line = []
        for i in pick:
            tile = cv2.resize(row[i], (tw, th), interpolation=cv2.INTER_AREA) if tw != W else row[i].copy()
            if th >= 48:
                cv2.putText(tile, str(i), (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 2, cv2.LINE_AA)
                cv2.putText(tile, str(i), (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
            line.append(tile)
        tiles.append(np.concatenate(line, axis=1))
    return np.concatenate(tiles, axis=0)


def output_dir(run_dir: Path, name: str | None) -> Path:
    """render/ for the first render; render-2, render-3 … after, so no result is overwritten (a folder
    without settings.json holds an interrupted render, which the next render replaces)."""
    if name:
        return run_dir / name
    d, i = run_dir / "render", 2
    while (d / "settings.json").is_file():
        d, i = run_dir / f"render-{i}", i + 1
    return d


def run(args: RenderSettings, run_dir: Path, prepared: dict, cache: dict[str, torch.Tensor], device: torch.device, out_dir: Path,
        progress=None, source_video: str | None = None, record: dict | None = None) -> dict:
    """Sample, decode and write the render into `out_dir`; `record` (what it is made from) goes to
    settings.json, written last so its presence marks a complete render."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    check_attention(args.attention, device)  # before any weights load
    latent = tuple(cache["x0"].shape[2:])
    memory = memory_mode(args.memory, device, args.model, latent, kind="render")
    fam = model_family(args.model)
    # guidance's two calls as one batch of two where the memory model says it fits (one pass over the weights)
    batch_cfg = args.guidance > 1.0 and cfg_fits_batched(args.model, fam.experts[0], memory, latent, device)
    folders = lora_folders(run_dir, fam)
    held: dict[str, torch.nn.Module] = {}
    cache_stats: dict[str, int] = {}  # --render-cache: denoiser calls, and those that ran every block

    def expert(name: str):
        """The denoiser `name` with its LoRA; a two-expert model's other expert is freed first."""
        held.clear()
        release_memory()
        transformer = load_transformer(args.model, device, memory, subfolder=name).eval()
        lora_file = folders[name] / "pytorch_lora_weights.safetensors"
        if lora_file.is_file():
            load_trained_lora(transformer, lora_file)
        else:
            log.warning("no trained LoRA in %s: the %s renders with its base weights", folders[name],
                        f"{family.EXPERT_NAMES[name].replace('_', '-')} expert" if fam.two_experts else "model")
        enable_render_cache(transformer, args.render_cache, args.render_cache_threshold, cache_stats)
        speed_up(transformer, device, args.attention, args.compile)
        held[name] = transformer
        return transformer

    scheduler = load_scheduler(args.model, args.shift)
    cond = cache["cond_render"].to(device)
    shape = tuple(cache["x0"].shape)  # (1, C, T, h, w): the model's latent channels and grid
    # noise drawn on the CPU, as diffusers does with a CPU generator, so seeds mean the same everywhere
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float32).to(device)
    image = cache.get("image_render")
    bar = tqdm(total=args.render_steps, desc="render", unit="step", disable=progress is False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks: list[float] = []  # end of each sampling step
    latents = method.sample_latents(
        expert if fam.two_experts else expert(family.HIGH), scheduler, noise, cond, cache.get("text_edit", cache["text"]).to(device),
        cache["negative_text"].to(device), None if image is None else image.to(device), args.render_steps, args.guidance,
        on_step=lambda i: (bar.update(1), marks.append(time.perf_counter())), boundary=fam.boundary_timestep, guidance_2=args.guidance_2, batch_cfg=batch_cfg,
    )
    bar.close()
    # mean step after the first (which includes loading and any compilation); a mean, not a median, so
    # that a render cache's mix of full and skipped steps counts as it costs
    gaps = [b - a for a, b in zip(marks, marks[1:])] or [0.0]
    peak = peak_memory_gb(device)
    held.clear()
    release_memory()
    vae = load_vae(args.model, device)
    frames = decode(vae, latents)
    del vae
    release_memory()

    source = prepared["source"]
    if args.composite:
        frames = composite(source, frames, prepared["region"], args.feather)
    fps = prepared["plan"]["fps"]
    plan = prepared["plan"]
    # the source's sound fits when the frames start at the clip's start: they are written at the
    # rate they were taken at (prepare's plan), so frame k plays at its own source time
    in_sync = plan.get("audio_in_sync", plan["indices"] == list(range(plan["frames"])))
    audio = source_video if plan.get("has_audio") and in_sync and source_video and Path(source_video).is_file() else None
    for i, f in enumerate(frames):
        write_png(out_dir / "frames" / f"{i:03d}.png", f)
    write_video(out_dir / "edited.mp4", frames, fps, audio_from=audio)
    write_video(out_dir / "side_by_side.mp4", np.concatenate([source, frames], axis=2), fps)
    write_png(out_dir / "contact_sheet.png", contact_sheet([source, frames]))
    write_png(out_dir / "first_frame.png", prepared["first"])  # the edited first frame this render started from (eval's frame 0)
    write_json(out_dir / "settings.json", record if record is not None else args.to_dict())  # last: marks it complete
    return {"seconds": time.perf_counter() - t0, "peak_memory_gb": peak, "dir": out_dir.name, "seed": args.seed, "batched_guidance": batch_cfg,
            "seconds_per_step": sum(gaps) / len(gaps),
            **({"render_cache_calls": cache_stats["calls"], "render_cache_full_calls": cache_stats["full"]} if cache_stats else {}),
            "steps": args.render_steps, "guidance": args.guidance, "shift": args.shift,
            "memory_mode": memory}  # the mode --memory auto chose, not "auto"
