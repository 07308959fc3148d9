"""Reading and writing video and image files (PyAV for video, Pillow for images, OpenCV to resize).

Frames are uint8 RGB numpy arrays (H, W, 3) everywhere outside the method's tensors.
Intermediates are written losslessly (PNG, FFV1); only final results are H.264.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from loraedit.errors import InputError
from loraedit.files import atomic_output

LANDSCAPE = (832, 480)  # (width, height) of Wan's 480P bucket
PORTRAIT = (480, 832)
PIXEL_BUDGET_480P = 832 * 480  # pixels per frame the 480P models were trained at
MODEL_FPS = 16.0  # Wan2.1's training frame rate, when the model folder does not say
MAX_AUTO_FRAMES = 81  # --frames auto: at most the frame count Wan was trained on
MIN_EDIT_FRAMES = 5  # the fewest frames worth editing: 1 is the first frame alone, nothing follows it


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int  # as displayed, after rotation metadata
    height: int
    fps: float
    n_frames: int
    rotation: int  # degrees, as stored in the file's display matrix
    has_audio: bool
    # presentation time (seconds) of every frame in display order, from the container; empty when
    # the file does not say. Used to pick frames evenly in time from a variable-frame-rate video.
    times: tuple[float, ...] = ()
    # anamorphic video: the stored picture size (width, height) when it differs from the displayed one
    stored: tuple[int, int] | None = None

    @property
    def variable_rate(self) -> bool:
        """True when frame intervals differ by more than 10% from their median."""
        return _variable(self.times)


def _variable(times) -> bool:
    if len(times) < 3:
        return False
    d = np.diff(np.asarray(times, np.float64))
    med = float(np.median(d))
    return med > 0 and bool(np.any(np.abs(d - med) > 0.1 * med))


def _open(path: str | Path):
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass a video file (a folder of frames: make it a video first, "
                         f"e.g. ffmpeg -framerate 16 -pattern_type glob -i '{path}/*.png' -crf 12 clip.mp4)")
    if not path.is_file():
        raise InputError(f"{path}: no such video file; check the path")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"{path}: cannot be read as a video ({exc.__class__.__name__}); re-encode it, e.g. to H.264 mp4") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: has no video stream; pass a video file")
    return container


def _stream(container):
    """The clip's video stream: FFmpeg's best one (av_find_best_stream: skips cover art and stills
    that some files carry as their first video stream), else the first."""
    try:
        best = container.streams.best("video")
    except Exception:  # noqa: BLE001 - an older PyAV without it
        best = None
    return best if best is not None else container.streams.video[0]


def _display_size(stream, frame) -> tuple[int, int]:
    """The size a player shows a frame at: anamorphic video (DV, HDV, some phone and broadcast files)
    stores pixels that are not square, and its sample aspect ratio widens or narrows them."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    if sar and sar > 0 and sar != 1:
        return max(2, int(round(frame.width * sar))), frame.height
    return frame.width, frame.height


