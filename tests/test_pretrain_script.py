"""scripts/pretrain_toy.py reproduces its model from a seed: the same flags give the same bytes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--threads", "1", "--vae-steps", "2", "--vae-eval-every", "0", "--eval-clips", "1", "--vae-clips", "1",
         "--dit-clips", "2", "--dit-steps", "2", "--dec-steps", "1"]


def weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def pretrain(out: Path, seed: int) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_toy.py"), "--seed", str(seed), "--out", str(out),
                    *SMALL], check=True, capture_output=True, text=True)
    return out


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    from diffusers import WanImageToVideoPipeline

    a = pretrain(tmp_path / "a", 0)
    b = pretrain(tmp_path / "b", 0)
    c = pretrain(tmp_path / "c", 1)
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) != weights_digest(c)
    pipe = WanImageToVideoPipeline.from_pretrained(a)  # the real loading path
    assert pipe.transformer.config.in_channels == 36
    assert len(pipe.vae.config.latents_mean) == 16
