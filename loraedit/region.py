"""Finding the edit region in frame 0 and following it through the video (OpenCV only, no weights).

    find_edit_region(source0, edited0)  where the edited first frame differs from the source's
    follow_region(frames, region0, ...)  one region per frame, and what moved it (Followed)
    track_region(...)                    the same, regions only

Finding: both frames are blurred (a generative editor re-renders fine texture everywhere, so
pixel-exact differences are mostly noise), compared in CIE Lab, thresholded (Otsu on the colour
difference, never below a floor), cleaned with morphology (opening removes speckle, closing and
hole filling make one solid region per object), and components that are small — in absolute terms
or next to the largest one — are dropped.

Following works on frames scaled to at most FLOW_MAX_SIDE pixels. The amodal region A_t (the
whole object, seen or not) is frame 0's region under the accumulated motion C_t = M_t ∘ … ∘ M_1,
warped afresh from frame 0 each time (so it does not erode, and a region panned out of the frame
comes back however far it went). What M_t is, is decided each frame from the evidence (global
motion vs the region's own motion vs texture; see follow_region):
  static / camera  the scene's motion (corners away from the region; identity for a still camera)
  object           the region's own motion — the best of Lucas-Kanade corners, a fit to the DIS
                   dense flow, the last motion and a template search, by how much of the region
                   each predicts in frame t (7×7 normalised correlation) — once it is evidence that
                   the region moves otherwise than the scene
  on-object        for an edit that adds content: the motion of the foreground it touches
The output: held by the scene, A_t less what an occluder covers; following its own pixels, the
visible region V_t (V_{t-1} pulled along the backward flow where the flow passes the
forward-backward and patch checks, plus the textured pixels of A_t that look as M_t predicts,
kept within a margin around A_t; it may shrink to nothing and come back); an addition or a box
given by the user, A_t (a box holds background too, whose pixels would otherwise smear it).

Not handled: an object that leaves the frame by its own motion (the camera still) and comes back
elsewhere is not re-found — its region stays where the scene carried it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from loraedit.errors import InputError

# ------------------------------------------------------------------ finding the region in frame 0

DIFF_FLOOR = 10.0  # CIE76 ΔE below this is never an edit (just-noticeable is about 2.3; JPEG/gen. noise ≈ 5)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=-1)
    return out.astype(bool)


def _ellipse(k: int) -> np.ndarray:
    k = max(1, int(k))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def drop_small(mask: np.ndarray, min_area: float, relative: float = 0.0) -> np.ndarray:
    """Keep the connected components of at least `min_area` (fraction of the frame) and at least
    `relative` × the largest component's area."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep_min = max(min_area * mask.size, relative * areas.max())
    keep = np.zeros(n, bool)
    keep[1:] = areas >= keep_min
    return keep[labels]


def colour_difference(source0: np.ndarray, edited0: np.ndarray) -> np.ndarray:
    """(H, W) CIE76 ΔE between the two frames after a blur that scales with the frame size."""
    H, W = source0.shape[:2]
    sigma = max(1.0, min(H, W) / 128)

    def lab(img):
        f = cv2.GaussianBlur(img.astype(np.float32) / 255.0, (0, 0), sigma)
        return cv2.cvtColor(f, cv2.COLOR_RGB2Lab)

    return np.linalg.norm(lab(source0) - lab(edited0), axis=-1)


