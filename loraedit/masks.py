"""The edit region: from the user's mask input to one boolean region per selected frame.

Interface used by the prepare stage:
    add_mask_arguments(parser)            the mask flags shared by `edit` and `masks`
    mask_options_from_args(args)          → MaskOptions
    edit_regions(frames, first_frame, opts, indices, n_source) → (F, H, W) bool, True = edit
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from loraedit.errors import InputError
from loraedit.video import fit_to_size, probe_video, read_gray, read_video_frames

MASK_STYLES = ("bbox", "tight")


@dataclass
class MaskOptions:
    mask: str | None = None  # mask video, folder of PNG frames, or one PNG for every frame
    style: str = "bbox"
    grow: float = 0.10  # bbox style: grow each region's box by this fraction of its size


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("edit region")
    g.add_argument("--mask", help="mask video, folder of PNG frames, or one PNG (white = edit region)")
    g.add_argument("--mask-style", dest="mask_style", choices=MASK_STYLES, default="bbox",
                   help="bbox: loose box around each region (default); tight: as given")
    g.add_argument("--grow", type=float, default=0.10, help="bbox style: grow each box by this fraction (default 0.10)")


def mask_options_from_args(args) -> MaskOptions:
    return MaskOptions(mask=args.mask, style=args.mask_style, grow=args.grow)


def _read_mask_frames(path: Path, indices: list[int], n_source: int) -> list[np.ndarray]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise InputError(f"{path}: folder holds no PNG mask frames")
        # a folder of as many frames as the source maps index to index, otherwise by time
        picked = [files[min(len(files) - 1, round(i * (len(files) - 1) / max(1, n_source - 1)))] if len(files) != n_source else files[i] for i in indices]
        return [read_gray(p) for p in picked]
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
        return [read_gray(path)] * len(indices)
    info = probe_video(path)
    if info.n_frames == n_source:
        mapped = indices
    else:
        mapped = [min(info.n_frames - 1, round(i * (info.n_frames - 1) / max(1, n_source - 1))) for i in indices]
    rgb = read_video_frames(path, mapped)
    return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]


def boxes_around(region: np.ndarray, grow: float) -> np.ndarray:
    """(H, W) bool → the union of each connected region's bounding box, grown by `grow`."""
    H, W = region.shape
    n, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    out = np.zeros_like(region, dtype=bool)
    for x, y, w, h, _area in stats[1:n]:
        dx, dy = round(w * grow / 2), round(h * grow / 2)
        out[max(0, y - dy) : min(H, y + h + dy), max(0, x - dx) : min(W, x + w + dx)] = True
    return out


def edit_regions(frames: np.ndarray, first_frame: np.ndarray, opts: MaskOptions, indices: list[int], n_source: int) -> np.ndarray:
    """The edit region of every selected frame, (F, H, W) bool, True = edit."""
    F, H, W = frames.shape[:3]
    if opts.mask is None:
        raise InputError("no edit region given: pass --mask (a mask video, PNG folder or PNG; white = edit region)")
    path = Path(opts.mask)
    if not path.exists():
        raise InputError(f"{path}: no such mask file or folder; check --mask")
    raw = _read_mask_frames(path, indices, n_source)
    regions = np.stack([fit_to_size(m, W, H, nearest=True) > 127 for m in raw])
    if not regions.any():
        raise InputError(f"{path}: the mask is empty (no white pixels); paint the edit region white")
    if opts.style == "bbox":
        regions = np.stack([boxes_around(r, opts.grow) for r in regions])
    return regions
