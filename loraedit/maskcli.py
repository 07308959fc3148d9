"""`loraedit masks`: compute the edit regions and write them out to look at before training.

    loraedit masks --video in.mp4 --first-frame edited.png --out DIR [--model MODEL] [mask flags]

DIR/masks/NNNN.png      one mask per selected frame (white = edit), at the working size
DIR/masks.mkv           the same masks as a lossless (FFV1) video
DIR/overlay.mp4         the frames with the region tinted and outlined (H.264, to watch)
DIR/contact_sheet.png   a grid of overlay frames with their numbers
DIR/masks.json          what was selected (frames, size, source indices), the shots and scene cuts over them, and what
                        moved the region in each frame — written last, so its
                        presence marks a complete folder; `loraedit edit --masks DIR` checks it
It takes the same frame-selection and size flags as `loraedit edit`, and --model: with the model `edit`
will use, the default size and frame rate are that model's (its bucket: 832x480, 1280x720, 1280x704),
so the masks line up with the frames `edit` trains on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np

from loraedit import masks, prepare, settings, shots
from loraedit.errors import InputError
from loraedit.files import sha256_path, write_json
from loraedit.video import fit_edited, fit_to_size, probe_video, read_edited, read_video_frames, write_png, write_video

log = logging.getLogger("loraedit")

TINT = np.array([255, 40, 40], np.float32)


def register(subparsers) -> None:
    help = "find the edit region of every frame and write masks, an overlay video and a contact sheet to check"
    p = subparsers.add_parser("masks", help=help, description=help)
    p.add_argument("--video", default=None, help="source video")
    p.add_argument("--first-frame", dest="first_frame", default=None, help="the edited first frame (needed for the automatic region)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, type=settings.model_path,
                   help="the Wan I2V model folder `edit` will use: the default size and frame rate are its own "
                        "(default: Wan2.1-480P's)")
    prepare.add_footage_arguments(p)  # the same frames and size as `loraedit edit`
    p.set_defaults(frames=None)  # unset: the model's own count, as `edit` takes it (run_masks)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    masks.add_mask_arguments(p)
    p.set_defaults(func=run_masks)


def overlay(frames: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Frames with the region tinted red and its outline drawn."""
    out = frames.astype(np.float32)
    r = regions[..., None]
    out = np.where(r, 0.55 * out + 0.45 * TINT, out)
    out = out.astype(np.uint8)
    for f, reg in zip(out, regions):
        contours, _ = cv2.findContours(reg.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(f, contours, -1, (255, 255, 0), 2)
    return out


def contact_sheet(frames: np.ndarray, indices: list[int], columns: int = 4, count: int = 12, width: int = 1600) -> np.ndarray:
    F, H, W = frames.shape[:3]
    pick = sorted(set(np.linspace(0, F - 1, min(count, F)).round().astype(int).tolist()))
    cols = min(columns, len(pick))
    tw = max(16, width // cols)
    th = max(16, round(H * tw / W))
    rows = -(-len(pick) // cols)
    sheet = np.full((rows * th, cols * tw, 3), 255, np.uint8)
    for n, i in enumerate(pick):
        tile = cv2.resize(frames[i], (tw, th), interpolation=cv2.INTER_AREA)
        label = f"{i} (src {indices[i]})"
        cv2.putText(tile, label, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(tile, label, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
        y, x = divmod(n, cols)
        sheet[y * th:(y + 1) * th, x * tw:(x + 1) * tw] = tile
    return sheet


def run_masks(args) -> int:
    from loraedit.cli import check_out

    check_out(args.out, "masks folder")  # a file, or a folder that cannot be made: one line, before any work
    if not args.video:
        raise InputError("--video is required (the source clip)")
    opts = masks.mask_options_from_args(args)
    if opts.masks:
        raise InputError("--masks: `loraedit masks` makes masks; give --mask, --box or --first-frame instead")
    model = getattr(args, "model", None)
    if model:
        from loraedit.models import check_model

        model = check_model(model)  # one line for a folder that is no supported model, before any work
    t0 = time.perf_counter()
    info = probe_video(args.video)
    if not opts.mask and not opts.boxes and not args.first_frame:
        raise InputError("--first-frame is required to find the edit region (or give the region with --box or --mask)")
    if args.frames is None:  # as `edit`: the bundled toy model's own 17 frames, else the settings' default
        from loraedit.family import own_working_size
        from loraedit.settings import PrepareSettings

        own = own_working_size(model)
        args.frames = own[1] if own is not None else PrepareSettings.__dataclass_fields__["frames"].default
    footage = prepare.footage_of_arguments(args)
    choice, (width, height) = prepare.select(info, footage, prepare.model_frame_rate(model), prepare.model_pixel_budget(model), model)
    indices = choice.indices
    raw = read_video_frames(args.video, indices)
    edited = read_edited(args.first_frame, raw[0]) if args.first_frame else None
    # the same warning as edit's for the same clip and size: a crop that cuts the frame or the edit
    prepare.warn_about_crop(info, (width, height), footage.size is not None, raw[0],
                            None if edited is None else prepare.at_source_size(edited, info), args.first_frame or args.video)
    frames = np.stack([fit_to_size(f, width, height) for f in raw])
    del raw
    if edited is not None:
        first = fit_edited(edited, width, height, info.width, info.height, args.first_frame, info.stored)
    else:
        first = frames[0]
    t1 = time.perf_counter()
    cuts = shots.report(args.video, indices, info)
    if cuts["cuts"]:
        log.warning("%s: the selected frames span %d shots (scene cuts at %s); a region cannot be followed across a cut — "
                    "check the contact sheet, or choose --start/--frames inside one shot", args.video, len(cuts["shots"]),
                    ", ".join(f"{c['time']:.2f} s (frame {c['selected']})" for c in cuts["cuts"]))
    motion: dict = {}
    regions = masks.edit_regions(frames, first, opts, indices, info.n_frames, report=motion,
                                 cuts=[c["selected"] for c in cuts["cuts"]], source_size=(info.width, info.height))
    t2 = time.perf_counter()

    out = Path(args.out)
    manifest = out / masks.MASKS_MANIFEST
    if manifest.exists():
        manifest.unlink()  # the folder is incomplete until the new manifest is written
    for i, r in enumerate(regions):
        write_png(out / masks.MASKS_SUBDIR / f"{i:04d}.png", r.astype(np.uint8) * 255)
    for stale in sorted((out / masks.MASKS_SUBDIR).glob("*.png"))[len(regions):]:
        stale.unlink()
    fps = choice.fps
    write_video(out / "masks.mkv", regions.astype(np.uint8) * 255, fps, lossless=True)
    ov = overlay(frames, regions)
    write_video(out / "overlay.mp4", ov, fps)
    write_png(out / "contact_sheet.png", contact_sheet(ov, indices))
    t3 = time.perf_counter()
    write_json(manifest, {
        "frames": len(indices), "width": width, "height": height, "indices": indices, "source_frames": info.n_frames,
        "video": str(args.video), "video_sha256": sha256_path(args.video), "model": model, "first_frame": str(args.first_frame) if args.first_frame else None, "fps": fps,
        "mask_style": opts.style, "segmenter": opts.segmenter, "source": "masks" if opts.mask else "box" if opts.boxes else "automatic",
        "region_fraction": float(regions.mean()), **motion, **cuts, "region_fraction_per_frame": [round(float(r.mean()), 4) for r in regions],
        "seconds": {"read": round(t1 - t0, 2), "regions": round(t2 - t1, 2), "write": round(t3 - t2, 2)},
    })
    if not getattr(args, "quiet", False):
        log.info("masks: %d frames at %dx%d, region %.1f%% of the frames, in %.1f s → %s (check contact_sheet.png; "
                 "reuse with `loraedit edit --masks %s`)", len(indices), width, height, 100 * regions.mean(), t2 - t1, out, out)
    return 0
