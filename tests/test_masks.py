"""The edit region on synthetic clips: finding, following, every style, every bad input."""

from __future__ import annotations

import argparse
import logging

import cv2
import numpy as np
import pytest

from loraedit import masks, region
from loraedit.errors import InputError
from loraedit.video import write_png, write_video

H, W, F = 96, 128, 9


def iou(a, b):
    u = (a | b).sum()
    return 1.0 if u == 0 else (a & b).sum() / u


def textured(h, w, seed, sigma=1.5):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (0, 0), sigma)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)


def moving_square(frames=F, size=24, step=(3, 1), start=(20, 30)):
    """A textured square moving over a differently textured still background: frames, ground truth."""
    bg = textured(H, W, 0)
    sq = textured(size, size, 1)
    video, gt = [], []
    for i in range(frames):
        x, y = start[0] + step[0] * i, start[1] + step[1] * i
        f = bg.copy()
        f[y:y + size, x:x + size] = sq
        m = np.zeros((H, W), bool)
        m[y:y + size, x:x + size] = True
        video.append(f)
        gt.append(m)
    return np.stack(video), np.stack(gt)


def recolour(frame, mask):
    out = frame.copy()
    out[mask] = 255 - out[mask]
    return out


def opts(**kw):
    p = argparse.ArgumentParser()
    masks.add_mask_arguments(p)
    args = p.parse_args([])
    o = masks.mask_options_from_args(args)
    for k, v in kw.items():
        setattr(o, k, v)
    return o


@pytest.fixture(scope="module")
def square():
    video, gt = moving_square()
    return video, gt, recolour(video[0], gt[0])


def regions(video, edited, **kw):
    return masks.edit_regions(video, edited, opts(**kw), list(range(len(video))), len(video))


# ------------------------------------------------------------------ flags and defaults

def test_defaults_are_argparse_defaults():
    p = argparse.ArgumentParser()
    masks.add_mask_arguments(p)
    a = p.parse_args([])
    assert (a.mask, a.masks, a.box, a.mask_style, a.grow, a.dilate, a.block_size, a.segmenter, a.sam2_checkpoint) == \
        (None, None, [], "bbox", 0.10, 16, 7, "flow", None)
    a = p.parse_args(["--box", "1,2,30,40", "--box", "5,6,7,8", "--mask-style", "blocks", "--dilate", "4"])
    o = masks.mask_options_from_args(a)
    assert o.boxes == [(1, 2, 30, 40), (5, 6, 7, 8)] and o.style == "blocks" and o.dilate == 4


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "10,10,5,20", "0,9,9,9"])
def test_bad_box_text_is_an_argparse_error(text):
    p = argparse.ArgumentParser()
    masks.add_mask_arguments(p)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--box", text])
    assert exc.value.code == 2


def test_boxes_from_a_job_file_are_parsed():
    ns = argparse.Namespace(mask=None, masks=None, box=["1,2,30,40", [3, 4, 50, 60]], mask_style="bbox", grow=0.1, dilate=16,
                            block_size=7, segmenter="flow", sam2_checkpoint=None, sam2_config=None, diff_threshold=0.0, min_region=0.002)
    assert masks.mask_options_from_args(ns).boxes == [(1, 2, 30, 40), (3, 4, 50, 60)]
    ns.box = ["nonsense"]
    with pytest.raises(InputError, match="--box"):
        masks.mask_options_from_args(ns)


# ------------------------------------------------------------------ automatic region and tracking

def test_automatic_region_finds_and_follows_the_edit(square):
    video, gt, edited = square
    r = regions(video, edited, style="tight")
    assert r.shape == gt.shape and r.dtype == bool
    assert iou(r[0], gt[0]) > 0.85
    # the square moves 3 px/frame (24 px in all): following it must beat a region left in place
    assert min(iou(a, b) for a, b in zip(r, gt)) > 0.65
    assert iou(r[0], gt[-1]) < 0.4


def test_find_ignores_speckle_and_texture_noise(square):
    video, gt, _ = square
    rng = np.random.default_rng(3)
    edited = recolour(video[0], gt[0]).astype(np.int16)
    edited += rng.integers(-12, 13, edited.shape).astype(np.int16)  # re-rendered everywhere, a little
    speck = np.zeros((H, W), bool)
    speck[80:82, 100:102] = True  # a 4-pixel change elsewhere
    edited[speck] = 255 - edited[speck]
    found = region.find_edit_region(video[0], np.clip(edited, 0, 255).astype(np.uint8))
    assert iou(found, gt[0]) > 0.8
    assert not found[78:84, 98:104].any()