def _rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB at the stream's first size: a stream whose resolution
    changes part-way (joined recordings, adaptive streams) is scaled back to it, as players do."""
    if size is None or (frame.width, frame.height) == size:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])


def _warn_size_change(path, i: int, frame, size) -> None:
    logging.getLogger("loraedit").warning("%s: the picture size changes at frame %d (%dx%d → %dx%d); later frames are "
                                          "scaled to the first size", path, i, size[0], size[1], frame.width, frame.height)


def _rotation(stream, first_frame=None) -> int:
    rot = getattr(first_frame, "rotation", None) if first_frame is not None else None
    if rot is None:
        rot = int(float(stream.metadata.get("rotate", 0) or 0))
    return int(rot) % 360


def _apply_rotation(img: np.ndarray, rotation: int) -> np.ndarray:
    # the display matrix angle is counter-clockwise; undo it so frames look as players show them
    if rotation == 90:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    if rotation == 180:
        return cv2.rotate(img, cv2.ROTATE_180)
    if rotation == 270:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    return img


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame rate and exact frame count (counted by demuxing, not trusted from the header)."""
    with _open(path) as container:
        stream = _stream(container)
        n = 0
        pts: list[float | None] = []
        try:
            for packet in container.demux(stream):
                if packet.size:
                    n += 1
                    pts.append(float(packet.pts * stream.time_base) if packet.pts is not None and stream.time_base else None)
        except av.error.FFmpegError:
            pass  # a truncated file: keep what could be read
        first = None
        try:
            container.seek(0)
            first = next(container.decode(stream))
        except (StopIteration, av.error.FFmpegError):
            pass
        if first is None and n:  # a raw stream (.h264) cannot seek back: read its first frame afresh
            try:
                with av.open(str(path)) as again:
                    first = next(again.decode(_stream(again)))
            except (StopIteration, av.error.FFmpegError, OSError):
                pass
        if first is None or n == 0:
            raise InputError(f"{path}: contains no decodable frames; check the file or re-encode it")
        if first.time is not None and pts and None not in pts:
            # a clip cut without re-encoding (`-c copy`) may begin with frames that refer to pictures
            # before the cut: the decoder drops them, so they are not frames of the clip (counting them
            # would shift every frame number and time after them)
            pts = [t for t in pts if t >= first.time - 1e-6]
            n = len(pts)
        rotation = _rotation(stream, first)
        w, h = _display_size(stream, first)
        stored = None if (w, h) == (first.width, first.height) else (first.width, first.height)
        if rotation in (90, 270):
            w, h = h, w
            stored = stored and (stored[1], stored[0])
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        times = tuple(sorted(pts)) if pts and None not in pts and len(set(pts)) == len(pts) else ()
        if times:
            times = tuple(t - times[0] for t in times)
        return VideoInfo(str(path), w, h, float(rate), n, rotation, bool(container.streams.audio), times, stored)


def frame_indices(n_total: int, frames: int, start: int = 0, stride: int | None = None, path: str = "video",
                  times: tuple[float, ...] | None = None) -> list[int]:
    """Which source frames to use: `frames` of them from `start`, every `stride`-th, or spread evenly.

    `times` (VideoInfo.times): for a variable-frame-rate video, spread evenly in time rather than by
    frame number, so it is sampled at a steady pace (the nearest frame to each instant). A
    constant-rate video gets exactly the same frames with or without `times`.
    """
    if start < 0 or start >= n_total:
        raise InputError(f"{path}: --start {start} is outside the clip's {n_total} frames")
    available = n_total - start
    if stride is None:
        if available < frames:
            raise InputError(f"{path}: has {available} frames from --start {start}, fewer than --frames {frames}; ask for fewer frames")
        if frames == 1:
            return [start]
        if times and len(times) == n_total and _variable(times):
            return _by_timestamp(np.asarray(times[start:], np.float64), frames, start)
        step = (available - 1) / (frames - 1)
        return [start + round(i * step) for i in range(frames)]
    if stride < 1:
        raise InputError(f"--stride must be at least 1, got {stride}")
    last = start + (frames - 1) * stride
    if last >= n_total:
        raise InputError(f"{path}: has {n_total} frames, too few for --frames {frames} with --stride {stride} from --start {start}; lower --frames or --stride")
    return list(range(start, last + 1, stride))


def _by_timestamp(t: np.ndarray, frames: int, start: int) -> list[int]:
    """The frame nearest each of `frames` evenly spaced instants over t, all distinct, in order."""
    targets = np.linspace(t[0], t[-1], frames)
    picked: list[int] = []
    for k, target in enumerate(targets):
        lo = picked[-1] + 1 if picked else 0
        hi = len(t) - (frames - k)  # leave room for the frames still to pick
        j = int(np.clip(np.searchsorted(t, target), lo, hi))
        if j > lo and abs(t[j - 1] - target) <= abs(t[j] - target):
            j -= 1
        picked.append(j)
    return [start + j for j in picked]


# ------------------------------------------------------------------ which frames, at which rate


@dataclass(frozen=True)
class Start:
    """--start: a source frame number ('12') or a time in seconds ('2.5s')."""

    frame: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.seconds:g}s" if self.seconds is not None else str(self.frame or 0)


