"""The procedural world: deterministic, and its true edit touches only the object's region."""

from __future__ import annotations

import numpy as np
import pytest

from loraedit.world import clip_metrics, make_clip, psnr, write_clip


@pytest.fixture(scope="module")
def clips():
    return [make_clip(s) for s in (0, 1, 7)]


def test_same_seed_same_pixels_other_seed_other_pixels(clips):
    again = make_clip(0)
    for name in ("source", "truth", "region", "alpha"):
        assert np.array_equal(getattr(again, name), getattr(clips[0], name)), name
    assert again.caption == clips[0].caption and again.reference_frame == clips[0].reference_frame
    assert not np.array_equal(clips[0].source, clips[1].source)


def test_shapes_and_types(clips):
    for c in clips:
        assert c.source.shape == (17, 128, 128, 3) and c.source.dtype == np.uint8
        assert c.truth.shape == c.source.shape and c.truth.dtype == np.uint8
        assert c.region.shape == (17, 128, 128) and c.region.dtype == bool
        assert 0 < c.reference_frame < c.frames
    other = make_clip(2, frames=21, width=160, height=128)
    assert other.source.shape == (21, 128, 160, 3)
    with pytest.raises(ValueError):
        make_clip(0, frames=16)


def test_truth_differs_from_source_only_inside_the_region(clips):
    for c in clips:
        differs = (c.source != c.truth).any(axis=-1)
        assert not (differs & ~c.region).any()
        # …and it really is an edit: most of the object's core pixels change, on every frame
        core = c.alpha >= 0.5
        for i in range(c.frames):
            if core[i].sum() > 20:
                assert differs[i][core[i]].mean() > 0.9


def test_the_object_moves_and_turns_to_show_its_back(clips):
    for c in clips:
        centres = [np.argwhere(r).mean(axis=0) for r in c.region]
        assert np.linalg.norm(centres[-1] - centres[0]) > 3 or np.linalg.norm(centres[8] - centres[0]) > 3
        assert c.front_visible[0] and not c.front_visible.all()
        assert not c.front_visible[c.reference_frame]


def test_metrics_are_perfect_for_the_truth_and_bad_for_the_source(clips):
    c = clips[0]
    m = clip_metrics(c.truth, c)
    assert m["psnr_in"] == 99.0 and m["psnr_out"] == 99.0 and m["first_psnr"] == 99.0
    assert m["colour_err_in"] == 0.0 and m["temporal_err"] == 0.0
    s = clip_metrics(c.source, c)
    assert s["psnr_out"] == 99.0 and s["psnr_in"] < 20 and s["colour_err_in"] > 30
    assert psnr(c.source[0], c.source[0]) == 99.0


def test_write_clip_gives_the_edit_command_its_inputs(clips, tmp_path):
    from loraedit.video import read_image, read_video_frames

    c = clips[1]
    p = write_clip(c, tmp_path)
    frames = read_video_frames(p["source_lossless"], list(range(c.frames)))
    assert np.array_equal(frames, c.source)  # lossless: metrics compare against exactly what was edited
    assert np.array_equal(read_image(p["first_frame"]), c.truth[0])
    assert np.array_equal(read_image(p["reference"]), c.truth[c.reference_frame])
    masks = sorted(p["mask"].glob("*.png"))
    assert len(masks) == c.frames
    assert np.array_equal(read_image(masks[3])[..., 0] > 127, c.region[3])


def test_first_frame_bound_keeps_the_motion_and_cannot_know_the_back_face(clips):
    """The no-reference bound is exact where the front face shows and wrong where the back face shows:
    so the colour error splits into a front part (zero for the bound) and a back part (large)."""
    from loraedit.world import first_frame_bound

    c = clips[0]
    bound = first_frame_bound(c.seed, frames=c.frames)
    assert bound.shape == c.truth.shape
    m = clip_metrics(bound, c)
    assert m["psnr_out"] == 99.0 and m["first_psnr"] == 99.0
    assert m["colour_err_front"] == 0.0 and m["colour_err_back"] > 30
    assert m["psnr_front"] == 99.0 and m["psnr_back"] < 20
    # the same split for the truth itself is perfect on both faces, and the source is wrong on both
    t = clip_metrics(c.truth, c)
    assert t["colour_err_front"] == 0.0 and t["colour_err_back"] == 0.0
    s = clip_metrics(c.source, c)
    assert s["colour_err_front"] > 30 and s["colour_err_back"] > 30
    # the source-frame bound against the source video
    src = first_frame_bound(c.seed, frames=c.frames, edited=False)
    assert np.array_equal(src[0], c.source[0])
