"""Finding the edit region in frame 0 and following it through the video (OpenCV only, no weights).

    find_edit_region(source0, edited0)   where the edited first frame differs from the source's
    track_region(frames, region0)        one region per frame, by dense optical flow (DIS)

Finding: both frames are blurred (a generative editor re-renders fine texture everywhere, so
pixel-exact differences are mostly noise), compared in CIE Lab, thresholded (Otsu on the colour
difference, never below a floor), cleaned with morphology (opening removes speckle, closing and
hole filling make one solid region per object), and components that are small — in absolute terms
or next to the largest one — are dropped.

Tracking works on frames scaled to at most FLOW_MAX_SIDE pixels and keeps two masks per frame:
  amodal   A_t: the whole object, seen or not: frame 0's region under the accumulated motion
           C_t = M_t ∘ … ∘ M_1, warped afresh from frame 0 each time (so it does not erode, and a
           region panned out of the frame comes back however far it went). M_t, the region's
           similarity motion from t-1 to t, is chosen among candidates — Lucas-Kanade corners in
           the region's interior (RANSAC fit), a fit to the dense DIS flow, the last motion
           (constant velocity) and, when none of those explains the region, a template search —
           by how much of the region each predicts in frame t (7×7 normalised correlation). A
           region mostly hidden (visible < 30% of A_t) moves with the scene instead: the dominant
           motion of everything outside it (the camera), so an occluder cannot drag it away.
  visible  V_t: the region's pixels seen in frame t: V_{t-1} pulled along the backward flow where
           the flow passes the forward-backward and patch checks, plus the textured pixels of A_t
           that look as M_t predicts from frame t-1 (the region's own pixels seen again, after an
           occlusion or where the dense flow failed), kept within a margin around A_t.
A region found by difference is output as V_t (it may shrink to nothing and come back); a box
given by the user is output as A_t clipped to the frame (a box holds background too, whose pixels
would otherwise smear it).

Not handled: an object that leaves the frame by its own motion (the camera still) and comes back
elsewhere is not re-found — its region stays where the scene carried it.
"""

from __future__ import annotations

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
    mask = drop_small(_fill_holes(mask), min_area, relative)
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


def _lk_motion(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> np.ndarray | None:
    pts = cv2.goodFeaturesToTrack(a, maxCorners=400, qualityLevel=0.01, minDistance=3, mask=where.astype(np.uint8))
    if pts is None or len(pts) < 8:
        return None
    lk = dict(winSize=(15, 15), maxLevel=4, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    nxt, st, _ = cv2.calcOpticalFlowPyrLK(a, b, pts, None, **lk)
    back, st2, _ = cv2.calcOpticalFlowPyrLK(b, a, nxt, None, **lk)
    good = (st[:, 0] == 1) & (st2[:, 0] == 1) & (np.linalg.norm((back - pts)[:, 0], axis=1) < 0.5)
    if good.sum() < 8:
        return None
    return _similarity(pts[good, 0], nxt[good, 0])


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


def track_region(frames: np.ndarray, region0: np.ndarray, rigid: bool = False) -> np.ndarray:
    """(F, H, W, 3) uint8 frames, (H, W) bool region in frame 0 → (F, H, W) bool, one region per frame.

    rigid=False: the visible region, following each pixel (for a region found by difference).
    rigid=True: the amodal region moved as a whole (for a user's box); may extend past the frame
    and come back.
    """
    F, H, W = frames.shape[:3]
    out = np.zeros((F, H, W), bool)
    out[0] = region0
    if F == 1 or not region0.any():
        return out
    fl = _Flow(frames)
    h, w = fl.h, fl.w
    xs, ys = _grid(h, w)
    small0 = cv2.resize(region0.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    # the amodal region is frame 0's region moved by the accumulated motion C (frame 0 → frame t):
    # warped afresh from frame 0 each time, so it neither erodes nor is lost when it leaves the
    # frame, however far
    C = np.eye(3)
    a_frame = (small0 > 0.5).astype(np.float32)
    visible = small0
    rng = np.random.default_rng(0)
    last_M = None
    for t in range(1, F):
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

        # the region's motion t-1 → t, as a similarity transform in frame coordinates
        # fitted on the region's inner pixels only: its border is where background gets mixed in
        vb_in = (visible > 0.5).astype(np.uint8)
        core = cv2.erode(vb_in, _ellipse(2 * round(1 + 0.05 * np.sqrt(vb_in.sum())) + 1)).astype(bool)
        inner = core if core.sum() >= 20 else vb_in.astype(bool)
        M = None
        a_seen = float(a_frame.sum())
        if vb_in.sum() >= max(20, 0.3 * a_seen):  # mostly hidden: its own motion is not to be trusted
            # candidates for the region's motion: corners tracked by Lucas-Kanade (with their own
            # forward-backward check; exact where dense flow is smoothed across the object's
            # border or fails on fast motion), a fit to the dense flow, and the last motion
            # (constant velocity). The one under which frame t-1's region best predicts frame t wins.
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
                # none explains the region well: search for it by template matching as well
                c = _template_motion(fl.gray[t - 1], fl.gray[t], inner, last_M)
                if c is not None:
                    candidates.append(c)
                    scores.append(_prediction_score(fl.gray[t - 1], fl.gray[t], inner, c))
            if candidates:
                best = int(np.argmax(scores))
                if scores[best] >= MIN_PREDICTION:
                    M = candidates[best]
        if M is None:
            # hidden or gone: move with the scene (the camera), the dominant motion of the frame
            # outside the region — robust to an occluder that covers less than half of it
            outside = ~(a_frame > 0.5)
            M = _lk_motion(fl.gray[t - 1], fl.gray[t], outside)
            if M is None:
                M = _translation(np.median(fwd[f_ok], axis=0) if f_ok.sum() >= 20 else np.zeros(2, np.float32))
        last_M = M
        C = np.vstack([M, [0, 0, 1]]) @ C
        a_frame = (cv2.warpAffine(small0, C[:2].astype(np.float32), (w, h), flags=cv2.INTER_LINEAR, borderValue=0) > 0.5).astype(np.float32)

        if rigid:
            visible = a_frame.copy()
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
    return out