def parse_start(value) -> Start:
    """'2.5s' → 2.5 seconds; '12' or 12 → frame 12."""
    if isinstance(value, Start):
        return value
    text = str(value if value is not None else 0).strip().lower()
    try:
        if text.endswith("s"):
            seconds = float(text[:-1])
            if seconds >= 0 and math.isfinite(seconds):
                return Start(seconds=seconds)
        elif float(text) == int(float(text)) and int(float(text)) >= 0:
            return Start(frame=int(float(text)))
    except ValueError:
        pass
    raise InputError(f"--start {value}: write a frame number (e.g. 12) or a time in seconds (e.g. 2.5s), 0 or more")


@dataclass(frozen=True)
class FrameChoice:
    """The source frames to edit and the rate they play at."""

    indices: list[int]
    fps: float  # the rate of the selected frames: the result is written at it
    rule: str  # how they were chosen: "model rate", "source rate", "--fps", "--stride", "--spread"
    start_time: float  # source time of the first selected frame, seconds
    fit: int  # how many frames this rule could take from the start (the most --frames could be)


def source_times(info: VideoInfo) -> np.ndarray:
    """Presentation time of every source frame (seconds from the first): the container's when it
    gives them all, else frame number / frame rate."""
    if info.times and len(info.times) == info.n_frames:
        return np.asarray(info.times, np.float64)
    return np.arange(info.n_frames, dtype=np.float64) / max(info.fps, 1e-9)


def largest_valid_frames(n: int) -> int:
    """The largest 4k+1 ≤ n (0 when n < 1)."""
    return 0 if n < 1 else (n - 1) // 4 * 4 + 1


def clip_seconds(t: np.ndarray, info: VideoInfo) -> float:
    """How long the clip lasts: to the end of its last frame (the figure every message gives)."""
    return float(t[-1] - t[0] + 1.0 / max(info.fps, 1e-9))


def _start_index(start: Start, t: np.ndarray, info: VideoInfo) -> int:
    if start.seconds is None:
        i = start.frame or 0
        if i >= info.n_frames:
            raise InputError(f"{info.path}: --start {i} is past the clip's last frame ({info.n_frames - 1}); use a smaller --start")
        return i
    half = 0.5 / max(info.fps, 1e-9)
    if start.seconds > t[-1] + half:
        raise InputError(f"{info.path}: --start {start} is past the clip's end (it lasts {clip_seconds(t, info):.2f} s, its last "
                         f"frame shown from {t[-1]:.2f} s); use a smaller --start")
    return int(np.argmin(np.abs(t - start.seconds)))  # the frame shown at that time


