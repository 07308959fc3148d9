"""Shots and scene cuts in the frames to be edited.

An edit cannot carry across a scene cut (the first frame's edit has nothing to follow in the next
shot) and the region tracker follows nonsense across one, so prepare refuses a selection that
spans a cut, and `loraedit masks` reports the shots.

The detector is PySceneDetect's, written here with OpenCV on the same principle rather than
imported: PySceneDetect 0.7 requires the `opencv-python` wheel, which clashes with the
`opencv-python-headless` one loraedit uses (both install the `cv2` package; whichever comes second
overwrites the other, and removing one breaks the other), and it would decode the video again
through its own backend when the frames are already at hand. What is reproduced:
  - ContentDetector's frame score: the mean absolute difference of hue, saturation and value
    between consecutive frames (HSV, 8-bit, equal weights), on frames shrunk to about 256 pixels
    wide as PySceneDetect's SceneManager does by default;
  - AdaptiveDetector's decision: a cut where a frame's score is at least MIN_CONTENT and at least
    ADAPTIVE_RATIO times the mean score of the WINDOW frames either side, so that fast camera
    motion (every frame changes a lot) is not taken for a cut, while a cut in a still scene is.
Scores are computed on consecutive *source* frames over the span of the selected ones, so a cut
is placed at its exact source time whatever rate the frames are resampled to. Gradual transitions
(fades, dissolves) are not detected.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from loraedit.errors import InputError
from loraedit.video import VideoInfo, iter_video_frames, largest_valid_frames, probe_video, source_times

log = logging.getLogger("loraedit")

SCORE_WIDTH = 256  # PySceneDetect's default effective width for detection
MIN_CONTENT = 15.0  # AdaptiveDetector's min_content_val
ADAPTIVE_RATIO = 3.0  # AdaptiveDetector's adaptive_threshold
WINDOW = 2  # AdaptiveDetector's window_width (frames either side)
DARK = 24  # HSV value (0-255) at or below which hue and saturation are not compared


@dataclass(frozen=True)
class Cut:
    frame: int  # the first source frame of the new shot
    time: float  # its source time, seconds
    score: float  # content score across the cut (mean HSV difference, 0-255)
    ratio: float  # the score over the mean score of the frames around it


@dataclass(frozen=True)
class Shot:
    first: int  # source frames first..last
    last: int
    start: float  # source times, seconds
    end: float


# ------------------------------------------------------------------ scores and cuts (pure)


def hsv_small(frame: np.ndarray, width: int = SCORE_WIDTH) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (h, w, 3) uint8 HSV about `width` wide (never enlarged)."""
    h, w = frame.shape[:2]
    if w > width:
        frame = cv2.resize(frame, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)


def content_score(a_hsv: np.ndarray, b_hsv: np.ndarray) -> float:
    """ContentDetector's frame score: mean |ΔH|, |ΔS|, |ΔV| averaged over the three channels.

    Two departures, both where HSV is ill-defined: hue is compared around its circle (OpenCV's
    0..179), and hue and saturation count only where either pixel is brighter than DARK, since
    near black they are noise (a fade's last dark frames otherwise score as a cut)."""
    a, b = a_hsv.astype(np.int16), b_hsv.astype(np.int16)  # (h, w, 3)
    d = np.abs(a - b)
    d[..., 0] = np.minimum(d[..., 0], 180 - d[..., 0])
    lit = np.maximum(a[..., 2], b[..., 2]) > DARK  # (h, w)
    d[..., :2] *= lit[..., None]
    return float(d.reshape(-1, 3).mean(axis=0).mean())


def find_cuts(scores: np.ndarray, min_content: float = MIN_CONTENT, ratio: float = ADAPTIVE_RATIO,
              window: int = WINDOW) -> list[tuple[int, float]]:
    """scores (N,): scores[i] compares frame i-1 with frame i (scores[0] is unused) → [(i, ratio)]
    for each i where a new shot starts."""
    out = []
    n = len(scores)
    for i in range(1, n):
        if scores[i] < min_content:
            continue
        around = [scores[j] for j in range(max(1, i - window), min(n, i + window + 1)) if j != i]
        mean = float(np.mean(around)) if around else 0.0
        r = 255.0 if mean < 1e-5 else min(scores[i] / mean, 255.0)
        if r >= ratio:
            out.append((i, r))
    return out


# ------------------------------------------------------------------ on a video


def _scan(path: str | Path, first: int, last: int, info: VideoInfo, keep: set[int] | None = None,
          ) -> tuple[list[Cut], dict[int, np.ndarray]]:
    """One decode of source frames first..last (and WINDOW either side, for the ratio): the cuts
    between them, and the frames in `keep` at full size."""
    t = source_times(info)
    lo, hi = max(0, first - WINDOW), min(info.n_frames - 1, last + WINDOW)
    index, scores, prev, kept = [], [], None, {}
    for i, frame in iter_video_frames(path, lo, hi, max_width=None if keep else SCORE_WIDTH * 2):
        if keep and i in keep:
            kept[i] = frame
        if frame.shape[1] > SCORE_WIDTH * 2:  # as iter_video_frames shrinks it without `keep`: the same score either way
            frame = cv2.resize(frame, (SCORE_WIDTH * 2, max(1, round(frame.shape[0] * SCORE_WIDTH * 2 / frame.shape[1]))),
                               interpolation=cv2.INTER_AREA)
        hsv = hsv_small(frame)
        scores.append(0.0 if prev is None or prev.shape != hsv.shape else content_score(prev, hsv))
        index.append(i)
        prev = hsv
    scores = np.asarray(scores)
    cuts = [Cut(index[k], float(t[index[k]]), float(scores[k]), float(r)) for k, r in find_cuts(scores) if first < index[k] <= last]
    return cuts, kept


