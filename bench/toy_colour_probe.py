#!/usr/bin/env python
"""Where a toy model loses the moving object's colour: three probes, each a few seconds on a CPU.

    python bench/toy_colour_probe.py                          # the bundled toy model
    python bench/toy_colour_probe.py --model runs/some_model  # any toy model folder

1. VAE code per latent frame: how far the (normalised) latent of a flat 5-frame colour moves when one
   RGB channel rises by 40, in latent frame 0 (frame 0 encoded alone) and latent frame 1 (frames 1-4).
   A channel that barely moves a latent frame is not stored there: a transformer cannot read it from
   the condition (frame 0) or must invent it (later frames).
2. VAE frame 0: the mean per-channel error of frame 0 and of frames 1-16 after encoding and decoding the
   true edited clips of the demo and the claims bench.
3. Stock I2V (no LoRA) on a *static* clip (frame 0 of the edited truth repeated): the object's mean
   colour in frames 0, 1, 2 and 4 of the result against the truth. The object does not move, so the
   colour is only a matter of carrying frame 0's forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loraedit  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY before torch loads OpenMP)
import numpy as np  # noqa: E402
import torch  # noqa: E402

TOY = Path(loraedit.__file__).resolve().parent / "toymodel"
CLIPS = [3, 101, 102, 103, 104, 105, 106, 107, 108]


def latent(vae, rgb, frames: int = 5) -> torch.Tensor:
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    x = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, frames, 64, 64) / 127.5 - 1
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode() / std


def channel_code(vae) -> list[str]:
    rows = []
    for base in [(128, 128, 128), (60, 180, 140), (200, 90, 200)]:
        z = latent(vae, base)
        cells = []
        for ch in range(3):
            up = list(base)
            up[ch] = min(255, up[ch] + 40)
            d = latent(vae, up) - z
            cells.append(f"{d[:, :, 0].norm():5.1f} / {d[:, :, 1].norm():5.1f}")
        rows.append(f"  {str(base):16s} R {cells[0]}   G {cells[1]}   B {cells[2]}")
    return rows


def frame0_bias(vae) -> list[str]:
    from loraedit.world import make_clip, through_vae

    rows = []
    for seed in CLIPS:
        c = make_clip(seed, frames=17)
        r = through_vae(vae, c.truth).astype(np.float64)
        d0 = (r[0] - c.truth[0]).reshape(-1, 3).mean(0)
        d1 = (r[1:] - c.truth[1:]).reshape(-1, 3).mean(0)
        rows.append(f"  clip {seed:3d}: frame 0 {np.array2string(d0, precision=1, sign=' ')}   "
                    f"frames 1-16 {np.array2string(d1, precision=1, sign=' ')}")
    return rows


def static_rollout(model: str, seeds) -> list[str]:
    from loraedit import cli
    from loraedit.demo import edit_argv, read_frames
    from loraedit.world import make_clip, write_clip

    rows = []
    for seed in seeds:
        c = make_clip(seed, frames=17)
        rep = lambda a: np.repeat(a[:1], 17, axis=0)  # noqa: E731
        c = dataclasses.replace(c, source=rep(c.source), truth=rep(c.truth), region=rep(c.region),
                                alpha=rep(c.alpha), front_visible=np.ones(17, bool))
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_clip(c, Path(tmp) / "inputs")
            argv = edit_argv(dict(paths, reference_frame=c.reference_frame), Path(tmp) / "run", model=model,
                             prompt=c.caption, steps=0, ref_steps=0, render_steps=20, quiet=True, mode="naive",
                             reference=False)
            if cli.main(argv) != 0:
                raise SystemExit(f"loraedit edit failed on clip {seed}")
            res = read_frames(Path(tmp) / "run" / "render" / "frames", 17)
        w = c.region[0]
        got = "  ".join(f"{i}: {res[i][w].mean(0).round().astype(int).tolist()}" for i in (0, 1, 2, 4))
        rows.append(f"  clip {seed:3d}: truth {c.truth[0][w].mean(0).round().astype(int).tolist()}   result {got}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TOY))
    ap.add_argument("--static-clips", default="3,104", help="world clips for probe 3 (comma-separated)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        static_clips = [int(s) for s in args.static_clips.split(",") if s.strip()]
    except ValueError:
        print(f"--static-clips {args.static_clips}: give world clip seeds separated by commas, e.g. 3,104",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if not (Path(args.model) / "vae" / "config.json").is_file():
        print(f"--model {args.model}: not a toy model folder (no vae/config.json); pass e.g. loraedit/toymodel",
              file=sys.stderr)
        return 2
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(Path(args.model) / "vae").eval()
    print("1. latent change (normalised L2) when one channel rises by 40: latent frame 0 / latent frame 1")
    print("\n".join(channel_code(vae)))
    print("\n2. VAE round trip, mean error per channel (R, G, B; 0-255)")
    print("\n".join(frame0_bias(vae)))
    print("\n3. stock I2V on a static clip: the object's mean colour (R, G, B) by frame")
    print("\n".join(static_rollout(args.model, static_clips)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