def choose_frames(info: VideoInfo, frames: int | None, start: Start | str | int = 0, *, fps: float | None = None,
                  stride: int | None = None, spread: bool = False, model_fps: float = MODEL_FPS,
                  max_auto: int = MAX_AUTO_FRAMES) -> FrameChoice:
    """Which source frames to edit: `frames` of them (None = as many as fit, up to `max_auto`, 4k+1).

    Default: resampled in time to `model_fps` (the rate the model was trained on) from `start`, so
    motion between frames is what the model learned; a clip slower than that keeps its own frames.
    `fps` overrides the rate; `stride` takes every N-th source frame; `spread` spreads the frames
    evenly over the rest of the clip (the motion per frame then depends on the clip's length).
    """
    start = parse_start(start)
    t = source_times(info)
    s = _start_index(start, t, info)
    src_fps = info.fps
    if sum(x is not None and x is not False for x in (fps, stride, spread or None)) > 1:
        raise InputError("--fps, --stride and --spread each choose the frames; give one of them")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise InputError(f"--fps {fps}: must be a positive frame rate, e.g. 16")
    if stride is not None and stride < 1:
        raise InputError(f"--stride {stride}: must be at least 1")
    if spread:
        rule, rate_desc = "--spread", ""
    elif stride is not None:
        rule, rate_desc = "--stride", f" with --stride {stride}"
    else:
        rate = fps if fps is not None else model_fps
        if src_fps <= rate * 1.01:
            # a clip no faster than the rate: its own frames (repeating frames would add no motion)
            if fps is not None and src_fps < fps * 0.99:
                logging.getLogger("loraedit").warning("--fps %g: the clip has %g frames a second; its own frames are taken, "
                                                      "at its own rate", fps, src_fps)
            rule, rate = "source rate", src_fps
        else:
            rule = "--fps" if fps is not None else "model rate"
        rate_desc = f" at {rate:g} fps"

    def fit_from(first: int) -> int:
        """How many frames the rule can take from source frame `first` on."""
        available = info.n_frames - first
        if spread or rule == "source rate":
            return available
        if stride is not None:
            return (available - 1) // stride + 1
        half = 0.5 / src_fps  # an instant within half a source frame of the end still has a frame
        return int(math.floor((t[-1] + half - t[first]) * rate + 1e-9)) + 1

    def fixes(want: int) -> str:
        """What to change for `want` frames: fewer frames (never fewer than MIN_EDIT_FRAMES), an earlier
        start, or a longer clip."""
        options = []
        if want > MIN_EDIT_FRAMES and largest_valid_frames(fit) >= MIN_EDIT_FRAMES:
            options.append(f"--frames {largest_valid_frames(fit)} (the most that fit from there) or --frames auto")
        later = next((j for j in range(s, -1, -1) if fit_from(j) >= want), None)
        if later is not None:
            shown = f"{math.floor(t[later] * 100) / 100:.2f}s" if start.seconds is not None else str(later)
            options.append(f"--start {shown} or earlier for {want} frames")
        if not options:
            return f"use a longer clip (the whole clip, {clip_seconds(t, info):.2f} s, holds {fit_from(0)} frames{rate_desc})"
        return "use " + ", or ".join(options)

    fit = fit_from(s)
    n = frames
    if n is None:
        n = min(max_auto, largest_valid_frames(fit))
        if n < MIN_EDIT_FRAMES:
            raise InputError(f"{info.path}: only {fit} frames fit from --start {start}{rate_desc}; --frames auto needs at least "
                             f"{MIN_EDIT_FRAMES}: {fixes(MIN_EDIT_FRAMES)}")
    elif n > fit:
        seconds = t[-1] - t[s] + 1.0 / src_fps
        raise InputError(f"{info.path}: {seconds:.2f} s from --start {start} holds {fit} frames{rate_desc}, fewer than --frames {n}; "
                         f"{fixes(n)}")

    if spread:
        indices = frame_indices(info.n_frames, n, s, None, path=info.path, times=info.times)
        step = (indices[-1] - indices[0]) / max(1, n - 1) if n > 1 else 1.0
        rate = src_fps / max(step, 1e-9)
    elif stride is not None:
        indices = list(range(s, s + (n - 1) * stride + 1, stride))
        rate = src_fps / stride
    elif rule == "source rate":
        indices = list(range(s, s + n))
    else:
        indices = _nearest_frames(t, t[s] + np.arange(n) / rate, s)
    return FrameChoice(indices, float(rate), rule, float(t[s]), int(fit))


def _nearest_frames(t: np.ndarray, targets: np.ndarray, first: int) -> list[int]:
    """The source frame nearest each target instant, strictly increasing from `first`."""
    out: list[int] = []
    for target in targets:
        j = int(np.clip(np.searchsorted(t, target), 1, len(t) - 1))
        j = j - 1 if abs(t[j - 1] - target) <= abs(t[j] - target) else j
        j = max(j, out[-1] + 1 if out else first)
        out.append(min(j, len(t) - 1))
    return out