def detect_cuts(path: str | Path, first: int, last: int, info: VideoInfo | None = None) -> list[Cut]:
    """The scene cuts between source frames first..last (a cut at frame j: j-1 and j differ in shot)."""
    return _scan(path, first, last, info or probe_video(path))[0]


def read_frames_and_cuts(path: str | Path, indices: list[int], info: VideoInfo) -> tuple[np.ndarray, list[Cut]]:
    """The selected frames (F, H, W, 3) and the cuts between the first and the last of them, in one
    decode of the span (what prepare needs; a second decode would double its reading time)."""
    cuts, kept = _scan(path, indices[0], indices[-1], info, keep=set(indices))
    missing = [i for i in indices if i not in kept]
    if missing:
        raise InputError(f"{path}: frame {missing[0]} could not be decoded (the file has {len(kept) and max(kept) + 1} readable frames); "
                         "ask for fewer frames or re-encode it")
    return np.stack([kept[i] for i in indices]), cuts


def shots_between(cuts: list[Cut], first: int, last: int, info: VideoInfo) -> list[Shot]:
    """The shots that source frames first..last fall in, given the cuts between them."""
    t = source_times(info)
    bounds = [first] + [c.frame for c in cuts] + [last + 1]
    return [Shot(a, b - 1, float(t[a]), float(t[b - 1])) for a, b in zip(bounds, bounds[1:])]


def report(path: str | Path, indices: list[int], info: VideoInfo | None = None) -> dict:
    """Shots and cuts over the selected source frames, for `loraedit masks` and prepare's plan:
    {"cuts": [{"frame", "time", "score", "selected"}], "shots": [{"first", "last", "start", "end", "selected"}]},
    `selected` giving the positions (0..F-1) of the selected frames in each shot / the position
    of the first selected frame after each cut."""
    info = info or probe_video(path)
    cuts = detect_cuts(path, indices[0], indices[-1], info)
    shots = shots_between(cuts, indices[0], indices[-1], info)
    return {
        "cuts": [{"frame": c.frame, "time": round(c.time, 3), "score": round(c.score, 1),
                  "selected": next(k for k, i in enumerate(indices) if i >= c.frame)} for c in cuts],
        "shots": [{"first": s.first, "last": s.last, "start": round(s.start, 3), "end": round(s.end, 3),
                   "selected": [k for k, i in enumerate(indices) if s.first <= i <= s.last]} for s in shots],
    }


def inside_one_shot(shots: list[Shot], frames: int, rate: float) -> tuple[str, int]:
    """A --start / --frames that stays inside one of `shots`: the longest, with `frames` frames if
    they fit at `rate`, else the most that do (4k+1)."""
    best = max(shots, key=lambda s: s.end - s.start)
    fit = int(math.floor((best.end - best.start) * rate + 1e-6)) + 1
    return f"{best.start:.2f}s", min(frames, largest_valid_frames(fit))


def check_no_cuts(path: str | Path, info: VideoInfo, indices: list[int], rate: float, allow_cuts: bool = False,
                  cuts: list[Cut] | None = None) -> list[Cut]:
    """Refuse (InputError, one line) frames that span a scene cut, unless allow_cuts; returns the
    cuts (`cuts`: already found, e.g. by read_frames_and_cuts)."""
    if cuts is None:
        cuts = detect_cuts(path, indices[0], indices[-1], info)
    if not cuts:
        return cuts
    times = ", ".join(f"{c.time:.2f} s (frame {c.frame})" for c in cuts)
    if allow_cuts:
        log.warning("%s: the frames to edit cross %d scene cut%s, at %s; going on (--allow-cuts)",
                    path, len(cuts), "s" if len(cuts) > 1 else "", times)
        return cuts
    found = shots_between(cuts, indices[0], indices[-1], info)
    # the last shot may go on past the selection: look as far as the asked-for frames would reach
    t = source_times(info)
    need = t[cuts[-1].frame] + (len(indices) - 1) / rate
    reach = min(info.n_frames - 1, int(np.searchsorted(t, need + 0.5 / info.fps)))
    if reach > indices[-1]:
        later = detect_cuts(path, indices[-1], reach, info)
        end = later[0].frame - 1 if later else reach
        found[-1] = Shot(found[-1].first, end, found[-1].start, float(t[end]))
    start, frames = inside_one_shot(found, len(indices), rate)
    fix = f"--start {start} --frames {frames} stays inside one shot" if frames >= 5 else "choose a --start inside a longer shot"
    raise InputError(f"{path}: the frames to edit cross a scene cut at {times}, and an edit cannot carry across a cut; "
                     f"{fix} (or --allow-cuts to go on)")
