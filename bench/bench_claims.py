#!/usr/bin/env python
"""The paper's claims, measured on the procedural world with the bundled toy model (CPU).

    python bench/bench_claims.py                 # 8 clips, every variant; prints a table
    python bench/bench_claims.py --clips 2 --steps 20 --render-steps 5   # a quick look

For each clip (fixed world seeds) the same edit — the moving object recoloured in frame 0 — is
propagated by `loraedit edit` in each variant below, with the same seeds and step counts, and the
result is compared with the world's true edited video:

    no LoRA (stock I2V)     --steps 0 --mode naive: the base model, conditioned on frame 0 only
    stock I2V from source   the same from the source's own first frame, scored against the source video
                            (is the base model an I2V model that holds a moving object together?)
    no LoRA (mask-aware)    --steps 0: the base model with the mask-aware condition (never trained on it)
    naive LoRA              --mode naive: LoRA on the video with the stock first-frame mask
    mask-aware LoRA         the method's stage 1 (loose box, grown 10%)
    mask-aware + reference  stage 1 + stage 2 on one edited later frame (the object's back face)
    mask-aware + reference pair  the same with --ref-sample pair: each reference trains after the edited
                            first frame, at its distance in time from it (not a lone still)
    mask-aware + tight mask stage 1 with the exact object mask (--mask-style tight)
    mask-aware + colour copies   stage 1 also on 2 hue-turned copies of the video (--colour-copies 2; ours,
                            not the paper's)
    the demo (+ ref + copies)    what `loraedit demo` runs: stage 1 with 2 colour copies, then stage 2

A first row, "(truth through the VAE)", is the true edited video encoded and decoded by the toy
VAE: the ceiling no variant can pass, since every result comes out of that decoder. A second,
"(frame 0 only, VAE)", is `world.first_frame_bound` through the VAE: the exact motion with the
object's back face painted as its front, the most any variant without a reference frame can know
(the back face has another hue, and only a reference shows it).

Metrics (loraedit/world.py `clip_metrics`), means over clips:
    PSNR in / colour err in — edit fidelity inside the object's true region (frames 1…F-1)
    colour err front / back — the same split by the face the frame shows (front: what frame 0 tells)
    PSNR back               — inside the region on frames that show the object's back face
    PSNR out                — background preservation outside the region
    frame-0 PSNR            — agreement with the edited first frame
    temporal err            — |frame-to-frame change of the result − that of the truth|, 0–255
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraedit  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY before torch loads OpenMP)

SEEDS = [101, 102, 103, 104, 105, 106, 107, 108]
VARIANTS = {
    "no LoRA (stock I2V)": dict(mode="naive", lora=False, reference=False),
    "no LoRA (mask-aware)": dict(mode="mask-aware", lora=False, reference=False),
    "naive LoRA": dict(mode="naive", lora=True, reference=False),
    "mask-aware LoRA": dict(mode="mask-aware", lora=True, reference=False),
    "mask-aware + reference": dict(mode="mask-aware", lora=True, reference=True),
    "mask-aware + reference pair": dict(mode="mask-aware", lora=True, reference=True, ref_sample="pair"),
    "mask-aware + colour copies": dict(mode="mask-aware", lora=True, reference=False, colour_copies=2),
    "the demo (+ ref + copies)": dict(mode="mask-aware", lora=True, reference=True, colour_copies=2),
    "mask-aware + tight mask": dict(mode="mask-aware", lora=True, reference=False, mask_style="tight"),
    "stock I2V from source": dict(mode="naive", lora=False, reference=False, source=True),
}
KEYS = ("psnr_in", "colour_err_in", "colour_err_front", "colour_err_back", "psnr_back", "psnr_out", "first_psnr",
        "temporal_err")


def nanmean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=len(SEEDS))
    ap.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: the demo's)")
    ap.add_argument("--ref-steps", type=int, default=None, help="stage-2 steps (default: the demo's)")
    ap.add_argument("--render-steps", type=int, default=None, help="sampling steps (default: the demo's)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--ref-video-every", type=int, default=None,
                    help="stage 2: every N-th step trains on the video (default: the demo's)")
    ap.add_argument("--edit-args", default="", help="more `loraedit edit` flags for every variant, e.g. \"--rank 4\" "
                    "(recorded with the results)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variant names")
    ap.add_argument("--model", default=None, help="default: the bundled toy model")
    ap.add_argument("--out", default="runs/bench_claims")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", default="0/1", help="I/N: measure only clips I, I+N, … (run N at once, then once "
                    "without --shard to print the table from all of them)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the VAE round-trip row")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run folder (default: only results)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from loraedit import cli
    from loraedit.demo import DEMO, TOY_MODEL, edit_argv, format_metrics, read_frames
    from loraedit.video import write_png
    from loraedit.world import clip_metrics, first_frame_bound, make_clip, through_vae, write_clip

    steps = DEMO["steps"] if args.steps is None else args.steps
    ref_steps = DEMO["ref_steps"] if args.ref_steps is None else args.ref_steps
    render_steps = DEMO["render_steps"] if args.render_steps is None else args.render_steps
    lr = DEMO["lr"] if args.lr is None else args.lr
    model = args.model or str(TOY_MODEL)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    shard, n_shards = (int(v) for v in args.shard.split("/"))
    results_file = out / ("results.json" if n_shards == 1 else f"results-{shard}of{n_shards}.json")
    ref_video_every = DEMO["ref_video_every"] if args.ref_video_every is None else args.ref_video_every
    settings = {"steps": steps, "ref_steps": ref_steps, "render_steps": render_steps, "lr": lr,
                "ref_video_every": ref_video_every, "edit_args": args.edit_args}
    for f in sorted(out.glob("results*.json")):  # resume, and collect what other shards measured
        old = json.loads(f.read_text())
        old_settings = dict(old.get("settings", {}))
        old_settings.setdefault("ref_video_every", 10)  # files from before the setting was recorded: the engine's
        old_settings.setdefault("edit_args", "")
        for n in names:
            # stage-2 settings matter only to the reference variants
            same = old_settings == settings if VARIANTS[n]["reference"] else all(
                old_settings.get(k) == settings[k] for k in settings if k not in ("ref_steps", "ref_video_every"))
            if same:
                results[n].update({int(k): v for k, v in old["per_clip"].get(n, {}).items()})
    t0 = time.perf_counter()
    for i, seed in enumerate(SEEDS[:args.clips]):
        if i % n_shards != shard or all(seed in results[n] for n in names):
            continue
        clip = make_clip(seed)
        inputs = dict(write_clip(clip, out / "clips" / str(seed)), reference_frame=clip.reference_frame)
        source_first = out / "clips" / str(seed) / "first_frame_source.png"
        write_png(source_first, clip.source[0])
        for name in names:
            if seed in results[name]:
                continue
            v = VARIANTS[name]
            run_dir = out / "runs" / f"{seed}-{name.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')}"
            shutil.rmtree(run_dir, ignore_errors=True)
            from_source = v.get("source", False)
            argv = edit_argv(dict(inputs, first_frame=source_first) if from_source else inputs, run_dir, model=model,
                             prompt=clip.caption if from_source else clip.edited_caption,
                             steps=steps if v["lora"] else 0, ref_steps=ref_steps, render_steps=render_steps,
                             seed=0, mode=v["mode"], mask_style=v.get("mask_style", "bbox"),
                             reference=v["reference"], lr=lr, ref_video_every=ref_video_every, quiet=True,
                             colour_copies=v.get("colour_copies", 0),
                             extra=(("--ref-sample", v["ref_sample"]) if "ref_sample" in v else ()) + tuple(shlex.split(args.edit_args)))
            t = time.perf_counter()
            rc = cli.main(argv)
            if rc != 0:
                print(f"clip {seed} {name}: edit failed (exit {rc})", file=sys.stderr)
                return rc
            result = read_frames(run_dir / "render" / "frames", clip.frames)
            # the source-frame row is scored against the source video (its "edit" is no edit)
            m = clip_metrics(result, dataclasses.replace(clip, truth=clip.source) if from_source else clip)
            m["seconds"] = time.perf_counter() - t
            results[name][seed] = m
            if not args.keep_runs:
                keep = out / "results" / str(seed)
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(run_dir / "render" / "contact_sheet.png", keep / f"{run_dir.name}.png")
                np.savez_compressed(keep / f"{run_dir.name}.npz", frames=result)  # to re-score without re-running
                shutil.rmtree(run_dir, ignore_errors=True)
            print(f"[{time.perf_counter() - t0:6.0f}s] clip {seed} {name:28s} "
                  + " ".join(f"{k}={m[k]:.2f}" for k in KEYS), flush=True)
            # the file keeps what it held for variants not run now (same settings), so a run of a few variants adds to it
            kept = {}
            if results_file.is_file() and json.loads(results_file.read_text()).get("settings") == settings:
                kept = {n: d for n, d in json.loads(results_file.read_text())["per_clip"].items() if n not in results}
            results_file.write_text(json.dumps({
                "settings": settings,
                "per_clip": {**kept, **{n: {str(k): r for k, r in d.items()} for n, d in results.items()}}}, indent=1))

    if n_shards > 1:
        print(f"shard {shard}/{n_shards} done; run again without --shard for the table")
        return 0
    # the ceiling every variant shares: the truth itself through the VAE (encode → decode)
    ceiling, bound = {}, {}
    if not args.no_ceiling:
        from diffusers import AutoencoderKLWan

        from loraedit.models import onednn_conv3d

        vae = onednn_conv3d(AutoencoderKLWan.from_pretrained(model, subfolder="vae").eval())
        for seed in SEEDS[:args.clips]:
            clip = make_clip(seed)
            ceiling[seed] = clip_metrics(through_vae(vae, clip.truth), clip)
            bound[seed] = clip_metrics(through_vae(vae, first_frame_bound(seed, frames=clip.frames)), clip)
        results = {"(truth through the VAE)": ceiling, "(frame 0 only, VAE)": bound, **results}
        names = ["(truth through the VAE)", "(frame 0 only, VAE)", *names]
    means = {n: {k: nanmean([r.get(k, math.nan) for r in results[n].values()]) for k in KEYS} for n in names}
    n_clips = min(args.clips, len(SEEDS))
    table = format_metrics(means)
    header = (f"claims benchmark: {n_clips} clips (world seeds {SEEDS[:n_clips]}), 17 frames 128x128, toy model; "
              f"stage 1 {steps} steps, stage 2 {ref_steps} steps (video every {ref_video_every}), lr {lr}, "
              f"render {render_steps} steps, guidance {DEMO['guidance']}"
              + (f", edit flags {args.edit_args}" if args.edit_args else "") + f"; {time.perf_counter() - t0:.0f} s")
    print("\n" + header + "\n" + table)

    def wins(a, b, key, higher=True):
        pairs = [(results[a][s][key], results[b][s][key]) for s in results[a] if s in results[b]]
        pairs = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
        return sum((x > y) if higher else (x < y) for x, y in pairs), len(pairs)

    checks = []
    if {"mask-aware LoRA", "naive LoRA"} <= set(names):
        w, n = wins("mask-aware LoRA", "naive LoRA", "psnr_out")
        checks.append(f"mask-aware beats naive on background PSNR in {w}/{n} clips "
                      f"({means['mask-aware LoRA']['psnr_out']:.2f} vs {means['naive LoRA']['psnr_out']:.2f} dB); "
                      f"edit PSNR in {means['mask-aware LoRA']['psnr_in']:.2f} vs {means['naive LoRA']['psnr_in']:.2f} dB")
    if {"mask-aware + reference", "mask-aware LoRA"} <= set(names):
        w, n = wins("mask-aware + reference", "mask-aware LoRA", "psnr_back")
        wc, _ = wins("mask-aware + reference", "mask-aware LoRA", "colour_err_back", higher=False)
        checks.append(f"a reference frame improves the back face in {w}/{n} clips by PSNR, {wc}/{n} by colour "
                      f"(PSNR back {means['mask-aware + reference']['psnr_back']:.2f} vs "
                      f"{means['mask-aware LoRA']['psnr_back']:.2f} dB, colour back "
                      f"{means['mask-aware + reference']['colour_err_back']:.1f} vs "
                      f"{means['mask-aware LoRA']['colour_err_back']:.1f})")
    if {"(frame 0 only, VAE)"} <= set(names):
        b0 = means["(frame 0 only, VAE)"]
        checks.append(f"without a reference no variant can pass the frame-0-only bound: colour err in "
                      f"{b0['colour_err_in']:.1f} (front {b0['colour_err_front']:.1f}, back {b0['colour_err_back']:.1f}), "
                      f"PSNR in {b0['psnr_in']:.2f} dB")
    if {"mask-aware + tight mask", "mask-aware LoRA"} <= set(names):
        w, n = wins("mask-aware LoRA", "mask-aware + tight mask", "psnr_in")
        checks.append(f"loose box ≥ tight mask on edit PSNR in {w}/{n} clips "
                      f"({means['mask-aware LoRA']['psnr_in']:.2f} vs {means['mask-aware + tight mask']['psnr_in']:.2f} dB)")
    if checks:
        print("\n" + "\n".join(checks))
    (out / "table.md").write_text(f"{header}\n\n```\n{table}\n```\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
