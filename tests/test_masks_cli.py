"""`loraedit masks`: its outputs, and `--masks DIR` reusing exactly those masks."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from loraedit import maskcli, masks
from loraedit.errors import InputError
from loraedit.files import read_json
from loraedit.video import fit_to_size, frame_indices, probe_video, read_gray, read_image, read_video_frames, write_png, write_video

H, W, N = 64, 96, 24


def parser():
    p = argparse.ArgumentParser(prog="loraedit")
    sub = p.add_subparsers(dest="command", required=True)
    maskcli.register(sub)
    return p


def run(argv):
    args = parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A textured square moving right over a textured background; the edit recolours it."""
    folder = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    # textures with detail a few pixels across, as in camera footage (1-pixel white noise aliases)
    bg = cv2.GaussianBlur((rng.random((H, W, 3)) * 120 + 60).astype(np.uint8), (0, 0), 1.2)
    sq = cv2.normalize(cv2.GaussianBlur((rng.random((16, 16, 3)) * 255).astype(np.uint8), (0, 0), 1.0), None, 0, 255, cv2.NORM_MINMAX)
    video = []
    for i in range(N):
        f = bg.copy()
        f[20:36, 10 + 2 * i:26 + 2 * i] = sq
        video.append(f)
    video = np.stack(video)
    edited = video[0].copy()
    edited[20:36, 10:26] = 255 - edited[20:36, 10:26]
    write_video(folder / "clip.mkv", video, 12, lossless=True)
    write_png(folder / "edited.png", edited)
    return {"video": folder / "clip.mkv", "first_frame": folder / "edited.png", "frames": video}


def masks_argv(clip, out, *extra):
    return ["masks", "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]), "--out", str(out),
            "--frames", "9", "--size", "96x64", *extra]


def test_sub_command_defaults():
    a = parser().parse_args(["masks", "--out", "x"])
    # frames: unset, so run_masks takes the model's own count as `edit` does (49; 17 with the toy model)
    assert (a.frames, a.size, a.start, a.stride, a.mask_style, a.func) == (None, None, "0", None, "bbox", maskcli.run_masks)