def find_edit_region(source0: np.ndarray, edited0: np.ndarray, threshold: float = 0.0, min_area: float = 0.002,
                     relative: float = 0.1, where: str = "--first-frame") -> np.ndarray:
    """(H, W) bool: where the edited first frame differs from the source's first frame.

    threshold: ΔE above which a pixel is edited; 0 = automatic (Otsu, at least DIFF_FLOOR).
    Raises InputError when nothing is found.
    """
    if source0.shape != edited0.shape:
        raise ValueError(f"frames differ in shape: {source0.shape} vs {edited0.shape}")
    H, W = source0.shape[:2]
    de = colour_difference(source0, edited0)
    if threshold <= 0:
        u8 = np.clip(de * 2.0, 0, 255).astype(np.uint8)  # ΔE in half units, up to 127.5
        otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(DIFF_FLOOR, otsu / 2.0)
    mask = (de > threshold).astype(np.uint8)
    k = max(3, round(min(H, W) / 100) | 1)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _ellipse(k))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _ellipse(3 * k))
    filled = _fill_holes(mask)
    mask = drop_small(filled, min_area, relative)
    if not mask.any() and filled.any():
        n, _, stats, _ = cv2.connectedComponentsWithStats(filled.astype(np.uint8), connectivity=8)
        largest = float(stats[1:, cv2.CC_STAT_AREA].max()) / (H * W)
        raise InputError(f"{where}: the edit is smaller than --min-region {min_area:g} (its largest part covers "
                         f"{largest:.2%} of the frame); lower --min-region (e.g. {max(largest / 2, 1e-5):.2g}), or give the "
                         "region with --box x0,y0,x1,y1")
    if not mask.any():
        raise InputError(f"{where}: no edit found — the edited first frame matches the source's first frame "
                         f"(largest colour difference ΔE {de.max():.1f}, threshold {threshold:.1f}); "
                         "check that it is the edited frame, or give the region with --box x0,y0,x1,y1 or --mask")
    return mask


# ------------------------------------------------------------------ optical flow

FLOW_MAX_SIDE = 480  # flow is computed on frames scaled to at most this long side
TEXTURE_MIN = 20.0  # mean Sobel magnitude over 7×7 below which a patch is flat
MIN_PREDICTION = 0.2  # a motion that explains less of the region than this is not believed
NCC_MIN = 0.7  # 7×7 patches correlating less than this are not the same content
FLAT_VAR = 9.0  # grey-level variance below which a patch is flat (std 3)
FLAT_DIFF = 10.0  # flat patches match when their mean grey differs less than this
MAX_SCALE_STEP = 1.08  # most a region may grow or shrink between consecutive frames  # grey levels: a pixel differing more from its flow source is not followed


