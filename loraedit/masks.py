"""The edit region: from the user's input (or none) to one boolean region per selected frame.

Interface used by the prepare stage:
    add_mask_arguments(parser)            the mask flags shared by `edit` and `masks`
    mask_options_from_args(args)          → MaskOptions
    edit_regions(frames, first_frame, opts, indices, n_source) → (F, H, W) bool, True = edit

Where the region comes from, first match wins:
    --masks DIR     the PNG masks written by `loraedit masks`, used exactly as they are
    --mask PATH     a mask video, a folder of PNG frames, or one PNG for every frame
    --box ...       boxes on frame 0, followed through the video
    (nothing)       where the edited first frame differs from the source's, followed through the video
The found or given region is then shaped by --mask-style (not for --masks, which is already shaped).
The latent-resolution mask is derived from this pixel mask in one place: method.latent_keep_mask.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from loraedit import region as _region
from loraedit.errors import InputError
from loraedit.settings import MASK_STYLES, SEGMENTERS  # declared with the flags
from loraedit.video import fit_to_size, probe_video, read_gray, read_video_frames

log = logging.getLogger("loraedit")

MASKS_MANIFEST = "masks.json"  # written last by `loraedit masks`: its presence marks a complete folder
MASKS_SUBDIR = "masks"
WHOLE_FRAME_WARN = 0.9  # a region above this fraction of the frame leaves almost no background to keep


@dataclass
class MaskOptions:
    mask: str | None = None  # mask video, folder of PNG frames, or one PNG for every frame
    masks: str | None = None  # output folder of `loraedit masks`, reused exactly
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x0, y0, x1, y1 on frame 0
    style: str = "bbox"
    grow: float = 0.10  # bbox style: grow each region's box by this fraction of its size
    dilate: int = 16  # dilate style: pixels
    block: int = 7  # blocks style: block size in pixels
    segmenter: str = "flow"
    sam2_checkpoint: str | None = None
    sam2_config: str | None = None
    diff_threshold: float = 0.0  # ΔE; 0 = automatic
    min_area: float = 0.002  # fraction of the frame below which a found region is dropped


def parse_box(text: str) -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' → ints (argparse type)."""
    try:
        vals = [int(round(float(v))) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a box as x0,y0,x1,y1 in pixels, e.g. 100,40,300,260") from None
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: a box has four numbers x0,y0,x1,y1")
    x0, y0, x1, y1 = vals
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"{text!r}: needs x0 < x1 and y0 < y1 (left, top, right, bottom)")
    return x0, y0, x1, y1


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    """The edit-region flags, as declared once in loraedit.settings.PrepareSettings (group 'edit region')."""
    from loraedit.settings import PrepareSettings, add_arguments, group_fields

    add_arguments(parser, group_fields(PrepareSettings, "edit region"), raw=False)


def mask_options_from_args(args) -> MaskOptions:
    # boxes arrive parsed from the command line, or as strings / lists from a job file
    boxes = []
    for b in args.box or []:
        if isinstance(b, str):
            try:
                b = parse_box(b)
            except argparse.ArgumentTypeError as exc:
                raise InputError(f"--box {exc}") from None
        boxes.append(tuple(int(v) for v in b))
    return MaskOptions(mask=args.mask, masks=args.masks, boxes=boxes, style=args.mask_style, grow=args.grow,
                       dilate=args.dilate, block=args.block_size, segmenter=args.segmenter, sam2_checkpoint=args.sam2_checkpoint,
                       sam2_config=args.sam2_config, diff_threshold=args.diff_threshold, min_area=args.min_region)


# ------------------------------------------------------------------ reading given masks

def _by_time(i: int, n_have: int, n_source: int) -> int:
    return min(n_have - 1, round(i * (n_have - 1) / max(1, n_source - 1)))


