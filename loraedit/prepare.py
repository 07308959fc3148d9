"""Stage 1 of 4 — prepare: pick and fit the frames, find the edit region, store it all losslessly.

Reads the user's files once; everything later reads only the run folder:
    prepare/source/NNN.png      the F selected source frames at the target size
    prepare/first_frame.png     the edited first frame at the target size
    prepare/region/NNN.png      the edit region of each frame (white = edit)
    prepare/refs/NNN.png        edited later frames (appearance references), by frame index
    prepare/plan.json           frame indices, rate, size, shots, the mode chosen, reference indices

Frames are taken at the model's own frame rate (16 fps for Wan2.1) from --start, so the motion
between two frames is what the model learned; the working size keeps the clip's aspect ratio at
the model's pixel budget; a selection that crosses a scene cut is refused (shots.py); and an edit
that changes the whole frame rather than a region is trained naive (--mode auto).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from loraedit import masks, shots
from loraedit import region as _region
from loraedit.errors import InputError
from loraedit.files import read_json, write_json
from loraedit.settings import PrepareSettings, add_arguments
from loraedit.video import (MODEL_FPS, PIXEL_BUDGET_480P, FrameChoice, Start, VideoInfo, aspect_size, choose_frames, crop_fraction, crop_window,
                            default_size, fit_edited, fit_to_size, parse_size, parse_start, probe_video, read_edited, read_edited_fitted, read_image,
                            write_png)

log = logging.getLogger("loraedit")

MODES = ("auto", "mask-aware", "naive")
GLOBAL_SPREAD = 0.6  # an edit changing ≥ this fraction of the frame's 8×8 cells is global (measured: local ≤ 0.50, global ≥ 0.62)
GLOBAL_REGION = 0.5  # ... or whose found region covers at least this fraction of the frame
GLOBAL_WIDE = 0.5  # ... or that changes at least this fraction of pixels visibly (local ≤ 0.36 measured)
CROP_WARN = 0.25  # an explicit --size cutting away more than this fraction of the frame is worth a warning


# ------------------------------------------------------------------ frames and size


@dataclass(frozen=True)
class Footage:
    """Which frames of the clip, at which size (the frame-selection settings, typed)."""

    frames: int | None = 49  # 4k+1; None = as many as fit (--frames auto), up to 81
    start: Start = Start(frame=0)
    fps: float | None = None  # None: the model's rate
    stride: int | None = None
    spread: bool = False
    size: tuple[int, int] | None = None  # None: the clip's aspect at the model's pixel budget
    allow_cuts: bool = False


def footage_from(s) -> Footage:
    """The frame-selection settings of PrepareSettings (or anything with the same fields)."""
    frames = getattr(s, "frames", 49)
    size = getattr(s, "size", None)
    return Footage(frames=None if frames == "auto" else int(frames), start=parse_start(getattr(s, "start", 0)),
                   fps=getattr(s, "fps", None), stride=getattr(s, "stride", None), spread=bool(getattr(s, "spread", False)),
                   size=parse_size(size) if isinstance(size, str) else tuple(size) if size else None,
                   allow_cuts=bool(getattr(s, "allow_cuts", False)))


FOOTAGE_FIELDS = ("frames", "size", "start", "fps", "stride", "spread")  # what `loraedit masks` shares with prepare


def add_footage_arguments(parser) -> None:
    """The frame-selection flags of PrepareSettings, for a command outside the stages (`loraedit masks`)."""
    add_arguments(parser, [f for f in dataclasses.fields(PrepareSettings) if f.name in FOOTAGE_FIELDS], raw=False)


def footage_of_arguments(ns) -> Footage:
    """Footage from the flags add_footage_arguments added, read and checked as prepare's settings are."""
    return footage_from(PrepareSettings.from_values({k: getattr(ns, k) for k in FOOTAGE_FIELDS if hasattr(ns, k)}))


def _model_config_value(model: str | None, keys: tuple[str, ...]):
    """The first of `keys` that the model folder's model_index.json or transformer/config.json states."""
    if not model or not Path(model).is_dir():
        return None
    for name in ("model_index.json", "transformer/config.json"):
        p = Path(model) / name
        try:
            data = json.loads(p.read_text()) if p.is_file() else {}
        except (OSError, ValueError):
            continue
        for k in keys:
            if isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool) and data[k] > 0:
                return data[k]
    return None


