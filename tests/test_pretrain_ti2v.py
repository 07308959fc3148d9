"""scripts/pretrain_toy_ti2v.py makes a TI2V folder that loraedit and diffusers load as Wan2.2-TI2V."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "pretrain_toy_ti2v.py")
SMALL = ["--device", "cpu", "--threads", "1", "--workers", "1", "--layers", "1", "--heads", "2", "--head-dim", "8",
         "--ffn", "16", "--dit-clips", "2", "--dit-variants", "1", "--encode-batch", "2", "--dit-batch", "2",
         "--eval-clips", "1", "--eval-render-steps", "1", "--log-every", "1"]


def test_pretrain_writes_only_new_parts_assembles_and_loads_as_ti2v(tmp_path, tiny_model):
    from diffusers import WanImageToVideoPipeline

    from loraedit import family, method
    from loraedit.encode import encode_video, to_video_tensor
    from loraedit.models import check_model, load_scheduler

    new = tmp_path / "new"
    r = subprocess.run([sys.executable, SCRIPT, "--init-from", str(tiny_model), "--out", str(new), "--frozen", "none",
                        "--log", str(new / "train.log"), "--dit-steps", "3", "--dit-warmup", "2", "--check-determinism", "2",
                        *SMALL], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # only what is new: no copy of the parts --init-from gives
    assert sorted(p.name for p in new.iterdir()) == ["model_index.json", "train.log", "training.json", "transformer"]
    summary = json.loads((new / "training.json").read_text())
    assert summary["determinism_check"]["identical"] is True and summary["dit_steps_run"] == 3
    assert set(summary["rollout_after"]) == {"stock, from source frame 0", "stock, from edited frame 0",
                                             "mask-aware, from edited frame 0"}
    weights = new / "transformer" / "diffusion_pytorch_model.safetensors"
    assert summary["weights_sha256"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert "DiT done: 3 of 3 steps" in (new / "train.log").read_text()

    full = tmp_path / "toy-ti2v"
    r = subprocess.run([sys.executable, SCRIPT, "--assemble", str(new), "--init-from", str(tiny_model), "--out", str(full)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (tiny_model / part).iterdir():
            assert (full / part / f.name).read_bytes() == f.read_bytes()
    check_model(str(full))
    fam = family.detect(full)
    assert (fam.name, fam.expand_timesteps, fam.latent_channels, fam.spatial, fam.has_clip) == (family.TI2V, True, 16, 8, False)

    # diffusers' own expand_timesteps path on this folder = our sampler with the stock TI2V condition
    pipe = WanImageToVideoPipeline.from_pretrained(full)
    assert pipe.config.expand_timesteps and pipe.transformer.config.in_channels == 16
    F, H, W, steps = 5, 32, 32, 2
    rgb = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    from PIL import Image

    pipe.scheduler = load_scheduler(str(full), shift=5.0)
    theirs = pipe(image=Image.fromarray(rgb), prompt="a red circle", height=H, width=W, num_frames=F, num_inference_steps=steps,
                  guidance_scale=1.0, generator=torch.Generator().manual_seed(3), output_type="latent").frames
    with torch.no_grad():
        text = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False, max_sequence_length=512,
                                  device=torch.device("cpu"))[0]
        y = encode_video(pipe.vae, to_video_tensor(rgb[None]))
    T, h, w = fam.latent_frames(F), H // 8, W // 8
    cond = method.ti2v_condition(torch.cat([y, torch.zeros(1, 16, T - 1, h, w)], dim=2), method.ti2v_stock_keep(F, h, w))
    noise = torch.randn(1, 16, T, h, w, generator=torch.Generator().manual_seed(3))
    ours = method.sample_latents(pipe.transformer, load_scheduler(str(full), shift=5.0), noise, cond, text, None, None, steps, 1.0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_bad_init_folder_is_one_line():
    r = subprocess.run([sys.executable, SCRIPT, "--init-from", "/nonexistent", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "--init-from /nonexistent: not a model folder" in r.stderr