def test_masks_writes_every_output(clip, tmp_path):
    out = tmp_path / "m"
    assert run(masks_argv(clip, out, "--mask-style", "tight")) == 0
    info = read_json(out / "masks.json")
    assert (info["frames"], info["width"], info["height"], info["source"]) == (9, 96, 64, "automatic")
    assert info["indices"] == list(range(9))  # a 12 fps clip, slower than the model's 16: its own frames
    # what moved the region (the square's own pixels, once seen to move), and one shot, no cut
    assert info["motion"][0] == "start" and info["motion"][1:].count("object") >= 6 and info["added"] is False
    assert info["cuts"] == [] and [s["selected"] for s in info["shots"]] == [list(range(9))]
    pngs = sorted((out / "masks").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:04d}.png" for i in range(9)]
    m = np.stack([read_gray(p) for p in pngs])
    assert set(np.unique(m)) <= {0, 255}
    # the square (16×16 at x = 10 + 2·index) is found and followed
    for k, i in enumerate(info["indices"]):
        gt = np.zeros((H, W), bool)
        gt[20:36, 10 + 2 * i:26 + 2 * i] = True
        r = m[k] > 127
        assert (r & gt).sum() / (r | gt).sum() > 0.6, k
    # the lossless mask video holds exactly the PNG masks
    assert probe_video(out / "masks.mkv").n_frames == 9
    with av.open(str(out / "masks.mkv")) as c:
        assert c.streams.video[0].codec_context.name == "ffv1"
    vid = read_video_frames(out / "masks.mkv", list(range(9)))[..., 0]
    assert (vid == m).all()
    # overlay (H.264) and contact sheet
    with av.open(str(out / "overlay.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    assert probe_video(out / "overlay.mp4").n_frames == 9
    sheet = read_image(out / "contact_sheet.png")
    assert sheet.shape[0] > 100 and sheet.shape[1] > 400
    # nothing half-written left behind
    assert not [p for p in out.rglob(".*") if p.is_file()]


def test_edit_masks_dir_reuses_exactly_those_masks(clip, tmp_path):
    out = tmp_path / "m"
    run(masks_argv(clip, out))
    info = read_json(out / "masks.json")
    saved = np.stack([read_gray(out / "masks" / f"{i:04d}.png") > 127 for i in range(9)])
    # as prepare calls it: frames at the working size, the edited frame, the indices
    frames = np.stack([fit_to_size(f, 96, 64) for f in read_video_frames(clip["video"], info["indices"])])
    p = argparse.ArgumentParser()
    masks.add_mask_arguments(p)
    o = masks.mask_options_from_args(p.parse_args(["--masks", str(out), "--mask-style", "dilate"]))
    r = masks.edit_regions(frames, read_image(clip["first_frame"]), o, info["indices"], N)
    assert (r == saved).all()  # exactly, no style applied a second time


def test_masks_dir_for_other_frames_is_refused(clip, tmp_path):
    out = tmp_path / "m"
    run(masks_argv(clip, out))
    frames = np.stack([fit_to_size(f, 96, 64) for f in read_video_frames(clip["video"], list(range(5)))])
    with pytest.raises(InputError, match="masks are for 9 frames at 96x64, this run has 5"):
        masks.edit_regions(frames, frames[0], masks.MaskOptions(masks=str(out)), list(range(5)), N)
    frames9 = np.stack([fit_to_size(f, 96, 64) for f in read_video_frames(clip["video"], frame_indices(N, 9))])
    with pytest.raises(InputError, match="other source frames"):
        masks.edit_regions(frames9, frames9[0], masks.MaskOptions(masks=str(out)), frame_indices(N, 9), N)
    (out / "masks.json").unlink()
    with pytest.raises(InputError, match="not a complete `loraedit masks` output"):
        masks.edit_regions(frames9, frames9[0], masks.MaskOptions(masks=str(out)), frame_indices(N, 9), N)
    with pytest.raises(InputError, match="no such folder"):
        masks.edit_regions(frames9, frames9[0], masks.MaskOptions(masks=str(tmp_path / "nope")), frame_indices(N, 9), N)


def test_masks_dir_made_from_another_video_is_refused_by_edit(clip, tmp_path, capsys):
    from loraedit.cli import main

    out = tmp_path / "m"
    run(masks_argv(clip, out))
    assert read_json(out / "masks.json")["video_sha256"]
    # another clip of the same length and size: frame count, size and source frames cannot tell them apart
    other = tmp_path / "other.mkv"
    write_video(other, np.ascontiguousarray(clip["frames"][:, ::-1]), 12, lossless=True)
    toy = Path(__file__).resolve().parents[1] / "loraedit" / "toymodel"
    argv = ["prepare", "--video", str(other), "--first-frame", str(clip["first_frame"]), "--frames", "9", "--size", "96x64",
            "--masks", str(out), "--out", str(tmp_path / "run"), "--model", str(toy)]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "the masks were made from another video" in err[0] and f"--video {other}" in err[0], err
    assert not (tmp_path / "run").exists()
    # the video they were made from is accepted
    assert main([*argv[:2], str(clip["video"]), *argv[3:]]) == 0


def test_rerun_replaces_the_previous_output(clip, tmp_path):
    out = tmp_path / "m"
    run(masks_argv(clip, out))
    first = read_json(out / "masks.json")
    run(masks_argv(clip, out, "--frames", "5", "--mask-style", "static"))
    second = read_json(out / "masks.json")
    assert first["frames"] == 9 and second["frames"] == 5 and second["mask_style"] == "static"
    assert len(list((out / "masks").glob("*.png"))) == 5


def test_masks_reports_a_cut_and_holds_the_region_there(clip, tmp_path, caplog):
    # two shots: the clip's first 5 frames, then an unrelated, darker, differently textured view
    rng = np.random.default_rng(5)
    other = cv2.GaussianBlur((rng.random((H, W, 3)) * 60).astype(np.uint8), (0, 0), 1.2)
    video = np.concatenate([clip["frames"][:5], np.repeat(other[None], 4, 0)])
    write_video(tmp_path / "cut.mkv", video, 12, lossless=True)
    out = tmp_path / "m"
    argv = ["masks", "--video", str(tmp_path / "cut.mkv"), "--first-frame", str(clip["first_frame"]), "--out", str(out),
            "--frames", "9", "--size", "96x64", "--mask-style", "tight"]
    with caplog.at_level("WARNING", logger="loraedit"):
        assert run(argv) == 0
    info = read_json(out / "masks.json")
    assert [c["selected"] for c in info["cuts"]] == [5] and len(info["shots"]) == 2
    assert "scene cuts at" in caplog.text and "frame 5" in caplog.text
    assert info["motion"][5] == "cut"
    m = np.stack([read_gray(p) for p in sorted((out / "masks").glob("*.png"))])
    assert (m[5] == m[4]).all()  # not dragged by the flow between unrelated views


def test_masks_with_a_box_and_no_first_frame(clip, tmp_path):
    out = tmp_path / "m"
    assert run(["masks", "--video", str(clip["video"]), "--out", str(out), "--frames", "5", "--size", "96x64",
                "--box", "10,20,26,36", "--mask-style", "tight"]) == 0
    m = read_gray(out / "masks" / "0000.png") > 127
    assert m[20:36, 10:26].all() and m.sum() == 256
    assert read_json(out / "masks.json")["source"] == "box"


@pytest.mark.parametrize("extra,message", [
    ((), "--first-frame is required"),
    (("--first-frame", "missing.png"), "missing.png: no such image"),
])
def test_masks_bad_input(clip, tmp_path, extra, message):
    argv = ["masks", "--video", str(clip["video"]), "--out", str(tmp_path / "m"), "--frames", "5", *extra]
    with pytest.raises(InputError, match=message):
        run(argv)


def test_masks_identical_first_frame(clip, tmp_path):
    write_png(tmp_path / "same.png", clip["frames"][0])
    with pytest.raises(InputError, match="no edit found"):
        run(["masks", "--video", str(clip["video"]), "--first-frame", str(tmp_path / "same.png"), "--out", str(tmp_path / "m"), "--frames", "5"])
    assert not (tmp_path / "m" / "masks.json").exists()


def test_masks_edited_frame_of_other_size(clip, tmp_path, caplog):
    big = fit_to_size(read_image(clip["first_frame"]), 192, 128)
    write_png(tmp_path / "big.png", big)
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        assert run(["masks", "--video", str(clip["video"]), "--first-frame", str(tmp_path / "big.png"), "--out", str(tmp_path / "m"),
                    "--frames", "5", "--size", "96x64"]) == 0
    assert "resizing it to match" in caplog.text
    write_png(tmp_path / "square.png", big[:, :128])
    with pytest.raises(InputError, match="different aspect ratio"):
        run(["masks", "--video", str(clip["video"]), "--first-frame", str(tmp_path / "square.png"), "--out", str(tmp_path / "m2"), "--frames", "5"])


def test_masks_default_size_follows_the_aspect(clip, tmp_path):
    out = tmp_path / "m"
    run(["masks", "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]), "--out", str(out), "--frames", "5"])
    info = read_json(out / "masks.json")
    assert (info["width"], info["height"]) == (768, 512)  # 3:2 kept, at about 832×480 pixels
    assert read_gray(out / "masks" / "0000.png").shape == (512, 768)


def test_masks_with_the_toy_model_takes_its_own_17_frames_as_edit_does(clip, tmp_path):
    """`masks --model <toy>` took the generic 49 frames, so `edit --masks` refused clips edit accepts."""
    from loraedit.demo import TOY_MODEL

    assert run(["masks", "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]), "--out",
                str(tmp_path / "m"), "--model", str(TOY_MODEL), "--size", "96x64"]) == 0
    assert read_json(tmp_path / "m" / "masks.json")["frames"] == 17
    assert run(["masks", "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]), "--out",
                str(tmp_path / "m9"), "--model", str(TOY_MODEL), "--size", "96x64", "--frames", "9"]) == 0
    assert read_json(tmp_path / "m9" / "masks.json")["frames"] == 9  # a given count is kept


def test_crop_advice_names_a_size_that_keeps_more_of_the_frame(caplog):
    """A 3:4 clip at 112x144 (the nearest multiples of 16) loses 3%; the advice named 112x144 again."""
    from loraedit.prepare import warn_about_crop
    from loraedit.video import VideoInfo

    def edge_edit(h, w):  # an edit along every edge, so any crop cuts some of it
        source, edited = np.zeros((h, w, 3), np.uint8), np.zeros((h, w, 3), np.uint8)
        edited[:4], edited[-4:], edited[:, :4], edited[:, -4:] = 255, 255, 255, 255
        return source, edited

    with caplog.at_level(logging.WARNING):
        warn_about_crop(VideoInfo("v.mp4", 96, 128, 16.0, 17, 0, False), (112, 144), False, *edge_edit(128, 96), "v.mp4")
        warn_about_crop(VideoInfo("w.mp4", 127, 93, 16.0, 17, 0, False), (128, 96), False, *edge_edit(93, 127), "w.mp4")
    lines = [r.getMessage() for r in caplog.records]
    assert "cuts away 3% of the 96x128 frame" in lines[0] and lines[0].endswith("--size 96x128 keeps the whole frame"), lines
    assert "no size in multiples of 16 has this clip's aspect" in lines[1], lines