def _family(model: str | None):
    """The model family (loraedit.family) of a local folder or hub id; None without a model, or for
    a hub id whose configs cannot be fetched (then the Wan2.1-480P defaults apply)."""
    from loraedit.family import family_of

    if not model:
        return None
    if Path(model).exists():
        return family_of(model)
    try:
        return family_of(model)
    except Exception as exc:  # offline, or not a hub id at all: the model check reports that later
        log.debug("no configs for %s (%s)", model, exc)
        return None


def model_frame_rate(model: str | None) -> float:
    """The frame rate the model was trained at, where its folder says (fps / sample_fps), else its
    family's (Wan2.1 and Wan2.2-A14B 16, Wan2.2-TI2V-5B 24), else Wan2.1's 16."""
    fam = _family(model)
    return float(_model_config_value(model, ("fps", "sample_fps", "frame_rate")) or (fam.fps if fam else MODEL_FPS))


def model_pixel_budget(model: str | None) -> int:
    """Pixels per frame the model was trained at: what its folder states, the bundled toy model's 128×128,
    1280×720 for a 720P model (by its name or folder), else 832×480."""
    from loraedit.family import own_working_size

    stated = _model_config_value(model, ("pixel_budget", "max_area"))
    if stated:
        return int(stated)
    own = own_working_size(model)
    if own is not None:
        return own[0][0] * own[0][1]
    return 1280 * 720 if model and "720p" in str(model).lower() else PIXEL_BUDGET_480P


def select(info: VideoInfo, footage: Footage, model_fps: float = MODEL_FPS,
           budget: int = PIXEL_BUDGET_480P, model: str | None = None) -> tuple[FrameChoice, tuple[int, int]]:
    """The frames to edit and the working size (width, height); with a model folder, its own
    bucket and token size (loraedit.family: 480P, 720P, TI2V-5B's 1280x704 in 32-pixel tokens)."""
    from loraedit.family import own_working_size, working_size

    choice = choose_frames(info, footage.frames, footage.start, fps=footage.fps, stride=footage.stride,
                           spread=footage.spread, model_fps=model_fps)
    fam = _family(model)
    if fam is not None and _model_config_value(model, ("pixel_budget", "max_area")) is None:
        own = own_working_size(model)  # the bundled toy model: its own 128×128, not Wan2.1's 832×480 (5× the side)
        return choice, working_size(fam, footage.size, info.width, info.height, own and own[0][0] * own[0][1])
    size = footage.size or default_size(info.width, info.height, budget)
    return choice, size


def edit_outside_crop(source0: np.ndarray, edited0: np.ndarray, width: int, height: int) -> float:
    """The fraction of the edit (where the edited first frame differs from the source's, both at
    the source's size) that fitting to width×height cuts away; 0 when no edit is found."""
    H, W = source0.shape[:2]
    x0, y0, x1, y1 = crop_window(W, H, width, height)
    if (x0, y0, x1, y1) == (0, 0, W, H):
        return 0.0
    s = min(1.0, 640 / max(H, W))  # the region finder works well at a few hundred pixels
    small = (max(16, round(W * s)), max(16, round(H * s)))
    try:
        region = _region.find_edit_region(cv2.resize(source0, small, interpolation=cv2.INTER_AREA),
                                          cv2.resize(edited0, small, interpolation=cv2.INTER_AREA))
    except InputError:
        return 0.0
    kept = np.zeros_like(region)
    kept[round(y0 * s):round(y1 * s), round(x0 * s):round(x1 * s)] = True
    return float((region & ~kept).sum() / max(1, region.sum()))


def _exact_aspect_size(src_w: int, src_h: int, pixels: int) -> tuple[int, int] | None:
    """The size in multiples of 16 with exactly src_w:src_h's aspect whose pixel count is nearest
    `pixels` (within 4× either way), or None."""
    best = None
    for w in range(16, 16 * 512, 16):
        h = w * src_h / src_w
        if abs(h - round(h)) < 1e-6 and round(h) % 16 == 0 and round(h) > 0:
            off = abs(math.log(w * round(h) / pixels))
            if off <= math.log(4) and (best is None or off < best[0]):
                best = (off, (w, round(h)))
    return None if best is None else best[1]