def _read_mask_frames(path: Path, indices: list[int], n_source: int) -> list[np.ndarray]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise InputError(f"{path}: folder holds no PNG mask frames; put one PNG per source frame there")
        if len(files) == 1:
            return [read_gray(files[0])] * len(indices)
        if len(files) != n_source:
            log.warning("%s: has %d mask frames, the video %d; matching them by time", path, len(files), n_source)
            return [read_gray(files[_by_time(i, len(files), n_source)]) for i in indices]
        return [read_gray(files[i]) for i in indices]
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"):
        return [read_gray(path)] * len(indices)
    info = probe_video(path)
    if info.n_frames == n_source:
        mapped = indices
    else:
        log.warning("%s: has %d frames, the video %d; matching mask frames by time", path, info.n_frames, n_source)
        mapped = [_by_time(i, info.n_frames, n_source) for i in indices]
    rgb = read_video_frames(path, mapped)
    return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]


def _given_masks(opts: MaskOptions, F: int, H: int, W: int, indices: list[int], n_source: int,
                 source_size: tuple[int, int] | None = None) -> np.ndarray:
    """--mask → (F, H, W) bool. A mask at the working size is used as it is; one of the video's aspect ratio
    (source_size, (width, height)) is fitted the way the frames were; another aspect would put the region
    somewhere else, so it is refused, as an edited first frame of another aspect is."""
    path = Path(opts.mask)
    if not path.exists():
        raise InputError(f"{path}: no such mask file or folder; check --mask")
    raw = _read_mask_frames(path, indices, n_source)
    h, w = raw[0].shape
    if (w, h) != (W, H) and source_size is not None:
        sw, sh = source_size
        if abs(w / h - sw / sh) > 0.02 * (sw / sh):
            sizes = f"the video's size ({sw}x{sh})" + (f" or the working size ({W}x{H})" if (sw, sh) != (W, H) else "")
            raise InputError(f"{path}: the mask is {w}x{h}, a different aspect ratio from the video's {sw}x{sh}; give it at {sizes}")
        if (w, h) != (sw, sh):
            log.warning("%s: the mask is %dx%d, the video %dx%d; resizing it (nearest) to match", path, w, h, sw, sh)
            raw = [fit_to_size(m, sw, sh, nearest=True) for m in raw]
    elif (w, h) != (W, H):
        log.warning("%s: masks are %dx%d, the frames %dx%d; resizing them (nearest) the way the frames were", path, w, h, W, H)
    regions = np.stack([fit_to_size(m, W, H, nearest=True) > 127 for m in raw])
    if not regions.any():
        raise InputError(f"{path}: the mask is empty (no white pixels); paint the edit region white")
    return regions


def check_saved_masks_video(folder: str | Path, video: str | Path) -> None:
    """InputError if the `loraedit masks` folder was made from another video than `video` (by the file's sha256;
    a folder written before the hash was recorded is not checked). Frame count, size and source frames alone
    cannot tell two clips of the same length and size apart."""
    from loraedit.files import read_json, sha256_path

    manifest = Path(folder) / MASKS_MANIFEST
    if not manifest.is_file() or not Path(video).is_file():
        return  # read_saved_masks says what is missing
    info = read_json(manifest)
    if info.get("video_sha256") and info["video_sha256"] != sha256_path(video):
        raise InputError(f"{folder}: the masks were made from another video ({info.get('video')}), not {video}; "
                         f"run `loraedit masks --video {video} --out DIR` and pass that folder to --masks")


