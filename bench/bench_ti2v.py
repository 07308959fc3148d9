#!/usr/bin/env python
"""Mask-aware vs naive on a toy Wan2.2-TI2V model (CPU): does the method's claim hold on TI2V too?

    python scripts/pretrain_toy_ti2v.py --device cpu --out runs/toy_ti2v ...   # or --assemble a GPU run's output
    python bench/bench_ti2v.py --model runs/toy_ti2v                           # 8 clips, 4 variants; a table
    python bench/bench_ti2v.py --model runs/toy_ti2v --shard 0/2 & \\
        python bench/bench_ti2v.py --model runs/toy_ti2v --shard 1/2; python bench/bench_ti2v.py --model runs/toy_ti2v

On TI2V (expand_timesteps, no mask channels) loraedit's mask-aware condition keeps the tokens outside the
edit region by giving them the source's clean latents at timestep 0 — the mechanism the stock model uses
for its first frame only (docs/models.md). For each held-out world clip (the claims benchmark's seeds) the
moving object is recoloured in frame 0 and `loraedit edit` propagates it in each variant, with the same
seeds and step counts as bench/bench_claims.py (the demo's settings):

    no LoRA (stock TI2V)    --steps 0 --mode naive: the base model, first frame kept only
    no LoRA (mask-aware)    --steps 0: the base model with the mask-aware keep tokens (never trained on them)
    naive LoRA              --mode naive: LoRA on the video with the stock first-frame condition
    mask-aware LoRA         the method's stage 1 (loose box grown 10%, kept tokens outside it)

and the result is scored against the world's true edited video (world.clip_metrics): PSNR outside the
object (background preservation), PSNR and colour error inside it (the edit), frame 0, temporal error, and
the wall time of each edit. The first row is the truth through the model's VAE (the ceiling).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraedit  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY before torch loads OpenMP)


def _import_claims():
    spec = importlib.util.spec_from_file_location("bench_claims", ROOT / "bench" / "bench_claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


claims = _import_claims()
SEEDS = claims.SEEDS
KEYS = claims.KEYS
VARIANTS = {
    "no LoRA (stock TI2V)": dict(mode="naive", lora=False),
    "no LoRA (mask-aware)": dict(mode="mask-aware", lora=False),
    "naive LoRA": dict(mode="naive", lora=True),
    "mask-aware LoRA": dict(mode="mask-aware", lora=True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/toy_ti2v", help="a toy TI2V folder (scripts/pretrain_toy_ti2v.py)")
    ap.add_argument("--clips", type=int, default=len(SEEDS))
    ap.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: the demo's)")
    ap.add_argument("--render-steps", type=int, default=None, help="sampling steps (default: the demo's)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variant names")
    ap.add_argument("--out", default="runs/bench_ti2v")
    ap.add_argument("--results", default=None, metavar="FILE", help="also write the table (markdown) to this file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", default="0/1", help="I/N: measure only clips I, I+N, … (then once without --shard)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from loraedit import cli, family
    from loraedit.demo import DEMO, edit_argv, format_metrics, read_frames
    from loraedit.errors import InputError
    from loraedit.world import clip_metrics, make_clip, through_vae, write_clip

    try:
        fam = family.detect(args.model)
    except InputError as exc:
        print(f"bench_ti2v: error: {exc} (make one with scripts/pretrain_toy_ti2v.py)", file=sys.stderr)
        return 2
    if not fam.expand_timesteps:
        print(f"bench_ti2v: error: {args.model} is a {fam.name} folder, not a TI2V one", file=sys.stderr)
        return 2
    steps = DEMO["steps"] if args.steps is None else args.steps
    render_steps = DEMO["render_steps"] if args.render_steps is None else args.render_steps
    lr = DEMO["lr"] if args.lr is None else args.lr
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"bench_ti2v: error: --variants {unknown}: not among {list(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shard, n_shards = (int(v) for v in args.shard.split("/"))
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    settings = {"model": str(Path(args.model).resolve()), "steps": steps, "render_steps": render_steps, "lr": lr}
    results_file = out / ("results.json" if n_shards == 1 else f"results-{shard}of{n_shards}.json")
    for f in sorted(out.glob("results*.json")):  # resume, and collect what other shards measured
        old = json.loads(f.read_text())
        if old.get("settings") == settings:
            for n in names:
                results[n].update({int(k): v for k, v in old["per_clip"].get(n, {}).items()})
    t0 = time.perf_counter()
    for i, seed in enumerate(SEEDS[:args.clips]):
        if i % n_shards != shard or all(seed in results[n] for n in names):
            continue
        clip = make_clip(seed)
        inputs = dict(write_clip(clip, out / "clips" / str(seed)), reference_frame=clip.reference_frame)
        for name in names:
            if seed in results[name]:
                continue
            v = VARIANTS[name]
            run_dir = out / "runs" / f"{seed}-{name.replace(' ', '_').replace('(', '').replace(')', '')}"
            shutil.rmtree(run_dir, ignore_errors=True)
            argv = edit_argv(inputs, run_dir, model=args.model, prompt=clip.caption, edit_prompt=clip.edited_caption,
                             steps=steps if v["lora"] else 0, ref_steps=0, render_steps=render_steps, seed=0,
                             mode=v["mode"], reference=False, lr=lr, quiet=True)
            t = time.perf_counter()
            rc = cli.main(argv)
            if rc != 0:
                print(f"clip {seed} {name}: edit failed (exit {rc})", file=sys.stderr)
                return rc
            m = clip_metrics(read_frames(run_dir / "render" / "frames", clip.frames), clip)
            m["seconds"] = time.perf_counter() - t
            results[name][seed] = m
            keep = out / "results" / str(seed)
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / "render" / "contact_sheet.png", keep / f"{run_dir.name}.png")
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"[{time.perf_counter() - t0:6.0f}s] clip {seed} {name:22s} "
                  + " ".join(f"{k}={m[k]:.2f}" for k in (*KEYS, "seconds")), flush=True)
            results_file.write_text(json.dumps({
                "settings": settings, "per_clip": {n: {str(k): r for k, r in d.items()} for n, d in results.items()}}, indent=1))
    if n_shards > 1:
        print(f"shard {shard}/{n_shards} done; run again without --shard for the table")
        return 0

    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae").eval()
    seeds = SEEDS[:args.clips]
    ceiling = {s: clip_metrics(through_vae(vae, make_clip(s).truth), make_clip(s)) for s in seeds}
    rows = {"(truth through the VAE)": ceiling, **results}
    means = {n: {k: claims.nanmean([r[k] for r in rows[n].values()]) for k in (*KEYS, "seconds") if k != "seconds" or n in results}
             for n in rows}

    def wins(a, b, key, higher=True):
        pairs = [(results[a][s][key], results[b][s][key]) for s in results[a] if s in results[b]]
        pairs = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
        return sum((x > y) if higher else (x < y) for x, y in pairs), len(pairs)

    checks = []
    for a, b in (("mask-aware LoRA", "naive LoRA"), ("no LoRA (mask-aware)", "no LoRA (stock TI2V)")):
        if {a, b} <= set(names):
            w, n = wins(a, b, "psnr_out")
            wi, _ = wins(a, b, "psnr_in")
            checks.append(f"{a} vs {b}: background PSNR {means[a]['psnr_out']:.2f} vs {means[b]['psnr_out']:.2f} dB "
                          f"(higher in {w}/{n} clips); edit PSNR in {means[a]['psnr_in']:.2f} vs {means[b]['psnr_in']:.2f} dB "
                          f"(higher in {wi}/{n}), colour error {means[a]['colour_err_in']:.1f} vs {means[b]['colour_err_in']:.1f}")
    table = format_metrics(means)
    times = "\n".join(f"{n:24s}{means[n]['seconds']:16.1f}" for n in results)
    header = (f"TI2V benchmark: {len(seeds)} clips (world seeds {seeds}), 17 frames 128x128, toy TI2V model {args.model} "
              f"({fam.name} layout, {fam.latent_channels}-channel VAE, {fam.token_cell}-pixel tokens); stage 1 {steps} steps, "
              f"lr {lr}, render {render_steps} steps, guidance {DEMO['guidance']}, shift {DEMO['shift']}; "
              f"{time.perf_counter() - t0:.0f} s")
    text = (f"{header}\n\n```\n{table}\n\nseconds per edit (wall, this machine)\n{times}\n```\n\n"
            + "\n".join(f"- {c}" for c in checks) + "\n")
    print("\n" + text)
    (out / "table.md").write_text(text)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(text)
        Path(args.results).with_suffix(".json").write_text(json.dumps(
            {"settings": settings, "means": means, "per_clip": {n: {str(k): r for k, r in d.items()} for n, d in rows.items()}},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
