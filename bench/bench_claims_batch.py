#!/usr/bin/env python
"""The toy world's claims comparison run the way a user runs many edits: `loraedit batch` + `loraedit eval`.

    python bench/bench_claims_batch.py                          # 8 clips × 6 variants, one after another
    python bench/bench_claims_batch.py --ray local              # the same as Ray tasks on this machine's cores
    python bench/bench_claims_batch.py --clips 2 --steps 20 --render-steps 5   # a quick look

It writes the world clips and one batch file (OUT/claims.toml: a [[job]] per clip, the variants of
bench/bench_claims.py as [[job.variant]] tables), runs `loraedit batch` on it (rerunning the command
redoes only what is not done), and then reads each job's `loraedit eval` figures (batch.json) next to
the world's ground truth (world.clip_metrics against the true edited video). Two tables:

    ground truth   PSNR in / colour err in / PSNR back / PSNR out / temporal err (world.clip_metrics)
    eval           PSNR out / SSIM out vs the source, frame-0 PSNR, warp error (no truth needed)

and how often eval's truth-free background figure ranks two variants of a clip as the truth does.
The true edit itself is scored by `loraedit eval` as a first row (what a perfect result gets).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEEDS = [101, 102, 103, 104, 105, 106, 107, 108]
# name → the settings the variant changes (the same six as bench/bench_claims.py)
VARIANTS = {
    "no-lora-stock": {"steps": 0, "mode": "naive"},
    "no-lora-mask-aware": {"steps": 0},
    "naive": {"mode": "naive"},
    "mask-aware": {},
    "mask-aware-ref": {"ref": True},
    "mask-aware-tight": {"mask-style": "tight"},
}
TRUTH_KEYS = ("psnr_in", "colour_err_in", "psnr_back", "psnr_out", "temporal_err")
EVAL_KEYS = ("psnr_out", "ssim_out", "first_psnr", "warp_err")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_jobs(out: Path, clips: list, settings: dict, names: list[str]) -> Path:
    """OUT/claims.toml: shared settings on top, a [[job]] per clip, a [[job.variant]] per variant."""
    from loraedit.world import write_clip

    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    for clip in clips:
        paths = write_clip(clip, out / "clips" / str(clip.seed))
        lines += ["", "[[job]]", f'name = "world{clip.seed}"', f"video = {toml_value(paths['source_lossless'])}",
                  f"first-frame = {toml_value(paths['first_frame'])}", f"mask = {toml_value(paths['mask'])}",
                  f"prompt = {toml_value(clip.edited_caption)}"]
        for name in names:
            lines += ["[[job.variant]]", f'name = "{name}"']
            for k, v in VARIANTS[name].items():
                if k == "ref":
                    lines.append(f"ref = {{ {clip.reference_frame} = {toml_value(paths['reference'])} }}")
                else:
                    lines.append(f"{k} = {toml_value(v)}")
    f = out / "claims.toml"
    f.write_text("\n".join(lines) + "\n")
    return f


def nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else float("nan")


def table(rows: dict[str, dict], keys) -> str:
    head = "| variant | " + " | ".join(keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.2f}" if k != "ssim_out" else f"{m.get(k, float('nan')):.3f}"
                                                 for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=len(SEEDS))
    ap.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: the demo's)")
    ap.add_argument("--ref-steps", type=int, default=None, help="stage-2 steps (default: the demo's)")
    ap.add_argument("--render-steps", type=int, default=None, help="sampling steps (default: the demo's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--ray", default=None, help="passed to `loraedit batch --ray` (auto, ADDRESS or local)")
    ap.add_argument("--out", default="runs/bench_claims_batch")
    args = ap.parse_args(argv)

    from loraedit.cli import main as loraedit
    from loraedit.demo import DEMO, TOY_MODEL, read_frames
    from loraedit.evaluate import load_video, score
    from loraedit.files import read_json
    from loraedit.video import write_video
    from loraedit.world import clip_metrics, make_clip

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clips = [make_clip(s, frames=DEMO["frames"]) for s in SEEDS[:args.clips]]
    settings = {
        "model": str(TOY_MODEL), "frames": DEMO["frames"], "size": DEMO["size"], "rank": DEMO["rank"],
        "lr": DEMO["lr"], "steps": DEMO["steps"] if args.steps is None else args.steps,
        "ref-steps": DEMO["ref_steps"] if args.ref_steps is None else args.ref_steps,
        "render-steps": DEMO["render_steps"] if args.render_steps is None else args.render_steps,
        "guidance": DEMO["guidance"], "shift": DEMO["shift"], "seed": 0, "device": "cpu", "mode": "mask-aware",
    }
    jobs = write_jobs(out, clips, settings, names)
    t0 = time.perf_counter()
    rc = loraedit(["batch", str(jobs), "--out", str(out / "runs"), *(["--ray", args.ray] if args.ray else [])])
    seconds = time.perf_counter() - t0
    records = {j["name"]: j for j in read_json(out / "runs" / "batch.json")["jobs"]}

    truth_rows: dict[str, dict[int, dict]] = {n: {} for n in names}
    eval_rows: dict[str, dict[int, dict]] = {"(true edit)": {}, **{n: {} for n in names}}
    for clip in clips:
        for n in names:
            rec = records.get(f"world{clip.seed}.{n}")
            if not rec or rec["status"] != "done":
                continue
            run = out / "runs" / rec["name"]
            truth_rows[n][clip.seed] = clip_metrics(read_frames(run / rec.get("render", "render") / "frames", clip.frames), clip)
            eval_rows[n][clip.seed] = rec["metrics"]
        done = [records[f"world{clip.seed}.{n}"] for n in names if records.get(f"world{clip.seed}.{n}", {}).get("status") == "done"]
        if done:  # the true edit, scored by eval on the same prepared inputs
            video = out / "clips" / str(clip.seed) / "truth.mkv"
            if not video.is_file():
                write_video(video, clip.truth, clip.fps, lossless=True)
            eval_rows["(true edit)"][clip.seed] = score(load_video(video, out / "runs" / done[0]["name"], None, None, None))

    truth_means = {n: {k: nanmean([r[k] for r in rows.values()]) for k in TRUTH_KEYS} for n, rows in truth_rows.items()}
    eval_means = {n: {k: nanmean([r[k] for r in rows.values()]) for k in EVAL_KEYS} for n, rows in eval_rows.items()}

    # does eval's truth-free background PSNR order two variants of a clip as the truth's does?
    agree = total = 0
    for a, b in itertools.combinations(names, 2):
        for seed in truth_rows[a].keys() & truth_rows[b].keys():
            d_truth = truth_rows[a][seed]["psnr_out"] - truth_rows[b][seed]["psnr_out"]
            d_eval = eval_rows[a][seed]["psnr_out"] - eval_rows[b][seed]["psnr_out"]
            if abs(d_truth) >= 0.1:
                total += 1
                agree += np.sign(d_truth) == np.sign(d_eval)

    header = (f"claims through `loraedit batch` + `loraedit eval`: {len(clips)} clips (world seeds "
              f"{[c.seed for c in clips]}), {DEMO['frames']} frames {DEMO['size']}, toy model; stage 1 {settings['steps']} "
              f"steps, stage 2 {settings['ref-steps']}, render {settings['render-steps']} steps; batch "
              f"{'--ray ' + args.ray if args.ray else 'sequential'}: {seconds:.0f} s (batch exit {rc})")
    text = (f"{header}\n\nground truth (world.clip_metrics against the true edited video):\n\n{table(truth_means, TRUTH_KEYS)}\n\n"
            f"loraedit eval (against the source, no truth needed):\n\n{table(eval_means, EVAL_KEYS)}\n\n"
            f"eval's PSNR out orders two variants of a clip as the truth's does in {agree}/{total} pairs "
            f"(pairs the truth separates by ≥ 0.1 dB)\n")
    print("\n" + text)
    (out / "table.md").write_text(text)
    return 0 if rc in (0, 1) else rc


if __name__ == "__main__":
    sys.exit(main())
