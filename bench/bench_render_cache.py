"""What --render-cache first-block costs in quality and gives in speed, on the toy world (CPU, no downloads).

    python bench/bench_render_cache.py --out bench/results/render_cache            # 3 clips, ~5 min on 2 cores
    python bench/bench_render_cache.py --clips 1 --steps 0 --render-steps 10 ...   # quicker

For each world clip: a LoRA trained for --steps on it with the bundled toy model (the demo's
settings; --steps 0 renders the base model with the same mask-aware condition), rendered once
uncached and once per cache threshold, all from the same seed. Reported per render: PSNR against
the uncached render (what the cache changed) and against the world's true edited video (inside the
edited region, and outside it), the share of denoiser calls that ran every block (the rest reused
the cache after the first block), and the mean sampling step time (steps 2 on). Prints a table and writes
results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clips", type=int, default=3, help="world clips (seeds 3, 4, …)")
    ap.add_argument("--steps", type=int, default=60, help="LoRA steps per clip (0: the base model)")
    ap.add_argument("--render-steps", type=int, default=20, help="sampling steps (default 20, the demo's)")
    ap.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default 1, the demo's: the toy model is not trained for CFG)")
    ap.add_argument("--thresholds", default="0.05,0.1,0.2", help="first-block cache thresholds to compare")
    a = ap.parse_args()

    import numpy as np

    from loraedit import cli
    from loraedit.demo import DEMO, DEMO_SEED, TOY_MODEL, edit_argv, read_frames
    from loraedit.files import read_json, write_json
    from loraedit.world import clip_metrics, make_clip, psnr, write_clip

    out = Path(a.out)
    thresholds = [float(t) for t in a.thresholds.split(",")]
    rows = []
    for k in range(a.clips):
        seed = DEMO_SEED + k
        clip = make_clip(seed, frames=DEMO["frames"])
        inputs = dict(write_clip(clip, out / f"clip{seed}" / "inputs"), reference_frame=clip.reference_frame)
        run = out / f"clip{seed}" / "run"
        argv = edit_argv(inputs, run, model=str(TOY_MODEL), prompt=clip.caption, edit_prompt=clip.edited_caption, steps=a.steps,
                         ref_steps=0, render_steps=a.render_steps, quiet=True, extra=["--guidance", str(a.guidance)])
        if cli.main(argv) != 0:
            return 1
        renders = {"uncached": run / "render"}
        for t in thresholds:
            name = f"cache-{t:g}"
            if cli.main(["render", "--out", str(run), "--name", name, "--render-cache", "first-block",
                         "--render-cache-threshold", str(t), "-q"]) != 0:
                return 1
            renders[name] = run / name
        manifest = read_json(run / "manifest.json")["stages"]
        base = read_frames(renders["uncached"] / "frames", clip.frames)
        for name, folder in renders.items():
            frames = read_frames(folder / "frames", clip.frames)
            fig = manifest[folder.name]["figures"] if "figures" in manifest[folder.name] else manifest[folder.name]
            m = clip_metrics(frames, clip)
            calls, full = fig.get("render_cache_calls"), fig.get("render_cache_full_calls")
            rows.append({"clip": seed, "render": name, "psnr_vs_uncached": psnr(frames, base), "psnr_in": m["psnr_in"],
                         "psnr_out": m["psnr_out"], "colour_err_in": m["colour_err_in"],
                         "full_calls": 1.0 if calls is None else full / max(1, calls),
                         "s_per_step": fig.get("seconds_per_step")})
            r = rows[-1]
            print(f"clip {seed} {name:12} vs uncached {r['psnr_vs_uncached']:5.1f} dB  truth in {r['psnr_in']:5.2f} out {r['psnr_out']:5.2f} dB  "
                  f"full calls {r['full_calls']:4.0%}  {r['s_per_step'] * 1000:6.1f} ms/step", flush=True)
    summary = {}
    for name in ["uncached"] + [f"cache-{t:g}" for t in thresholds]:
        rs = [r for r in rows if r["render"] == name]
        summary[name] = {k: float(np.mean([r[k] for r in rs])) for k in ("psnr_vs_uncached", "psnr_in", "psnr_out", "colour_err_in",
                                                                           "full_calls", "s_per_step")}
    print(f"\n{'render':12} {'PSNR vs uncached':>17} {'PSNR in':>8} {'PSNR out':>9} {'colour err':>10} {'full calls':>10} {'ms/step':>8}")
    for name, s in summary.items():
        print(f"{name:12} {s['psnr_vs_uncached']:14.1f} dB {s['psnr_in']:8.2f} {s['psnr_out']:9.2f} {s['colour_err_in']:10.1f} "
              f"{s['full_calls']:10.0%} {s['s_per_step'] * 1000:8.1f}")
    write_json(out / "results.json", {"settings": vars(a), "rows": rows, "summary": summary, "torch_threads": os.environ.get("OMP_NUM_THREADS"),
                                      "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
