"""Stage 1 of 4 — prepare: pick and fit the frames, find the edit region, store it all losslessly.

Reads the user's files once; everything later reads only the run folder:
    prepare/source/NNN.png      the F selected source frames at the target size
    prepare/first_frame.png     the edited first frame at the target size
    prepare/region/NNN.png      the edit region of each frame (white = edit)
    prepare/refs/NNN.png        edited later frames (appearance references), by frame index
    prepare/plan.json           frame indices, fps, size, reference indices
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from loraedit import masks
from loraedit.settings import PrepareSettings
from loraedit.files import read_json, write_json
from loraedit.video import default_size, fit_edited, fit_to_size, frame_indices, parse_size, probe_video, read_image, read_video_frames, write_png

log = logging.getLogger("loraedit")


def run(args: PrepareSettings, run_dir: Path) -> dict:
    """Write prepare/ for `args`; returns the plan."""
    args.check_files()
    info = probe_video(args.video)
    width, height = parse_size(args.size) if args.size else default_size(info.width, info.height)
    indices = frame_indices(info.n_frames, args.frames, args.start, args.stride, path=args.video, times=info.times)
    frames = np.stack([fit_to_size(f, width, height) for f in read_video_frames(args.video, indices)])
    first = fit_edited(read_image(args.first_frame), width, height, info.width, info.height, args.first_frame)
    if np.abs(first.astype(np.int16) - frames[0].astype(np.int16)).mean() < 0.5:
        log.warning("%s: looks the same as the video's first frame; is it the edited one?", args.first_frame)
    refs = args.ref
    regions = masks.edit_regions(frames, first, args.mask_options(), indices, info.n_frames)
    if regions.shape != frames.shape[:3]:
        raise RuntimeError(f"edit region shape {regions.shape} does not match frames {frames.shape[:3]}")

    out = run_dir / "prepare"
    for i, (f, r) in enumerate(zip(frames, regions)):
        write_png(out / "source" / f"{i:03d}.png", f)
        write_png(out / "region" / f"{i:03d}.png", r.astype(np.uint8) * 255)
    write_png(out / "first_frame.png", first)
    for k, path in refs.items():
        write_png(out / "refs" / f"{k:03d}.png", fit_edited(read_image(path), width, height, info.width, info.height, path))
    step = (indices[-1] - indices[0]) / max(1, len(indices) - 1) if len(indices) > 1 else 1.0
    plan = {
        "frames": args.frames, "width": width, "height": height, "indices": indices, "source_frames": info.n_frames, "source_width": info.width, "source_height": info.height,
        "source_fps": info.fps, "fps": info.fps / max(step, 1e-9), "has_audio": info.has_audio,
        "refs": sorted(refs), "region_fraction": float(regions.mean()),
    }
    write_json(out / "plan.json", plan)
    return plan


def load(run_dir: Path) -> dict:
    """The prepared run as arrays: source (F,H,W,3), first (H,W,3), region (F,H,W) bool, refs {k: (H,W,3)}."""
    from loraedit.video import read_gray

    out = run_dir / "prepare"
    plan = read_json(out / "plan.json")
    F = plan["frames"]
    return {
        "plan": plan,
        "source": np.stack([read_image(out / "source" / f"{i:03d}.png") for i in range(F)]),
        "first": read_image(out / "first_frame.png"),
        "region": np.stack([read_gray(out / "region" / f"{i:03d}.png") > 127 for i in range(F)]),
        "refs": {k: read_image(out / "refs" / f"{k:03d}.png") for k in plan["refs"]},
    }
