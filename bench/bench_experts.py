#!/usr/bin/env python
"""What `--experts low` costs, measured on the toy world (CPU): a LoRA on both experts of a
two-expert model vs on the low-noise expert only.

    python bench/bench_experts.py                       # 4 clips; prints a table, writes OUT/table.md
    python bench/bench_experts.py --clips 2 --steps 40  # a quick look

There is no small Wan2.2-I2V-A14B. The stand-in is the bundled toy model (Wan2.1 layout) saved as a
two-expert folder: `transformer` and `transformer_2` both hold the toy transformer, with A14B's
boundary_ratio 0.9. The two experts therefore start from the same weights, so this measures what
the high-noise expert's LoRA (trained on σ ≥ 0.9, used for the render's first, noisiest steps)
adds to the low-noise expert's — not how the real A14B's two differently pre-trained experts
behave. Each variant is `loraedit edit` (mask-aware, stage 1 only) with the demo's settings, scored
against the world's true edit (loraedit/world.py clip_metrics; PSNR in = inside the object).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraedit  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY before torch loads OpenMP)

SEEDS = [101, 102, 103, 104, 105, 106, 107, 108]
VARIANTS = {"both experts": ["--experts", "both"], "low-noise expert only": ["--experts", "low"]}
KEYS = ("psnr_in", "colour_err_in", "psnr_out", "first_psnr", "temporal_err")


def two_expert_toy(folder: Path) -> Path:
    """The toy model as a two-expert (A14B-layout) folder: the same transformer as both experts."""
    from loraedit.demo import TOY_MODEL

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(TOY_MODEL, tmp)
    shutil.copytree(tmp / "transformer", tmp / "transformer_2")
    index = json.loads((tmp / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.9)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(folder)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="stage-1 steps per expert (default: the demo's)")
    ap.add_argument("--render-steps", type=int, default=None)
    ap.add_argument("--out", default="runs/bench_experts")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from loraedit import cli
    from loraedit.demo import DEMO, edit_argv, format_metrics, read_frames
    from loraedit.world import clip_metrics, make_clip, write_clip

    steps = DEMO["steps"] if args.steps is None else args.steps
    render_steps = DEMO["render_steps"] if args.render_steps is None else args.render_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(two_expert_toy(out / "toy-two-experts"))
    results: dict[str, dict[int, dict]] = {n: {} for n in VARIANTS}
    t0 = time.perf_counter()
    for seed in SEEDS[: args.clips]:
        clip = make_clip(seed)
        inputs = dict(write_clip(clip, out / "clips" / str(seed)), reference_frame=clip.reference_frame)
        for name, extra in VARIANTS.items():
            run_dir = out / "runs" / f"{seed}-{extra[-1]}"
            shutil.rmtree(run_dir, ignore_errors=True)
            argv = edit_argv(inputs, run_dir, model=model, prompt=clip.edited_caption, steps=steps, ref_steps=0,
                             render_steps=render_steps, reference=False, quiet=True, extra=extra)
            t = time.perf_counter()
            if cli.main(argv) != 0:
                print(f"clip {seed} {name}: edit failed", file=sys.stderr)
                return 1
            m = clip_metrics(read_frames(run_dir / "render" / "frames", clip.frames), clip)
            m["seconds"] = time.perf_counter() - t
            results[name][seed] = m
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"[{time.perf_counter() - t0:6.0f}s] clip {seed} {name:22s} "
                  + " ".join(f"{k}={m[k]:.2f}" for k in KEYS) + f" ({m['seconds']:.0f} s)", flush=True)
    means = {n: {k: float(np.nanmean([r[k] for r in results[n].values()])) for k in (*KEYS, "seconds")} for n in VARIANTS}
    wins = sum(results["both experts"][s]["psnr_in"] > results["low-noise expert only"][s]["psnr_in"] for s in results["both experts"])
    header = (f"--experts both vs low on the toy world: {args.clips} clips (seeds {SEEDS[:args.clips]}), 17 frames 128x128, "
              f"toy model as both experts (boundary 0.9), stage 1 {steps} steps per expert, render {render_steps} steps")
    table = format_metrics({n: means[n] for n in VARIANTS})
    seconds = " · ".join(f"{n}: {means[n]['seconds']:.0f} s per edit" for n in VARIANTS)
    verdict = f"both experts beat the low-noise expert alone on PSNR in {wins}/{len(results['both experts'])} clips"
    print(f"\n{header}\n{table}\n{seconds}\n{verdict}")
    (out / "table.md").write_text(f"{header}\n\n```\n{table}\n```\n\n{seconds}\n\n{verdict}\n")
    (out / "results.json").write_text(json.dumps({n: {str(k): v for k, v in d.items()} for n, d in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