def warn_about_crop(info: VideoInfo, size: tuple[int, int], explicit: bool, source0: np.ndarray, edited0: np.ndarray | None,
                    path: str) -> dict:
    """One warning line when the size cuts away more than a quarter of the frame (explicit
    --size) or any of the edit; returns the figures for the plan."""
    width, height = size
    frame_cut = crop_fraction(info.width, info.height, width, height)
    edit_cut = 0.0
    if edited0 is not None and edited0.shape[:2] == (info.height, info.width) and frame_cut > 0:
        edit_cut = edit_outside_crop(source0, edited0, width, height)
    if edit_cut > 0.005 or (explicit and frame_cut > CROP_WARN):
        part = f" and {100 * edit_cut:.0f}% of the edit" if edit_cut > 0.005 else ""
        fit = aspect_size(info.width, info.height, width * height)
        exact = _exact_aspect_size(info.width, info.height, width * height)
        if fit != (width, height) and crop_fraction(info.width, info.height, *fit) < 0.005:
            advice = "--size %dx%d keeps the whole frame at about the same pixel count" % fit  # the default size rule's
        elif exact and abs(math.log(exact[0] * exact[1] / (width * height))) <= math.log(1.25):
            advice = "--size %dx%d keeps the whole frame" % exact  # the clip's exact aspect, near this pixel count
        elif fit != (width, height) and crop_fraction(info.width, info.height, *fit) < frame_cut:
            whole = "the whole frame" if crop_fraction(info.width, info.height, *fit) < 0.005 else "more of the frame"
            advice = "--size %dx%d keeps %s at about the same pixel count" % (*fit, whole)
            if exact and whole != "the whole frame":
                advice += "; --size %dx%d keeps all of it" % exact
        elif exact:
            advice = "--size %dx%d keeps the whole frame" % exact
        else:
            advice = "no size in multiples of 16 has this clip's aspect; pad the video to one that does to keep it all"
        log.warning("%s: the size %dx%d cuts away %.0f%% of the %dx%d frame%s; %s",
                    path, width, height, 100 * frame_cut, info.width, info.height, part, advice)
    return {"frame_cut": round(frame_cut, 4), "edit_cut": round(edit_cut, 4)}


# ------------------------------------------------------------------ local or global edit


@dataclass(frozen=True)
class EditExtent:
    """How much of frame 0 the edit changes (figures for the plan and the mode decision)."""

    spread: float  # fraction of the frame's 8×8 cells with more than 5% of their pixels changed
    changed: float  # fraction of pixels changed (ΔE above the automatic threshold)
    wide: float  # fraction of pixels changed visibly (ΔE above region.DIFF_FLOOR, whatever the threshold)
    region: float  # fraction of the frame in the found edit region (0 when none is found)
    parts: int  # connected parts of the found region

    @property
    def is_global(self) -> bool:
        return self.spread >= GLOBAL_SPREAD or self.region >= GLOBAL_REGION or self.wide >= GLOBAL_WIDE

    def describe(self) -> str:
        if self.region >= GLOBAL_REGION:
            return f"the edit region covers {100 * self.region:.0f}% of the frame"
        if self.wide >= GLOBAL_WIDE and self.spread < GLOBAL_SPREAD:
            return f"the edit changes {100 * self.wide:.0f}% of the frame's pixels"
        return f"the edit is spread over {100 * self.spread:.0f}% of the frame ({100 * self.changed:.0f}% of its pixels changed, in {self.parts} region(s))"