def test_identical_edited_frame_says_no_edit_found(square):
    video, _, _ = square
    with pytest.raises(InputError, match="no edit found.*--box"):
        regions(video, video[0].copy())


def test_region_hidden_by_an_occluder_comes_back():
    video, gt = moving_square(frames=13, step=(0, 0), start=(50, 36))
    bar = textured(H, 20, 7)
    occluded = gt.copy()
    for i in range(13):
        x = 20 + 8 * i  # a textured bar sweeps over the still square
        video[i, :, x:x + 20] = bar[:, :max(0, min(20, W - x))]
        occluded[i, :, x:x + 20] = False
    r = regions(video, recolour(video[0], gt[0]), style="tight")
    assert iou(r[-1], occluded[-1]) > 0.8  # the bar has passed: the whole square again
    for i in range(13):
        hidden = gt[i] & ~occluded[i]
        if hidden.sum() > 100:
            assert (r[i] & hidden).sum() < 0.3 * hidden.sum()  # the bar itself is not the region


def test_region_leaving_the_frame_shrinks_to_nothing_and_comes_back():
    big = textured(H, 2 * W, 0, sigma=2.0)
    sq = textured(24, 24, 1)
    big[36:60, 40:64] = sq
    gt_big = np.zeros(big.shape[:2], bool)
    gt_big[36:60, 40:64] = True
    pans = list(range(0, 97, 12)) + list(range(84, -1, -12))  # the camera pans right and back
    video = np.stack([big[:, p:p + W] for p in pans])
    gt = np.stack([gt_big[:, p:p + W] for p in pans])
    r = regions(video, recolour(video[0], gt[0]), style="tight")
    for i in range(len(pans)):
        if not gt[i].any():
            assert r[i].sum() < 20, i  # gone: the region is empty
        elif gt[i].sum() > 450:
            assert iou(r[i], gt[i]) > 0.6, i
        near = cv2.dilate(gt[i].astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        assert (r[i] & ~near).sum() < 0.2 * max(gt[i].sum(), 100), i  # never somewhere else
    assert not gt[8].any() and iou(r[-1], gt[-1]) > 0.8


def test_single_frame_needs_no_tracking(square):
    video, gt, edited = square
    r = regions(video[:1], edited, style="tight")
    assert r.shape == (1, H, W) and iou(r[0], gt[0]) > 0.85


# ------------------------------------------------------------------ styles

def _tight(square):
    video, gt, edited = square
    return regions(video, edited, style="tight")


def test_bbox_style_is_the_grown_box_of_each_region(square):
    video, _, edited = square
    tight = _tight(square)
    boxed = regions(video, edited, style="bbox", grow=0.5)
    for t, b in zip(tight, boxed):
        x, y, w, h = cv2.boundingRect(t.astype(np.uint8))
        bx, by, bw, bh = cv2.boundingRect(b.astype(np.uint8))
        assert b.sum() == bw * bh  # one solid rectangle
        assert abs(bw - 1.5 * w) <= 2 and abs(bh - 1.5 * h) <= 2
        assert (t <= b).all()


def test_bbox_keeps_separate_objects_separate():
    r = np.zeros((H, W), bool)
    r[10:20, 10:20] = True
    r[60:80, 90:110] = True
    out = masks.boxes_around(r, 0.1)
    assert out[10:20, 10:20].all() and out[60:80, 90:110].all()
    assert not out[30:50, 30:80].any()  # not one box around both


def test_dilate_style_grows_by_n_pixels(square):
    video, _, edited = square
    tight = _tight(square)
    grown = regions(video, edited, style="dilate", dilate=5)
    dist = cv2.distanceTransform((~tight[0]).astype(np.uint8), cv2.DIST_L2, 5)
    assert grown[0][dist <= 4.5].all()
    assert not grown[0][dist > 6.5].any()


def test_blocks_style_is_coarse_blocks_covering_the_region(square):
    video, _, edited = square
    tight = _tight(square)
    b = regions(video, edited, style="blocks", block=7)
    assert (tight <= b).all()
    for f in b:
        pad = np.zeros((-(-H // 7) * 7, -(-W // 7) * 7), bool)
        pad[:H, :W] = f
        cells = pad.reshape(pad.shape[0] // 7, 7, pad.shape[1] // 7, 7)
        assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all()  # every block all or nothing
    assert b.sum() < 3 * tight.sum()


def test_static_style_is_the_same_union_every_frame(square):
    video, _, edited = square
    st = regions(video, edited, style="static")
    boxed = regions(video, edited, style="bbox")
    assert (st == st[0]).all()
    assert (boxed <= st[0]).all()
    assert st[0].sum() < 0.6 * H * W


def test_tight_style_is_as_found(square):
    video, _, edited = square
    assert (regions(video, edited, style="tight") == region.track_region(video, region.find_edit_region(video[0], edited))).all()


# ------------------------------------------------------------------ boxes

def test_box_is_followed_with_the_object(square):
    video, gt, _ = square
    x0, y0, x1, y1 = 20, 30, 44, 54  # the square in frame 0
    r = masks.edit_regions(video, video[0], opts(boxes=[(x0, y0, x1, y1)], style="tight"), list(range(F)), F)
    assert iou(r[0], gt[0]) == 1.0
    assert iou(r[-1], gt[-1]) > 0.7 and iou(r[-1], gt[0]) < 0.4


def test_several_boxes_and_boxes_outside_the_frame(square):
    video, _, _ = square
    r = masks.edit_regions(video, video[0], opts(boxes=[(0, 0, 10, 10), (100, 60, 128, 96)], style="tight"), list(range(F)), F)
    assert r[0, :10, :10].all() and r[0, 60:, 100:].all() and r[0].sum() == 100 + 36 * 28
    with pytest.raises(InputError, match="--box 200,10,300,40: lies outside"):
        masks.edit_regions(video, video[0], opts(boxes=[(200, 10, 300, 40)]), list(range(F)), F)
    # a box past the edge is in some other frame's pixels (the source's): refused, never clipped to the whole frame
    for box, hint in [((0, 0, 500, 500), "0,0,128,96"), ((100, 60, 200, 200), "100,60,128,96"), ((-4, 10, 20, 30), "0,10,20,30")]:
        with pytest.raises(InputError, match=rf"reaches past the 128x96 frame.*e\.g\. {hint}$"):
            masks.edit_regions(video, video[0], opts(boxes=[box]), list(range(F)), F)


def test_two_ways_of_giving_the_region_is_an_error(square, tmp_path):
    video, gt, edited = square
    write_png(tmp_path / "m.png", gt[0].astype(np.uint8) * 255)
    with pytest.raises(InputError, match="--mask and --box"):
        masks.edit_regions(video, edited, opts(mask=str(tmp_path / "m.png"), boxes=[(1, 1, 5, 5)]), list(range(F)), F)


@pytest.mark.parametrize("field,value,message", [("grow", -0.1, "--grow"), ("dilate", -1, "--dilate"), ("block", 0, "--block-size"),
                                                 ("style", "fuzzy", "--mask-style"), ("min_area", 1.5, "--min-region")])
def test_bad_numbers_are_input_errors(square, field, value, message):
    video, _, edited = square
    with pytest.raises(InputError, match=message):
        masks.edit_regions(video, edited, opts(**{field: value}), list(range(F)), F)


# ------------------------------------------------------------------ given masks

def test_single_png_mask_for_every_frame(square, tmp_path):
    video, gt, edited = square
    write_png(tmp_path / "m.png", gt[0].astype(np.uint8) * 255)
    r = masks.edit_regions(video, edited, opts(mask=str(tmp_path / "m.png"), style="tight"), list(range(F)), F)
    assert (r == gt[0]).all()


def test_mask_of_the_videos_aspect_is_fitted_and_another_aspect_refused(square, tmp_path):
    video, gt, edited = square
    # the video was 256x192 (fitted to the 128x96 working size): a mask at its size, and one at half of that
    for size in ((256, 192), (64, 48)):
        big = cv2.resize(gt[0].astype(np.uint8) * 255, size, interpolation=cv2.INTER_NEAREST)
        write_png(tmp_path / "m.png", big)
        r = masks.edit_regions(video, edited, opts(mask=str(tmp_path / "m.png"), style="tight"), list(range(F)), F,
                               source_size=(256, 192))
        assert iou(r[0], gt[0]) > 0.9
    # 100x64 is not the video's 4:3: stretching it would move the region, so it is refused (as a first frame is)
    write_png(tmp_path / "wide.png", cv2.resize(gt[0].astype(np.uint8) * 255, (100, 64), interpolation=cv2.INTER_NEAREST))
    with pytest.raises(InputError, match=r"wide.png: the mask is 100x64, a different aspect ratio from the video's 256x192"):
        masks.edit_regions(video, edited, opts(mask=str(tmp_path / "wide.png")), list(range(F)), F, source_size=(256, 192))


def test_mask_video_with_other_frame_count_is_resampled_by_time(square, tmp_path, caplog):
    video, gt, edited = square
    # 5 mask frames for a 9-frame source: source frame 2i ↔ mask frame i
    write_video(tmp_path / "m.mkv", gt[::2].astype(np.uint8) * 255, 12, lossless=True)
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        r = masks.edit_regions(video, edited, opts(mask=str(tmp_path / "m.mkv"), style="tight"), [0, 4, 8], F)
    assert "matching mask frames by time" in caplog.text
    assert (r == gt[[0, 4, 8]]).all()


def test_mask_of_other_resolution_is_resized_nearest(square, tmp_path, caplog):
    video, gt, edited = square
    big = np.repeat(np.repeat(gt[0], 2, 0), 2, 1).astype(np.uint8) * 255
    write_png(tmp_path / "big.png", big)
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        r = masks.edit_regions(video, edited, opts(mask=str(tmp_path / "big.png"), style="tight"), list(range(F)), F)
    assert "resizing them (nearest)" in caplog.text
    assert (r[0] == gt[0]).all()  # nearest: no grey edge, no shift


def test_png_folder_with_other_count_is_matched_by_time(square, tmp_path):
    video, gt, edited = square
    for i, m in enumerate(gt[::4]):  # frames 0, 4, 8
        write_png(tmp_path / "f" / f"{i:03d}.png", m.astype(np.uint8) * 255)
    r = masks.edit_regions(video, edited, opts(mask=str(tmp_path / "f"), style="tight"), [0, 8], F)
    assert (r == gt[[0, 8]]).all()


def test_empty_or_missing_mask_is_an_error(square, tmp_path):
    video, _, edited = square
    write_png(tmp_path / "black.png", np.zeros((H, W), np.uint8))
    with pytest.raises(InputError, match="the mask is empty"):
        masks.edit_regions(video, edited, opts(mask=str(tmp_path / "black.png")), list(range(F)), F)
    with pytest.raises(InputError, match="no such mask"):
        masks.edit_regions(video, edited, opts(mask=str(tmp_path / "nope.mkv")), list(range(F)), F)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no PNG mask frames"):
        masks.edit_regions(video, edited, opts(mask=str(tmp_path / "empty")), list(range(F)), F)


def test_corrupt_mask_video_is_an_error(square, tmp_path):
    video, _, edited = square
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(InputError, match="bad.mp4"):
        masks.edit_regions(video, edited, opts(mask=str(tmp_path / "bad.mp4")), list(range(F)), F)


def test_region_over_almost_the_whole_frame_warns(square, tmp_path, caplog):
    video, _, edited = square
    write_png(tmp_path / "white.png", np.full((H, W), 255, np.uint8))
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        r = masks.edit_regions(video, edited, opts(mask=str(tmp_path / "white.png")), list(range(F)), F)
    assert r.all() and "covers 100% of the frames" in caplog.text


def test_small_region_does_not_warn(square, caplog):
    video, _, edited = square
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        regions(video, edited)
    assert "covers" not in caplog.text


# ------------------------------------------------------------------ SAM2

def test_sam2_without_the_package_is_a_clear_error(square, monkeypatch):
    import importlib.util

    video, _, edited = square
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sam2" else real(name, *a))
    with pytest.raises(InputError, match="sam2 package is not installed.*loraedit\\[sam2\\]"):
        regions(video, edited, segmenter="sam2", sam2_checkpoint="x.pt")


def test_sam2_without_a_checkpoint_is_a_clear_error(square, monkeypatch, tmp_path):
    import importlib.util

    video, _, edited = square
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "sam2" else real(name, *a))
    with pytest.raises(InputError, match="needs --sam2-checkpoint"):
        regions(video, edited, segmenter="sam2")
    with pytest.raises(InputError, match="no such SAM2 checkpoint"):
        regions(video, edited, segmenter="sam2", sam2_checkpoint=str(tmp_path / "missing.pt"))


def test_an_edit_smaller_than_min_region_is_named_as_such_not_as_no_edit():
    """A small edit (a 5x5 spot on 128x128, 0.15%) was reported as 'matches the source's first frame'."""
    from loraedit.errors import InputError
    from loraedit.region import find_edit_region

    rng = np.random.default_rng(0)
    src = (rng.random((128, 128, 3)) * 40 + 100).astype(np.uint8)
    edited = src.copy()
    edited[60:65, 60:65] = (250, 20, 20)
    with pytest.raises(InputError, match=r"the edit is smaller than --min-region 0.002 \(its largest part covers 0\.1\d%"):
        find_edit_region(src, edited, min_area=0.002)
    assert find_edit_region(src, edited, min_area=0.0005).any()  # the advice works
    with pytest.raises(InputError, match="no edit found"):
        find_edit_region(src, src.copy())
