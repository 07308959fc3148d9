#!/usr/bin/env python
"""How much of one clip stage 1 learns on the toy model: the velocity error inside and outside the edit region.

    python bench/toy_lora_fit.py                      # world clip 101, the demo's LoRA (rank 16, lr 1e-4), 300 steps
    python bench/toy_lora_fit.py --full --lr 1e-4     # every weight trained instead of a LoRA
    python bench/toy_lora_fit.py --clip 3 --steps 600 --lr 1e-3

Stage 1 trains on the source video with the mask-aware condition: the background latents are in the
condition, the edit region is to be generated. This probe encodes a world clip through `loraedit edit`
(the engine's own cache), then trains the paper's objective on it one sample per step (as stage 1
does) and prints, every quarter of the steps, the mean squared velocity error at five fixed noise
levels, inside the region / outside it. The error a model has on a clip it was fitted to is what it
has not learnt of that clip; outside, it is learning to copy the background from the condition;
inside, the object's motion and look (the part an edit carries).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loraedit  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY before torch loads OpenMP)
import torch  # noqa: E402

SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", type=int, default=101, help="world seed (default 101, the claims bench's first)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--full", action="store_true", help="train every transformer weight, not a LoRA")
    ap.add_argument("--model", default=None, help="default: the bundled toy model")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from loraedit import cli, method
    from loraedit.demo import TOY_MODEL, edit_argv
    from loraedit.models import add_lora, lora_parameters
    from loraedit.train import make_optimizer, training_step
    from loraedit.world import make_clip, write_clip

    model = args.model or str(TOY_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(args.clip)
        inputs = dict(write_clip(clip, Path(tmp) / "clip"), reference_frame=clip.reference_frame)
        run = Path(tmp) / "run"  # --steps 0: prepare and encode (and a render without a LoRA), the cache is what we need
        rc = cli.main(edit_argv(inputs, run, model=model, prompt=clip.caption, steps=0, ref_steps=0, render_steps=1,
                                reference=False, quiet=True))
        if rc:
            return rc
        (cache,) = (run / "cache").glob("encoded-*.safetensors")
        c = load_file(str(cache))
    x0, cond, text, image = c["x0"], c["cond_train"], c["text"], c["image_train"]
    inside = 1.0 - cond[:, :4].mean(dim=1, keepdim=True)  # the mask channels: 1 keep, 0 generate
    print(f"clip {args.clip}: the edit region is {float(inside.mean()):.1%} of the latent cells")

    tr = WanTransformer3DModel.from_pretrained(model, subfolder="transformer")
    tr.requires_grad_(args.full)
    if not args.full:  # the engine's LoRA (seeded initialisation) and optimiser, as `loraedit train` builds them
        add_lora(tr, args.rank, float(args.rank), seed=0)
    params = list(lora_parameters(tr).values()) if not args.full else list(tr.parameters())
    opt = make_optimizer(params, args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(123)
    n = len(SIGMAS)
    ev_sigma, ev_noise = torch.tensor(SIGMAS), torch.randn((n, *x0.shape[1:]), generator=g)

    def errors() -> str:
        with torch.no_grad():
            xt, v = method.noisy_latents(x0.expand(n, -1, -1, -1, -1), ev_noise, ev_sigma)
            pred = method.predict_velocity(tr, xt, cond.expand(n, -1, -1, -1, -1), ev_sigma, text.expand(n, -1, -1),
                                           image.expand(n, -1, -1))
            e = (pred - v).pow(2).mean(dim=1, keepdim=True)
            m = inside.expand_as(e)
            e_in = (e * m).sum(dim=(1, 2, 3, 4)) / m.sum(dim=(1, 2, 3, 4))
            e_out = (e * (1 - m)).sum(dim=(1, 2, 3, 4)) / (1 - m).sum(dim=(1, 2, 3, 4))
        return "  ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(e_in.tolist(), e_out.tolist()))

    what = "every weight" if args.full else f"LoRA rank {args.rank}"
    print(f"{what}, lr {args.lr:g}; velocity error inside/outside the region at σ = {', '.join(map(str, SIGMAS))}")
    print(f"step {0:5d}: {errors()}", flush=True)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(1, args.steps + 1):  # loraedit/train.py's step: one σ, uniform (the paper), grad clip 1
        sigma = method.sample_sigma(1, "uniform", gen)
        noise = torch.randn(x0.shape, generator=gen)
        training_step(tr, opt, x0, cond, text, image, sigma, noise, grad_clip=1.0)
        if step % max(args.steps // 4, 1) == 0 or step == args.steps:
            print(f"step {step:5d}: {errors()}  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