def read_saved_masks(folder: str | Path, F: int, H: int, W: int, indices: list[int] | None = None) -> np.ndarray:
    """The masks written by `loraedit masks` (see maskcli), checked against the frames to edit."""
    from loraedit.files import read_json

    folder = Path(folder)
    manifest = folder / MASKS_MANIFEST
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (from --masks); run `loraedit masks --out {folder}` first")
    if not manifest.is_file():
        raise InputError(f"{folder}: has no {MASKS_MANIFEST}, so it is not a complete `loraedit masks` output; run `loraedit masks --out {folder}` again")
    info = read_json(manifest)
    if info.get("frames") != F or (info.get("width"), info.get("height")) != (W, H):
        raise InputError(f"{folder}: masks are for {info.get('frames')} frames at {info.get('width')}x{info.get('height')}, this run has {F} at {W}x{H}; "
                         "run `loraedit masks` with the same --frames/--size/--start/--stride")
    if indices is not None and info.get("indices") != list(indices):
        raise InputError(f"{folder}: masks were made for other source frames (--start/--stride differ); "
                         "run `loraedit masks` with the same --frames/--start/--stride")
    out = np.zeros((F, H, W), bool)
    for i in range(F):
        p = folder / MASKS_SUBDIR / f"{i:04d}.png"
        if not p.is_file():
            raise InputError(f"{p}: missing; run `loraedit masks --out {folder}` again")
        m = read_gray(p)
        if m.shape != (H, W):
            raise InputError(f"{p}: is {m.shape[1]}x{m.shape[0]}, expected {W}x{H}; run `loraedit masks --out {folder}` again")
        out[i] = m > 127
    return out


# ------------------------------------------------------------------ styles

def boxes_around(region: np.ndarray, grow: float) -> np.ndarray:
    """(H, W) bool → the union of each connected region's bounding box, grown by `grow` (its size × grow in total)."""
    H, W = region.shape
    n, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    out = np.zeros_like(region, dtype=bool)
    for x, y, w, h, _area in stats[1:n]:
        dx, dy = round(w * grow / 2), round(h * grow / 2)
        out[max(0, y - dy) : min(H, y + h + dy), max(0, x - dx) : min(W, x + w + dx)] = True
    return out


def dilate(region: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return region.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(region.astype(np.uint8), k).astype(bool)


def blocks(region: np.ndarray, size: int) -> np.ndarray:
    """Coarse blocks (the paper's 'noisy' mask): a size×size block (on a grid from the top-left
    corner) is in the region if any of its pixels is, so the edge becomes blocky; never smaller."""
    H, W = region.shape
    hb, wb = -(-H // size), -(-W // size)
    pad = np.zeros((hb * size, wb * size), bool)
    pad[:H, :W] = region
    cells = pad.reshape(hb, size, wb, size).any(axis=(1, 3))
    return np.repeat(np.repeat(cells, size, 0), size, 1)[:H, :W]


def apply_style(regions: np.ndarray, opts: MaskOptions) -> np.ndarray:
    """(F, H, W) bool as found → (F, H, W) bool shaped by opts.style."""
    style = opts.style
    if style == "tight":
        return regions
    if style == "bbox":
        return np.stack([boxes_around(r, opts.grow) for r in regions])
    if style == "dilate":
        return np.stack([dilate(r, opts.dilate) for r in regions])
    if style == "blocks":
        return np.stack([blocks(r, opts.block) for r in regions])
    if style == "static":
        union = np.logical_or.reduce([boxes_around(r, opts.grow) for r in regions])
        return np.broadcast_to(union, regions.shape).copy()
    raise InputError(f"--mask-style {style}: choose one of {', '.join(MASK_STYLES)}")


def _check_options(opts: MaskOptions) -> None:
    if opts.style not in MASK_STYLES:
        raise InputError(f"--mask-style {opts.style}: choose one of {', '.join(MASK_STYLES)}")
    if opts.grow < 0:
        raise InputError(f"--grow {opts.grow}: must be 0 or more (0.10 grows each box by 10%)")
    if opts.dilate < 0:
        raise InputError(f"--dilate {opts.dilate}: must be 0 or more pixels")
    if opts.block < 1:
        raise InputError(f"--block-size {opts.block}: must be at least 1 pixel")
    if not 0 <= opts.min_area < 1:
        raise InputError(f"--min-region {opts.min_area}: must be a fraction of the frame in [0, 1)")
    if opts.diff_threshold < 0:
        raise InputError(f"--diff-threshold {opts.diff_threshold}: must be 0 (automatic) or a positive ΔE")
    given = [name for name, v in (("--masks", opts.masks), ("--mask", opts.mask), ("--box", opts.boxes)) if v]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)}: give the edit region one way only")