class _Flow:
    """Forward and backward DIS flow between consecutive frames, at a reduced scale, in pixels of
    that scale."""

    def __init__(self, frames: np.ndarray):
        F, H, W = frames.shape[:3]
        self.scale = min(1.0, FLOW_MAX_SIDE / max(H, W))
        self.h, self.w = max(8, round(H * self.scale)), max(8, round(W * self.scale))
        self.gray = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (self.w, self.h), interpolation=cv2.INTER_AREA) for f in frames]
        self.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def textured(self, t: int) -> np.ndarray:
        """Where frame t has enough local contrast for its flow to mean something."""
        g = self.gray[t].astype(np.float32)
        mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3))
        return cv2.blur(mag, (7, 7)) > TEXTURE_MIN

    def pair(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(forward t-1 → t, backward t → t-1), each (h, w, 2) float32."""
        a, b = self.gray[t - 1], self.gray[t]
        fwd = self.dis.calc(a, b, None)
        bwd = self.dis.calc(b, a, None)
        return fwd, bwd


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs, ys


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    if len(src) < 6:
        return None
    M, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=1.5, maxIters=500, confidence=0.98)
    if M is None or inliers is None or inliers.sum() < 6:
        return None
    scale = float(np.hypot(M[0, 0], M[1, 0]))
    if not MAX_SCALE_STEP ** -1 <= scale <= MAX_SCALE_STEP:
        # a big size change from one frame to the next is a fit mixing two motions: use the median
        return _translation(np.median(dst - src, axis=0))
    return M.astype(np.float32)


def _lk_points(a: np.ndarray, b: np.ndarray, where: np.ndarray, corners: int = 400, spacing: int = 3) -> tuple[np.ndarray, np.ndarray] | None:
    """Corners of frame a inside `where` tracked into frame b by Lucas-Kanade, kept where tracking
    back lands within half a pixel: (src (N, 2), dst (N, 2)), or None for fewer than 8."""
    pts = cv2.goodFeaturesToTrack(a, maxCorners=corners, qualityLevel=0.01, minDistance=spacing, mask=where.astype(np.uint8))
    if pts is None or len(pts) < 8:
        return None
    lk = dict(winSize=(15, 15), maxLevel=4, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    nxt, st, _ = cv2.calcOpticalFlowPyrLK(a, b, pts, None, **lk)
    back, st2, _ = cv2.calcOpticalFlowPyrLK(b, a, nxt, None, **lk)
    good = (st[:, 0] == 1) & (st2[:, 0] == 1) & (np.linalg.norm((back - pts)[:, 0], axis=1) < 0.5)
    if good.sum() < 8:
        return None
    return pts[good, 0], nxt[good, 0]


def _lk_motion(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> np.ndarray | None:
    tracked = _lk_points(a, b, where)
    return None if tracked is None else _similarity(*tracked)


def _patch_match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where 7×7 patches of a and b show the same thing: normalised cross-correlation above
    NCC_MIN (indifferent to brightness and contrast, so a subject walking from shade into light
    still matches itself, while a texture shifted by a few pixels does not); flat patches, where
    correlation means nothing, match when their brightness is close."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    k = (7, 7)
    ma, mb = cv2.blur(a, k), cv2.blur(b, k)
    va = np.maximum(cv2.blur(a * a, k) - ma * ma, 0)
    vb = np.maximum(cv2.blur(b * b, k) - mb * mb, 0)
    cov = cv2.blur(a * b, k) - ma * mb
    ncc = cov / np.sqrt(va * vb + 1e-6)
    flat = (va < FLAT_VAR) & (vb < FLAT_VAR)
    return np.where(flat, np.abs(ma - mb) < FLAT_DIFF, ncc > NCC_MIN)


def _template_motion(a: np.ndarray, b: np.ndarray, where: np.ndarray, last: np.ndarray | None) -> np.ndarray | None:
    """The translation that best matches the region's bounding patch of frame a in frame b
    (normalised correlation), searched around where the last motion would put it: for fast
    motion of fine texture, where both flows fail."""
    x, y, bw, bh = cv2.boundingRect(where.astype(np.uint8))
    if bw < 8 or bh < 8:
        return None
    h, w = a.shape
    d = last[:, 2] if last is not None else np.zeros(2)
    r = int(min(32, max(8, 0.5 * np.hypot(*d) + 6)))
    cx, cy = int(round(x + d[0])), int(round(y + d[1]))
    x0, y0 = max(0, cx - r), max(0, cy - r)
    x1, y1 = min(w, cx + bw + r), min(h, cy + bh + r)
    if x1 - x0 < bw or y1 - y0 < bh:
        return None
    res = cv2.matchTemplate(b[y0:y1, x0:x1], a[y:y + bh, x:x + bw], cv2.TM_CCOEFF_NORMED)
    _, best, _, (bx, by) = cv2.minMaxLoc(res)
    if best < 0.5:
        return None
    return _translation(np.array([x0 + bx - x, y0 + by - y], np.float32))


def _prediction_score(a: np.ndarray, b: np.ndarray, where: np.ndarray, M: np.ndarray) -> float:
    """The fraction of the region (in frame a) that, moved by M, shows the same content in frame b."""
    h, w = a.shape
    moved = cv2.warpAffine(where.astype(np.float32), M, (w, h), flags=cv2.INTER_LINEAR, borderValue=0) > 0.5
    if moved.sum() < 0.25 * where.sum():  # mostly out of the frame: nothing to judge by
        return 0.0
    predicted = cv2.warpAffine(a, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return float(_patch_match(b, predicted)[moved].mean())


def _translation(d: np.ndarray) -> np.ndarray:
    return np.array([[1, 0, d[0]], [0, 1, d[1]]], np.float32)



# ------------------------------------------------------------------ what moves the region

STILL_PX = 1.0  # corners moving less than this between frames (flow-scale pixels) may have stayed put
PAN_PX = 0.1  # a camera fit moving corners less than this a frame (median, flow-scale pixels) is a still camera
OWN_EXPLAINS = 0.45  # the region's own motion must predict this share of it ...
OWN_MARGIN = 0.1  # ... this much more than the scene's motion does ...
OWN_SHIFT = 0.5  # ... and take it at least this many pixels away from where the scene's would
OWN_TEXTURE = 0.1  # ... and the region must hold this share of textured pixels to judge by
MOVING_PX = 1.0  # a pixel whose flow differs from the scene's by more than this moves by itself
ADDED_CORR = 0.4  # the edit's fine structure correlating less than this with the source's: new content
ADDED_STD = 2.0  # grey levels: an edit with less fine structure than this adds nothing (a recolour)
SUPPORT_COHERENT = 0.5  # the object under an addition must move as one: this share fits one motion
BAND = 0.2  # what an addition touches: within this share of its size (square root of its area)
MOTIONS = ("static", "camera", "object", "on-object", "cut")


def edit_adds_content(source0: np.ndarray, edited0: np.ndarray, region0: np.ndarray) -> bool:
    """Whether the edit puts new things over the source (a hat, an object) rather than changing what
    is there (a recolour keeps the source's fine structure, a removal leaves little of its own).

    The fine structure (grey levels minus a blur) inside the region: the edit adds content when it
    has structure of its own (std ≥ ADDED_STD) that does not correlate with the source's.
    """
    H, W = region0.shape
    sigma = max(1.0, min(H, W) / 256)

    def fine(img):
        g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        return g - cv2.GaussianBlur(g, (0, 0), 2 * sigma)

    # away from the region's border, where a recolour makes a new edge (the region was found on
    # frames blurred by about min(H, W) / 128)
    inner = cv2.erode(region0.astype(np.uint8), _ellipse(2 * round(max(2.0, 3 * min(H, W) / 128)) + 1)).astype(bool)
    if inner.sum() < 50:
        inner = region0
    s, e = fine(source0)[inner], fine(edited0)[inner]
    if e.std() < ADDED_STD or e.std() < 0.5 * s.std():
        return False
    corr = 0.0 if s.std() < 1e-3 else abs(float(np.corrcoef(s, e)[0, 1]))
    return corr < ADDED_CORR


def _spread(points: np.ndarray) -> float:
    """The area of the box holding the middle 80% of the points in each direction (0 for fewer
    than 3): how much of the frame a set of corners covers, a few strays aside."""
    if len(points) < 3:
        return 0.0
    lo, hi = np.percentile(points, [10, 90], axis=0)
    return float(np.prod(hi - lo))


def _scene_motion(a: np.ndarray, b: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, bool]:
    """The camera's motion from frame a to b, fitted to corners outside `exclude`: (2×3 similarity,
    whether the camera is still).

    Not the best fit alone: in a static shot a moving subject may hold the most and best corners
    (plain ground only weak ones, which jitter), and a camera following a subject has the subject's
    corners standing still. The scene is what spreads over the frame: the camera is still when the
    corners that stay put (within a pixel) cover at least as much of the frame as those that move
    with the best fit."""
    tracked = _lk_points(a, b, ~exclude, corners=500, spacing=5)
    if tracked is None:
        return _translation(np.zeros(2)), True
    src, dst = tracked
    M = _similarity(src, dst)
    if M is None:
        M = _translation(np.median(dst - src, axis=0))
    by_fit = src @ M[:, :2].T + M[:, 2]
    if np.median(np.linalg.norm(by_fit - src, axis=1)) < PAN_PX:
        return _translation(np.zeros(2)), True  # the best fit hardly moves anything: a still camera's jitter
    # each corner goes with whichever explains it better, staying put or the fit: a slow pan (under
    # a pixel a frame) moves every corner less than STILL_PX, but the fit explains it far better
    off_still = np.linalg.norm(dst - src, axis=1)
    off_fit = np.linalg.norm(by_fit - dst, axis=1)
    still = (off_still < STILL_PX) & (off_still <= off_fit)
    fits = (off_fit < STILL_PX) & (off_fit < off_still)
    if still.sum() >= 8 and _spread(src[still]) >= _spread(src[fits]):
        return _translation(np.zeros(2)), True
    return M, False


def _motion_field(M: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(h, w, 2): where M takes each pixel, minus the pixel."""
    return np.stack([M[0, 0] * xs + M[0, 1] * ys + M[0, 2] - xs, M[1, 0] * xs + M[1, 1] * ys + M[1, 2] - ys], -1)


def _inverse(M: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(M.astype(np.float64)).astype(np.float32)


def _shift_between(M1: np.ndarray, M2: np.ndarray, where: np.ndarray) -> float:
    """Mean distance (pixels) between where M1 and M2 take the pixels of `where`."""
    yy, xx = np.nonzero(where)
    if len(xx) == 0:
        return 0.0
    p = np.stack([xx, yy, np.ones_like(xx)], 0).astype(np.float32)
    return float(np.linalg.norm((M1 @ p) - (M2 @ p), axis=0).mean())


def _own_motion(fl: _Flow, t: int, inner: np.ndarray, fwd: np.ndarray, f_ok: np.ndarray, last_M, rng) -> tuple[np.ndarray | None, float]:
    """The region's own motion t-1 → t and how much of it that motion predicts: the best of corners
    tracked by Lucas-Kanade (exact where dense flow is smoothed across the object's border or fails
    on fast motion), a fit to the dense flow, and the last motion (constant velocity); when none
    explains the region, a template search as well."""
    candidates = [_lk_motion(fl.gray[t - 1], fl.gray[t], inner)]
    seen = inner & f_ok
    if seen.sum() >= 20:
        yy, xx = np.nonzero(seen)
        pick = rng.choice(len(xx), size=min(len(xx), 2000), replace=False)
        src = np.stack([xx[pick], yy[pick]], 1).astype(np.float32)
        candidates.append(_similarity(src, src + fwd[yy[pick], xx[pick]]))
    candidates.append(last_M)
    candidates = [c for c in candidates if c is not None]
    scores = [_prediction_score(fl.gray[t - 1], fl.gray[t], inner, c) for c in candidates]
    if not scores or max(scores) < 0.5:
        c = _template_motion(fl.gray[t - 1], fl.gray[t], inner, last_M)
        if c is not None:
            candidates.append(c)
            scores.append(_prediction_score(fl.gray[t - 1], fl.gray[t], inner, c))
    if not candidates:
        return None, 0.0
    best = int(np.argmax(scores))
    return (candidates[best], scores[best]) if scores[best] >= MIN_PREDICTION else (None, 0.0)


def _moves_by_itself(fl: _Flow, t: int, inner: np.ndarray, M_own: np.ndarray, s_own: float, G: np.ndarray) -> bool:
    """Whether the region's own motion is evidence that it moves otherwise than the scene: it
    predicts most of the region, better than the scene's motion by a margin, takes it somewhere else, and
    the region has texture to tell (a plain patch matches itself shifted anywhere nearby)."""
    if not inner.any() or float(fl.textured(t - 1)[inner].mean()) < OWN_TEXTURE:
        return False
    if _shift_between(M_own, G, inner) <= OWN_SHIFT:
        return False
    return s_own >= OWN_EXPLAINS and s_own >= _prediction_score(fl.gray[t - 1], fl.gray[t], inner, G) + OWN_MARGIN


@dataclass
class Followed:
    """A region followed through the video and what moved it."""

    regions: np.ndarray  # (F, H, W) bool
    motion: list[str]  # per frame, what moved the region there from the last frame (MOTIONS; frame 0: "start")
    added: bool = False  # the edit adds content over the source (then the region follows what it sits on)
    ambiguous_from: int | None = None  # first frame whose motion the evidence did not settle

    def summary(self) -> str:
        """One line: what the region followed, in runs of frames."""
        runs, start = [], 1
        for t in range(2, len(self.motion) + 1):
            if t == len(self.motion) or self.motion[t] != self.motion[start]:
                runs.append(f"{self.motion[start]} (frames {start}-{t - 1})" if t - 1 > start else f"{self.motion[start]} (frame {start})")
                start = t
        what = {"static": "stays put", "camera": "moves with the camera", "object": "moves with its own pixels",
                "on-object": "moves with the object it sits on", "cut": "held in place across a scene cut"}
        text = "; ".join(r.replace(r.split(" ")[0], what[r.split(" ")[0]], 1) for r in runs) if runs else "one frame"
        return ("an addition — " if self.added else "") + text


def track_region(frames: np.ndarray, region0: np.ndarray, rigid: bool = False, edited0: np.ndarray | None = None) -> np.ndarray:
    """(F, H, W, 3) uint8 frames, (H, W) bool region in frame 0 → (F, H, W) bool, one region per frame
    (see follow_region)."""
    return follow_region(frames, region0, rigid, edited0).regions


def follow_region(frames: np.ndarray, region0: np.ndarray, rigid: bool = False, edited0: np.ndarray | None = None,
                  cuts: tuple[int, ...] | list[int] = ()) -> Followed:
    """Follow a region of frame 0 through the video.

    What moves the region is decided frame by frame from the evidence:
      static / camera  the scene's motion (a still camera: none): by default, and whenever the
                       region's own pixels give no better account of it — a patch over plain,
                       textureless ground can only be seen to move with the scene, so it does
      object           its own pixels, once they visibly move otherwise than the scene (they predict
                       the next frame better than the scene's motion does, by a margin, and there is
                       texture to tell); from then on it follows them
      on-object        for an edit that adds content (edited0 given and edit_adds_content): the source
                       pixels under the region are background, so it moves with the foreground it
                       touches — pixels in and around it whose motion differs from the scene's
    rigid=False: a region that moves with the scene is frame 0's region moved, less the pixels an
    occluder covers (something moving in front that looks otherwise): it never shrinks without a
    visible cause. A region that follows its own pixels is the visible region (pixels pulled along
    the flow). An addition's region is its frame-0 shape moved with the object.
    rigid=True: the amodal region moved as a whole (for a user's box); may extend past the frame
    and come back.
    cuts: frames that start a new shot (shots.py); motion across a cut is nonsense, so there the
    region is held where it was ("cut").
    """
    F, H, W = frames.shape[:3]
    out = np.zeros((F, H, W), bool)
    out[0] = region0
    added = edited0 is not None and not rigid and region0.any() and edit_adds_content(frames[0], edited0, region0)
    result = Followed(out, ["start"], added)
    if F == 1 or not region0.any():
        result.motion += ["static"] * (F - 1)
        return result
    fl = _Flow(frames)
    h, w = fl.h, fl.w
    xs, ys = _grid(h, w)
    small0 = cv2.resize(region0.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    # the amodal region is frame 0's region moved by the accumulated motion C (frame 0 → frame t):
    # warped afresh from frame 0 each time, so it neither erodes nor is lost when it leaves the
    # frame, however far
    C = np.eye(3)
    C_alt = None  # where the scene alone would have taken it, once the motion is ambiguous
    a_frame = (small0 > 0.5).astype(np.float32)
    visible = small0
    rng = np.random.default_rng(0)
    last_M = None

    def reference(C):
        """How the region looked in frame 0, moved to where C takes it: pixels there that look
        otherwise are something in front of it, whose motion is not the region's."""
        return cv2.warpAffine(fl.gray[0], C[:2].astype(np.float32), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    own = False  # the region's own pixels have been seen to move by themselves
    for t in range(1, F):
        if t in cuts:
            result.motion.append("cut")
            out[t] = out[t - 1]
            continue
        fwd, bwd = fl.pair(t)
        # forward-backward consistency of the backward flow: for p in frame t, p + bwd(p) in t-1
        mx, my = xs + bwd[..., 0], ys + bwd[..., 1]
        fwd_at = cv2.remap(fwd, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        err = np.hypot(bwd[..., 0] + fwd_at[..., 0], bwd[..., 1] + fwd_at[..., 1])
        mag = np.hypot(bwd[..., 0], bwd[..., 1])
        # ... and brightness constancy: where a pixel's colour differs from where its flow says it
        # came from, the flow is a guess (textureless occluders, new content)
        photo_ok = _patch_match(fl.gray[t], cv2.remap(fl.gray[t - 1], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
        consistent = (err < np.maximum(1.0, 0.15 * mag)) & photo_ok
        inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
        # the same check for the forward flow, to choose the pixels that fit the region's motion
        bx, by = xs + fwd[..., 0], ys + fwd[..., 1]
        bwd_at = cv2.remap(bwd, bx, by, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        f_ok = np.hypot(fwd[..., 0] + bwd_at[..., 0], fwd[..., 1] + bwd_at[..., 1]) < np.maximum(1.0, 0.15 * np.hypot(fwd[..., 0], fwd[..., 1]))

        vb_in = (visible > 0.5).astype(np.uint8)
        core = cv2.erode(vb_in, _ellipse(2 * round(1 + 0.05 * np.sqrt(vb_in.sum())) + 1)).astype(bool)
        inner = core if core.sum() >= 20 else vb_in.astype(bool)
        a_bin = (a_frame > 0.5).astype(np.uint8)
        # the region's own motion: mostly hidden, its pixels say nothing
        M_own, s_own = (None, 0.0)
        if vb_in.sum() >= max(20, 0.3 * float(a_bin.sum())):
            M_own, s_own = _own_motion(fl, t, inner, fwd, f_ok, None if added else last_M, rng)
        # the scene's (camera's) motion, from everything away from the region (not needed while a
        # region follows its own pixels and they are seen)
        G, still = _translation(np.zeros(2)), True
        if added or C_alt is not None or M_own is None or not (rigid or own):
            G, still = _scene_motion(fl.gray[t - 1], fl.gray[t], cv2.dilate(a_bin, _ellipse(9)).astype(bool))
        M, label = G, "static" if still else "camera"
        if rigid or (own and M_own is not None):
            if M_own is not None:
                M, label = M_own, "object"
        elif M_own is not None and _moves_by_itself(fl, t, inner & _patch_match(fl.gray[t - 1], reference(C)), M_own, s_own, G):
            # the region moves by itself only on evidence: its own motion explains it better than
            # the scene's, takes it somewhere else, and it has texture to tell
            M, label = M_own, "object"
            own = own or not added
        if added:
            # an addition moves with the foreground it touches: pixels in and around it that move
            # unlike the source pixels under it (the background right behind it, so parallax does
            # not count) and, in a still shot, unlike the scene (a moving camera's fit is no
            # reference: parallax). With none such it follows its own pixels when they move by
            # themselves (an addition on an object's surface, like glasses, has the object's
            # pixels under it), else the scene.
            size = np.sqrt(max(1.0, float(a_bin.sum())))
            band = cv2.dilate(a_bin, _ellipse(2 * round(BAND * size) + 1)).astype(bool)
            behind = M_own if M_own is not None else G
            unlike_behind = np.linalg.norm(fwd - _motion_field(behind, xs, ys), axis=-1) > MOVING_PX
            unlike_scene = np.linalg.norm(fwd - _motion_field(G, xs, ys), axis=-1) > MOVING_PX if still else True
            textured = fl.textured(t - 1)
            support = band & f_ok & textured & unlike_behind & unlike_scene
            if support.sum() >= max(20, 0.05 * float((band & textured).sum())):
                yy, xx = np.nonzero(support)
                pick = rng.choice(len(xx), size=min(len(xx), 2000), replace=False)
                src = np.stack([xx[pick], yy[pick]], 1).astype(np.float32)
                dst = src + fwd[yy[pick], xx[pick]]
                fit, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=1.5, maxIters=500, confidence=0.98)
                lk = _lk_motion(fl.gray[t - 1], fl.gray[t], support)
                M_obj = lk if lk is not None else _similarity(src, dst)
                if M_obj is not None:
                    M, label = M_obj, "on-object"
                    if fit is None or inl is None or inl.mean() < SUPPORT_COHERENT:
                        # what it touches does not move as one (two objects, or a deforming one)
                        if result.ambiguous_from is None:
                            result.ambiguous_from = t
        if result.ambiguous_from is not None and C_alt is None:
            C_alt = C.copy()
        if C_alt is not None:
            C_alt = np.vstack([G, [0, 0, 1]]) @ C_alt
        last_M = M
        result.motion.append(label)
        C = np.vstack([M, [0, 0, 1]]) @ C
        a_frame = (cv2.warpAffine(small0, C[:2].astype(np.float32), (w, h), flags=cv2.INTER_LINEAR, borderValue=0) > 0.5).astype(np.float32)

        if rigid or added:
            visible = a_frame.copy()
            if C_alt is not None:
                # the evidence did not settle where it went: cover both places
                alt = cv2.warpAffine(small0, C_alt[:2].astype(np.float32), (w, h), flags=cv2.INTER_LINEAR, borderValue=0) > 0.5
                visible = np.maximum(visible, alt.astype(np.float32))
        elif not own:
            # it moves with the scene: frame 0's region moved, less what an occluder covers — pixels
            # that look otherwise than the region did and move otherwise than the scene
            ref = reference(C)
            back_scene = _motion_field(_inverse(G), xs, ys)
            moving = np.linalg.norm(bwd - back_scene, axis=-1) > MOVING_PX
            occluded = ~_patch_match(fl.gray[t], ref) & cv2.dilate(moving.astype(np.uint8), _ellipse(5)).astype(bool)
            occluded = cv2.morphologyEx(occluded.astype(np.uint8), cv2.MORPH_OPEN, _ellipse(3)).astype(bool)
            visible = ((a_frame > 0.5) & ~occluded).astype(np.float32)
        else:
            pulled = cv2.remap(visible, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            pulled = np.where(consistent & inside, pulled, 0.0)
            # amodal pixels that look as the region's motion predicts from frame t-1: the region's
            # own pixels, seen again (after an occlusion, or where the dense flow failed)
            predicted = cv2.warpAffine(fl.gray[t - 1], M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            agree = (a_frame > 0.5) & _patch_match(fl.gray[t], predicted) & fl.textured(t)
            visible = np.maximum(pulled, agree.astype(np.float32))
            # the visible region never strays far from the object as a whole: this stops the
            # pulled mask from bleeding onto what passes behind or in front of it
            a_area = float(a_frame.sum())
            if a_area > 0:
                margin = 2 * round(2 + 0.1 * np.sqrt(small0.sum() * abs(np.linalg.det(C[:2, :2])))) + 1
                near = cv2.dilate(a_frame, _ellipse(margin))
                visible = visible * near
            vb = (visible > 0.5).astype(np.uint8)
            vb = cv2.morphologyEx(vb, cv2.MORPH_OPEN, _ellipse(3))
            vb = cv2.morphologyEx(vb, cv2.MORPH_CLOSE, _ellipse(5))
            visible = vb.astype(np.float32)
        out[t] = cv2.resize(visible, (W, H), interpolation=cv2.INTER_LINEAR) > 0.5
    return result