def read_video_frames(path: str | Path, indices: list[int]) -> np.ndarray:
    """Decode the frames at `indices` (in decode order) → (N, H, W, 3) uint8 RGB."""
    wanted = sorted(set(indices))
    found: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = _stream(container)
        rotation = size = stored = None
        warned = False
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if rotation is None:
                    rotation, size, stored = _rotation(stream, frame), _display_size(stream, frame), (frame.width, frame.height)
                elif (frame.width, frame.height) != stored and not warned:
                    _warn_size_change(path, i, frame, stored)
                    warned = True
                if i in indices:
                    found[i] = _apply_rotation(_rgb(frame, size), rotation)
                if i >= wanted[-1]:
                    break
        except av.error.FFmpegError:
            pass
    missing = [j for j in wanted if j not in found]
    if missing:
        raise InputError(f"{path}: frame {missing[0]} could not be decoded (the file has {i + 1} readable frames); ask for fewer frames or re-encode it")
    return np.stack([found[j] for j in indices])


def iter_video_frames(path: str | Path, first: int, last: int, max_width: int | None = None):
    """Yield (index, frame) for the source frames first..last in order, each (H, W, 3) uint8 RGB,
    shrunk to at most `max_width` pixels wide (INTER_AREA) when given: a long run of frames
    without holding them all at full size."""
    with _open(path) as container:
        stream = _stream(container)
        rotation = size = stored = None
        warned = False
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i > last:
                    break
                if size is None:
                    size, stored = _display_size(stream, frame), (frame.width, frame.height)
                elif (frame.width, frame.height) != stored and not warned:
                    _warn_size_change(path, i, frame, stored)
                    warned = True
                if i < first:
                    continue
                if rotation is None:
                    rotation = _rotation(stream, frame)
                img = _apply_rotation(_rgb(frame, size), rotation)
                if max_width and img.shape[1] > max_width:
                    h = max(1, round(img.shape[0] * max_width / img.shape[1]))
                    img = cv2.resize(img, (max_width, h), interpolation=cv2.INTER_AREA)
                yield i, img
        except av.error.FFmpegError:
            return  # a truncated file: what could be read


def default_size(width: int, height: int, budget: int = PIXEL_BUDGET_480P) -> tuple[int, int]:
    """The working size for a width×height clip: its own aspect ratio at about `budget` pixels,
    both sides multiples of 16 (a square clip → 640×640). Footage within 3% of Wan's 832×480
    bucket's aspect (16:9 and the like) gets exactly that bucket, the size the 480P models were
    trained at; any other aspect keeps its shape rather than being centre-cropped to it."""
    aspect = width / height
    bucket = LANDSCAPE if width >= height else PORTRAIT
    scale = math.sqrt(budget / PIXEL_BUDGET_480P)
    bucket = (_multiple_of_16(bucket[0] * scale), _multiple_of_16(bucket[1] * scale))
    if abs(bucket[0] / bucket[1] / aspect - 1) <= 0.03:
        return bucket
    return aspect_size(width, height, budget)


def aspect_size(width: int, height: int, budget: int = PIXEL_BUDGET_480P) -> tuple[int, int]:
    """Multiples of 16 with width×height's aspect ratio and about `budget` pixels."""
    aspect = width / height
    h = _multiple_of_16(math.sqrt(budget / aspect))
    return _multiple_of_16(h * aspect), h


def _multiple_of_16(x: float) -> int:
    return max(16, int(round(x / 16)) * 16)


def crop_window(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The part (x0, y0, x1, y1) of a src_w×src_h frame that fit_to_size keeps at width×height."""
    scale = max(width / src_w, height / src_h)
    kw, kh = min(src_w, width / scale), min(src_h, height / scale)
    x0, y0 = (src_w - kw) / 2, (src_h - kh) / 2
    return int(round(x0)), int(round(y0)), int(round(x0 + kw)), int(round(y0 + kh))


def crop_fraction(src_w: int, src_h: int, width: int, height: int) -> float:
    """The fraction of the source frame that fitting it to width×height cuts away."""
    x0, y0, x1, y1 = crop_window(src_w, src_h, width, height)
    return 1.0 - (x1 - x0) * (y1 - y0) / (src_w * src_h)


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' → (832, 480); both sides must be positive multiples of 16."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {text!r}: write it as WIDTHxHEIGHT, e.g. 832x480") from None
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise InputError(f"--size {text}: width and height must be positive multiples of 16 (e.g. 832x480)")
    return w, h


def fit_to_size(img: np.ndarray, width: int, height: int, nearest: bool = False) -> np.ndarray:
    """Resize to cover (width, height) keeping aspect, then centre-crop. Works for (H,W) and (H,W,C)."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    scale = max(width / w, height / h)
    nw, nh = max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6))
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(img, (nw, nh), interpolation=interp)
    x0, y0 = (nw - width) // 2, (nh - height) // 2
    return np.ascontiguousarray(resized[y0 : y0 + height, x0 : x0 + width])