def edit_extent(source0: np.ndarray, edited0: np.ndarray, threshold: float = 0.0, min_area: float = 0.002) -> EditExtent:
    """(H, W, 3) uint8 source and edited first frames → how local the edit is.

    A restyle, a colour grade or snow over the scene changes pixels in most of the frame (spread
    high) even where the region finder keeps only a few parts; a recoloured jacket, a hat or a
    replaced animal stays in a few cells. Measured on the AnyV2V edits (spread: hat 0.25, red
    clothes 0.33, kitten → dog 0.50; wide ≤ 0.36) against global edits of the same frames (hue
    shift, colour grade, pencil sketch, stylisation, snow: spread 0.62-0.98). The automatic
    (Otsu) threshold splits even a uniform grade into halves, so the pixels changed by more than
    the fixed floor count too."""
    de = _region.colour_difference(source0, edited0)  # (H, W) ΔE
    if threshold <= 0:
        u8 = np.clip(de * 2.0, 0, 255).astype(np.uint8)
        otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(_region.DIFF_FLOOR, otsu / 2.0)
    changed = de > threshold
    H, W = changed.shape
    g = 8
    cells = changed[: H // g * g, : W // g * g].reshape(g, H // g, g, W // g).mean(axis=(1, 3))  # (8, 8)
    try:
        region = _region.find_edit_region(source0, edited0, threshold, min_area)
        parts = cv2.connectedComponents(region.astype(np.uint8))[0] - 1
    except InputError:
        region, parts = np.zeros(changed.shape, bool), 0
    wide = float((de > _region.DIFF_FLOOR).mean())
    return EditExtent(float((cells > 0.05).mean()), float(changed.mean()), wide, float(region.mean()), int(parts))


def choose_mode(requested: str, extent: EditExtent | None, where: str = "--first-frame") -> tuple[str, str]:
    """(mode, why): --mode auto is mask-aware for a local edit and naive for a global one (the
    paper's naive mode is the fit for restyles); an explicit mode is kept, with a warning when it
    does not suit the edit. `extent` None: the region was given (--mask/--box/--masks)."""
    if requested not in MODES:
        raise InputError(f"--mode {requested}: choose one of {', '.join(MODES)}")
    if extent is None:
        mode = "mask-aware" if requested == "auto" else requested
        return mode, "the edit region was given" if requested == "auto" else "--mode " + requested
    if not extent.is_global:
        mode = "mask-aware" if requested == "auto" else requested
        return mode, f"local edit: {extent.describe()}" if requested == "auto" else "--mode " + requested
    if requested == "auto":
        log.warning("%s: %s, a global edit; training naive (the paper's mode for restyles; --mode mask-aware to keep the region)",
                    where, extent.describe())
        return "naive", f"global edit: {extent.describe()}"
    if requested == "mask-aware":
        log.warning("%s: %s; mask-aware editing is for local edits — --mode naive (or auto) suits a global edit better", where, extent.describe())
    return requested, "--mode " + requested


# ------------------------------------------------------------------ the stage


def check_refs(refs: dict[int, str], frames: int) -> dict[int, str]:
    """{K: path}: K indexes the F selected frames (known only now with --frames auto)."""
    for k, path in refs.items():
        if not 1 <= k < frames:
            raise InputError(f"--ref {k}={path}: frame {k} is outside the clip's frames 1..{frames - 1} (frame 0 is --first-frame)")
    return dict(refs)


def at_source_size(edited: np.ndarray, info: VideoInfo) -> np.ndarray | None:
    """The edited first frame at the source's size when it has the source's aspect (to see what a crop cuts of it)."""
    h, w = edited.shape[:2]
    if (w, h) == (info.width, info.height):
        return edited
    if abs(w / h - info.width / info.height) <= 0.02 * info.width / info.height:
        return cv2.resize(edited, (info.width, info.height), interpolation=cv2.INTER_AREA)
    return None


def run(args: PrepareSettings, run_dir: Path) -> dict:
    """Write prepare/ for `args`; returns the plan."""
    args.check_files()
    footage = footage_from(args)
    info = probe_video(args.video)
    model = getattr(args, "model", None)
    model_fps = model_frame_rate(model)
    choice, (width, height) = select(info, footage, model_fps, model_pixel_budget(model), model)
    indices = choice.indices
    if footage.frames is None:
        log.info("--frames auto: %d frames (%.2f s at %g fps) from %.2f s", len(indices), len(indices) / choice.fps, choice.fps, choice.start_time)
    refs = check_refs(args.ref, len(indices))
    for k, path in refs.items():  # a reference that cannot be used is said now, not after the frames are read and tracked
        h, w = read_image(path).shape[:2]
        if (w, h) not in ((width, height), (info.width, info.height), info.stored) and \
                abs(w / h - info.width / info.height) > 0.02 * info.width / info.height:
            raise InputError(f"--ref {k}={path}: is {w}x{h}, a different aspect ratio from the video's {info.width}x{info.height}; "
                             "crop or pad it to the video's aspect")
    opts = args.mask_options()
    if opts.masks:
        masks.check_saved_masks_video(opts.masks, args.video)  # before the frames are read
    raw, cuts = shots.read_frames_and_cuts(args.video, indices, info)
    shots.check_no_cuts(args.video, info, indices, choice.fps, footage.allow_cuts, cuts)
    edited = read_edited(args.first_frame, raw[0])
    crop = warn_about_crop(info, (width, height), footage.size is not None, raw[0], at_source_size(edited, info), args.first_frame)
    frames = np.stack([fit_to_size(f, width, height) for f in raw])
    del raw
    first = fit_edited(edited, width, height, info.width, info.height, args.first_frame, info.stored)

    automatic = not (opts.masks or opts.mask or opts.boxes)
    extent = edit_extent(frames[0], first, opts.diff_threshold, opts.min_area) if automatic else None
    if not automatic:
        try:
            _region.find_edit_region(frames[0], first)
        except InputError:  # nothing differs: the region was given, so this is the only sign of a wrong file
            log.warning("%s: looks the same as the video's first frame; is it the edited one?", args.first_frame)
    mode, why = choose_mode(getattr(args, "mode", "auto") or "auto", extent, args.first_frame)
    if extent is not None and extent.is_global and choice.start_time > 0:
        log.warning("%s: the edited first frame must be an edit of the source frame at --start %s (%.2f s), the first one edited",
                    args.first_frame, footage.start, choice.start_time)
    if mode == "naive" and extent is not None and extent.region == 0:
        regions = np.ones(frames.shape[:3], bool)  # a global edit the region finder sees nothing of: all of it is edit
    else:
        # with --allow-cuts, a followed region is held at each cut instead of following nonsense across it
        at_cuts = [next(k for k, i in enumerate(indices) if i >= c.frame) for c in cuts]
        regions = masks.edit_regions(frames, first, opts, indices, info.n_frames, cuts=at_cuts,
                                     source_size=(info.width, info.height))
    if regions.shape != frames.shape[:3]:
        raise RuntimeError(f"edit region shape {regions.shape} does not match frames {frames.shape[:3]}")

    out = run_dir / "prepare"
    for i, (f, r) in enumerate(zip(frames, regions)):
        write_png(out / "source" / f"{i:03d}.png", f)
        write_png(out / "region" / f"{i:03d}.png", r.astype(np.uint8) * 255)
    for stale in sorted((out / "source").glob("*.png"))[len(frames):] + sorted((out / "region").glob("*.png"))[len(frames):]:
        stale.unlink()  # a rerun with fewer frames
    write_png(out / "first_frame.png", first)
    for k, path in refs.items():
        write_png(out / "refs" / f"{k:03d}.png", read_edited_fitted(path, frames[k], info.width, info.height, info.stored))
    plan = {
        "frames": len(indices), "width": width, "height": height, "indices": indices, "source_frames": info.n_frames,
        "source_width": info.width, "source_height": info.height, "source_stored": list(info.stored) if info.stored else None, "source_fps": info.fps, "fps": choice.fps,
        "frame_rule": choice.rule, "start_time": round(choice.start_time, 4), "model_fps": model_fps,
        "has_audio": info.has_audio, "audio_in_sync": choice.start_time < 0.5 / info.fps,
        "cuts": [{"frame": c.frame, "time": round(c.time, 3), "score": round(c.score, 1)} for c in cuts],
        "crop": crop, "mode": mode, "mode_reason": why,
        "edit_extent": None if extent is None else {"spread": round(extent.spread, 3), "changed": round(extent.changed, 4), "wide": round(extent.wide, 4),
                                                     "region": round(extent.region, 4), "parts": extent.parts},
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