def _box_region(boxes, H: int, W: int) -> np.ndarray:
    """Boxes in pixels of the working size → (H, W) bool. A box that reaches past the frame is refused, not
    clipped: such a box is almost always in another frame's pixels (the source's), so clipping would edit
    another region than the one meant."""
    r = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in boxes:
        if x0 >= W or y0 >= H or x1 <= 0 or y1 <= 0:
            raise InputError(f"--box {x0},{y0},{x1},{y1}: lies outside the {W}x{H} frame (boxes are in pixels of the working size, --size)")
        if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
            raise InputError(f"--box {x0},{y0},{x1},{y1}: reaches past the {W}x{H} frame; boxes are in pixels of the working "
                             f"size (--size), within 0,0,{W},{H}, e.g. {max(0, x0)},{max(0, y0)},{min(W, x1)},{min(H, y1)}")
        r[y0:y1, x0:x1] = True
    return r


def edit_regions(frames: np.ndarray, first_frame: np.ndarray, opts: MaskOptions, indices: list[int], n_source: int,
                 report: dict | None = None, cuts: list[int] = (), source_size: tuple[int, int] | None = None) -> np.ndarray:
    """The edit region of every selected frame, (F, H, W) bool, True = edit.

    report: when given, filled with what moved a followed region in each frame ("motion", one of
    region.MOTIONS per frame), whether the edit adds content ("added") and the first frame whose
    motion was ambiguous ("ambiguous_from").
    cuts: positions (0..F-1) of frames that start a new shot; a followed region is held there.
    source_size: the video's (width, height), which a --mask may have instead of the working size.
    """
    _check_options(opts)
    F, H, W = frames.shape[:3]
    if opts.masks:
        regions = read_saved_masks(opts.masks, F, H, W, indices)
        _warn_coverage(regions, opts.masks)
        return regions
    if opts.mask:
        regions = _given_masks(opts, F, H, W, indices, n_source, source_size)
        where = opts.mask
    else:
        if opts.boxes:
            region0, rigid, where = _box_region(opts.boxes, H, W), True, "--box"
        else:
            if first_frame.shape != frames[0].shape:
                raise ValueError(f"first frame {first_frame.shape} and frames {frames.shape[1:]} differ in size")
            region0 = _region.find_edit_region(frames[0], first_frame, opts.diff_threshold, opts.min_area)
            rigid, where = False, "the automatic region"
        if opts.segmenter == "sam2":
            from loraedit import sam2seg

            regions = sam2seg.segment(frames, region0, opts)
        else:
            followed = _region.follow_region(frames, region0, rigid=rigid, edited0=None if rigid else first_frame, cuts=cuts)
            regions = followed.regions
            _say_motion(followed, where)
            if report is not None:
                report.update(motion=followed.motion, added=followed.added, ambiguous_from=followed.ambiguous_from)
    regions = apply_style(regions, opts)
    _warn_coverage(regions, where)
    return regions


def _say_motion(followed: _region.Followed, where: str) -> None:
    log.info("%s: %s", where, followed.summary())
    if followed.ambiguous_from is not None:
        log.warning("%s: from frame %d what the added region sits on does not move as one, so where it goes is unclear; "
                    "it now covers both where that object and where the scene would take it — check it in `loraedit masks`' contact_sheet.png, "
                    "or give --box x0,y0,x1,y1 around the object and the addition", where, followed.ambiguous_from)


def _warn_coverage(regions: np.ndarray, where: str) -> None:
    frac = float(regions.mean())
    if frac > WHOLE_FRAME_WARN:
        log.warning("%s: the edit region covers %.0f%% of the frames; the method keeps only the background outside it, "
                    "so almost nothing of the source will be kept — give a tighter --mask or --box", where, 100 * frac)
    elif not regions[1:].any() and len(regions) > 1:
        log.warning("%s: the edit region is empty after frame 0; the edit will not be propagated — check the masks", where)
