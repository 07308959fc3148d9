"""Shared fixtures: a tiny random Wan2.1-I2V model saved in the real diffusers layout, and a
small synthetic clip with its edited first frame, mask and an edited later frame."""

from __future__ import annotations

import os

# before torch loads OpenMP: sleeping, not spinning, worker threads (see loraedit/__init__.py), so the
# suite does not crawl when anything else runs on a small machine; a value set by the caller is kept
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from loraedit.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-wan-i2v")


def make_clip(folder, frames=24, height=64, width=96, fps=12):
    """A red square moving right over a textured background; the edit turns it blue."""
    from loraedit.video import write_png, write_video

    rng = np.random.default_rng(0)
    bg = (rng.random((height, width, 3)) * 80 + 60).astype(np.uint8)
    video, masks = [], []
    for i in range(frames):
        f = bg.copy()
        x = 10 + 2 * i
        f[20:40, x : x + 16] = (200, 40, 40)
        m = np.zeros((height, width), np.uint8)
        m[20:40, x : x + 16] = 255
        video.append(f)
        masks.append(m)
    video = np.stack(video)
    edited = video[0].copy()
    edited[20:40, 10:26] = (40, 40, 220)
    ref = video[8].copy()
    ref[20:40, 26:42] = (40, 40, 220)
    paths = {
        "video": folder / "clip.mp4", "mask": folder / "mask.mkv", "first_frame": folder / "edited.png",
        "ref": folder / "ref8.png",
    }
    write_video(paths["video"], video, fps)
    write_video(paths["mask"], np.stack(masks), fps, lossless=True)
    write_png(paths["first_frame"], edited)
    write_png(paths["ref"], ref)
    return paths


@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip"))


def edit_argv(tiny_model, clip, out, *extra):
    return ["edit", "--model", str(tiny_model), "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]),
            "--mask", str(clip["mask"]), "--out", str(out), "--frames", "17", "--size", "96x64", "--steps", "4",
            "--render-steps", "2", "--device", "cpu", "-q", *extra]


def require_data(path) -> None:
    """Real footage: skipped on a developer's machine without it, a failure in CI (which has it)."""
    import os
    from pathlib import Path

    if not Path(path).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI: the real-footage tests must run there")
        pytest.skip(f"{path} is not here")