def read_image(path: str | Path) -> np.ndarray:
    """Any PNG/JPEG (grayscale, 16-bit, palette, alpha) → (H, W, 3) uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file; check the path")
    try:
        with Image.open(path) as opened:
            opened.load()
            # a phone photo is stored sideways with an EXIF orientation tag: turned as viewers show it
            im = ImageOps.exif_transpose(opened) or opened
            if im.mode == "F":  # floating-point TIFF: 0…1 (or 0…255) light levels, not 8-bit codes
                arr = np.asarray(im, dtype=np.float64)
                peak = 1.0 if np.nanmax(arr) <= 1.0 else 255.0
                arr = np.clip(np.nan_to_num(arr) / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if arr.max() > 255 else 255.0
                arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # composite transparent pixels onto black rather than keeping undefined colours
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot be read as an image ({exc.__class__.__name__}); save it as PNG") from None


def fit_edited(img: np.ndarray, width: int, height: int, src_w: int, src_h: int, path: str,
               stored: tuple[int, int] | None = None, quiet: bool = False) -> np.ndarray:
    """An edited frame → the working size. One already at the working size is used as it is;
    another size than the source's is fine (resized, with a warning) when its aspect matches
    within 2%; another aspect is an InputError. (The same rule as prepare.fit_edited.)
    stored: an anamorphic video's stored size; a frame grabbed at that size (ffmpeg -frames:v 1) is
    the same picture, widened or narrowed to the displayed size as players do."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img  # already at the working size (e.g. edited from a frame of `loraedit masks` or prepare)
    if stored is not None and (w, h) == tuple(stored):
        img = cv2.resize(img, (src_w, src_h), interpolation=cv2.INTER_CUBIC)
        h, w = img.shape[:2]
    if (w, h) != (src_w, src_h):
        if abs(w / h - src_w / src_h) > 0.02 * (src_w / src_h):
            raise InputError(f"{path}: is {w}x{h}, a different aspect ratio from the video's {src_w}x{src_h}; crop or pad it to the video's aspect")
        if not quiet:
            logging.getLogger("loraedit").warning("%s: is %dx%d, the video %dx%d; resizing it to match", path, w, h, src_w, src_h)
        img = fit_to_size(img, src_w, src_h)
    return fit_to_size(img, width, height)


def image_alpha(path: str | Path) -> np.ndarray | None:
    """(H, W) uint8 opacity of an image with transparent pixels (turned as read_image turns it), else None."""
    with Image.open(path) as im:
        if not (im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)):
            return None
        rgba = im.convert("RGBA")
        alpha = np.asarray(ImageOps.exif_transpose(rgba) or rgba)[..., 3]
    return None if alpha.min() == 255 else alpha


def _over(rgb_on_black: np.ndarray, alpha: np.ndarray, under: np.ndarray, path) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / 255.0
    logging.getLogger("loraedit").info("%s: %.0f%% of it is transparent; the video's frame shows there", path,
                                       100 * float((alpha < 128).mean()))
    # read_image composited the image onto black: rgb = colour × alpha
    return np.clip(rgb_on_black.astype(np.float32) + under.astype(np.float32) * (1 - a) + 0.5, 0, 255).astype(np.uint8)


def read_edited_fitted(path: str | Path, frame: np.ndarray, src_w: int, src_h: int, stored: tuple[int, int] | None = None) -> np.ndarray:
    """An edited frame at the working size of `frame` (a prepared frame, H×W), where it is transparent
    showing `frame`: the image is fitted first, the way the frames were, then composited, so the
    video shows through in the right place."""
    height, width = frame.shape[:2]
    img = fit_edited(read_image(path), width, height, src_w, src_h, str(path), stored)
    alpha = image_alpha(path)
    if alpha is None:
        return img
    a = fit_edited(np.repeat(alpha[..., None], 3, axis=2), width, height, src_w, src_h, str(path), stored, quiet=True)[..., 0]
    return _over(img, a, frame, path)


def read_edited(path: str | Path, source_frame: np.ndarray) -> np.ndarray:
    """An edited frame → (H, W, 3) uint8 RGB. Where it is transparent (an edit exported as a layer,
    a PNG with the background erased) it shows `source_frame`, the video frame it edits at the
    source's size (whole, uncropped: the image is the same picture at its own size, so it is
    resized to it): transparent pixels mean "unchanged", not black."""
    rgb = read_image(path)
    alpha = image_alpha(path)
    if alpha is None or alpha.shape != rgb.shape[:2]:
        return rgb
    h, w = rgb.shape[:2]
    sh, sw = source_frame.shape[:2]
    if abs(w / h - sw / sh) <= 0.02 * sw / sh:  # the source's picture, or the working size's crop of it
        under = fit_to_size(source_frame, w, h)
    else:  # an anamorphic video's stored size: the same picture, squeezed
        under = cv2.resize(source_frame, (w, h), interpolation=cv2.INTER_AREA)
    return _over(rgb, alpha, under, path)


def read_gray(path: str | Path) -> np.ndarray:
    """An image as (H, W) uint8 luminance (for masks)."""
    rgb = read_image(path)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def write_png(path: str | Path, img: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def write_video(path: str | Path, frames: np.ndarray, fps: float, lossless: bool = False, audio_from: str | None = None) -> None:
    """Write (N, H, W, 3) uint8 frames: H.264 mp4 (yuv420p, plays everywhere) or lossless FFV1 mkv.

    `audio_from`: a source file whose first audio stream is copied in (cut to the video's length).
    """
    frames = np.asarray(frames)
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_output(path) as tmp:
        # bitexact: no random segment id or muxer version in the file, so the same frames give the same bytes
        with av.open(str(tmp), mode="w", options={"fflags": "+bitexact"}) as out:
            if lossless:
                stream = out.add_stream("ffv1", rate=rate)
                stream.pix_fmt = "bgr0" if frames.ndim == 4 else "gray"  # FFV1 takes no rgb24; bgr0 is lossless RGB
            else:
                stream = out.add_stream("libx264", rate=rate)
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "16", "preset": "medium"}
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            if not lossless and (stream.width % 2 or stream.height % 2):
                raise ValueError("H.264 needs even frame sizes")
            audio_in = audio_out = None
            transcode = False
            if audio_from is not None:
                audio_in = av.open(str(audio_from))
                if audio_in.streams.audio:
                    src = audio_in.streams.audio[0]
                    try:
                        audio_out = out.add_stream_from_template(src)
                    except ValueError:
                        # a codec the container cannot hold (old cameras' ADPCM or µ-law in an AVI):
                        # re-encoded to AAC, which every player takes
                        audio_out = out.add_stream("aac", rate=src.rate or 48000)
                        transcode = True
            fmt = "rgb24" if frames.ndim == 4 else "gray"
            for img in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format=fmt)):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
            if audio_out is not None:
                duration = len(frames) / float(rate)
                src = audio_in.streams.audio[0]
                if transcode:
                    samples = 0
                    for frame in audio_in.decode(src):
                        if frame.time is not None and frame.time > duration:
                            break
                        # timestamps in samples from the start, as the encoder's time base counts them
                        frame.pts, frame.time_base = samples, Fraction(1, frame.sample_rate)
                        samples += frame.samples
                        out.mux(audio_out.encode(frame))
                    out.mux(audio_out.encode(None))
                for packet in [] if transcode else audio_in.demux(src):
                    if packet.dts is None:
                        continue
                    if packet.pts is not None and packet.pts * src.time_base > duration:
                        break
                    packet.stream = audio_out
                    out.mux(packet)
            if audio_in is not None:
                audio_in.close()
