"""Real footage: frames at the model's frame rate, the working size, local or global edits."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from loraedit import prepare
from loraedit.cli import main
from loraedit.errors import InputError
from loraedit.samples import shared_data_dir
from loraedit.settings import PrepareSettings
from loraedit.video import (VideoInfo, choose_frames, crop_fraction, default_size, parse_start, probe_video, read_image,
                            read_video_frames, write_png, write_video)

from conftest import require_data

SHARED = shared_data_dir()
ANYV2V = SHARED / "anyv2v-demo" if SHARED else Path("missing")
TOY_MODEL = Path(__file__).resolve().parents[1] / "loraedit" / "toymodel"


def info(fps: float, seconds: float, times=()) -> VideoInfo:
    return VideoInfo("clip.mp4", 96, 64, fps, int(round(fps * seconds)), 0, False, tuple(times))


# ------------------------------------------------------------------ which frames


@pytest.mark.parametrize("fps", [30, 60, 25, 29.97])
def test_frames_are_taken_at_16_fps_whatever_the_source_rate(fps):
    c = choose_frames(info(fps, 10), 49)
    assert c.fps == 16 and c.rule == "model rate" and len(c.indices) == 49
    # frame k is the source frame shown at k/16 s (within half a source frame)
    t = np.asarray(c.indices) / fps
    assert np.abs(t - np.arange(49) / 16).max() <= 0.5 / fps + 1e-9
    assert abs(c.indices[-1] / fps - 3.0) <= 0.5 / fps  # 49 frames at 16 fps: 3 s of the clip, not all 10


def test_frames_chosen_for_a_30_and_a_60_fps_clip():
    # the source frame nearest k/16 s (a tie goes to the earlier frame)
    assert choose_frames(info(30, 10), 9).indices == [0, 2, 4, 6, 7, 9, 11, 13, 15]
    assert choose_frames(info(60, 10), 9).indices == [0, 4, 7, 11, 15, 19, 22, 26, 30]


def test_a_clip_slower_than_the_model_keeps_its_own_frames():
    c = choose_frames(info(8, 4), 17)
    assert c.indices == list(range(17)) and c.fps == 8 and c.rule == "source rate"


def test_start_in_seconds_or_frames():
    assert parse_start("2.5s").seconds == 2.5 and parse_start("12").frame == 12 and parse_start(7).frame == 7
    assert choose_frames(info(30, 10), 5, "2.5s").indices[0] == 75
    assert choose_frames(info(30, 10), 5, "75").indices == choose_frames(info(30, 10), 5, "2.5s").indices
    assert choose_frames(info(30, 10), 5, "2.5s").start_time == 2.5
    for bad in ("-1", "x", "2.5m", "-2s"):
        with pytest.raises(InputError, match="--start"):
            parse_start(bad)
    with pytest.raises(InputError, match="past the clip's end"):
        choose_frames(info(30, 10), 5, "11s")


def test_fps_stride_and_spread():
    assert choose_frames(info(30, 10), 5, fps=10).indices == [0, 3, 6, 9, 12]
    c = choose_frames(info(30, 10), 5, stride=4)
    assert c.indices == [0, 4, 8, 12, 16] and c.fps == 7.5
    c = choose_frames(info(30, 10), 5, spread=True)
    assert c.indices == [0, 75, 150, 224, 299] and abs(c.fps - 30 / 74.75) < 1e-9  # the old behaviour
    with pytest.raises(InputError, match="give one of them"):
        choose_frames(info(30, 10), 5, fps=10, stride=2)


def test_too_short_names_how_many_fit_and_the_largest_valid_count():
    with pytest.raises(InputError) as e:
        choose_frames(info(30, 2), 49)
    msg = str(e.value)
    # 2 s at 30 fps from 0 holds the instants 0, 1/16, ..., 31/16 s: 32 frames, the largest 4k+1 is 29
    assert "holds 32 frames at 16 fps" in msg and "--frames 29" in msg and "\n" not in msg
    assert choose_frames(info(30, 2), 29).indices[-1] == 52  # 28/16 s = frame 52.5


def test_frames_auto_takes_the_most_that_fit_up_to_81():
    assert len(choose_frames(info(30, 2), None).indices) == 29
    assert len(choose_frames(info(30, 60), None).indices) == 81
    assert len(choose_frames(info(30, 3), None, "1s").indices) == 29  # 2 s left: 32 instants
    with pytest.raises(InputError, match="at least 5"):
        choose_frames(info(30, 10), None, "9.9s")


def test_variable_rate_clip_is_resampled_by_its_timestamps():
    # 30 fps with every third interval doubled (a phone's dropped frames)
    times, t = [], 0.0
    for i in range(300):
        times.append(t)
        t += 2 / 30 if i % 3 == 2 else 1 / 30
    c = choose_frames(VideoInfo("v.mp4", 96, 64, 22.5, 300, 0, False, tuple(times)), 17)
    picked = np.asarray(times)[c.indices]
    assert np.abs(picked - np.arange(17) / 16).max() <= 1 / 30 + 1e-9


# ------------------------------------------------------------------ size


def test_default_size_keeps_the_aspect_at_the_pixel_budget():
    assert default_size(512, 512) == (624, 624)  # a square clip is not cropped to 832×480
    assert default_size(1920, 1080) == (832, 480) and default_size(1080, 1920) == (480, 832)  # Wan's own bucket
    assert default_size(640, 480) == (720, 544)
    for w, h in [(512, 512), (640, 480), (96, 64), (2560, 1080), (176, 144)]:
        W, H = default_size(w, h)
        assert W % 16 == 0 and H % 16 == 0
        assert abs(W * H / (832 * 480) - 1) < 0.06
        assert crop_fraction(w, h, W, H) < 0.02
    assert abs(crop_fraction(512, 512, 832, 480) - 0.421875) < 1e-6  # what the old default cut of a square clip


def test_an_explicit_size_that_cuts_the_edit_is_said_in_one_line(tmp_path, caplog):
    require_data(ANYV2V)
    args = _args(ANYV2V / "Man_Walking.mp4", ANYV2V / "Man_Walking__add_a_cowboy_hat.png", frames=5, size="832x480")
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        plan = prepare.run(args, tmp_path)
    warned = [r.getMessage() for r in caplog.records if "cuts away" in r.getMessage()]
    assert len(warned) == 1 and "42% of the 512x512 frame" in warned[0] and "of the edit" in warned[0] and "--size 624x624" in warned[0]
    assert plan["crop"]["frame_cut"] == pytest.approx(0.4219, abs=1e-3) and plan["crop"]["edit_cut"] > 0.3
    # the default size keeps the square frame, the whole hat, and says nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        plan = prepare.run(_args(ANYV2V / "Man_Walking.mp4", ANYV2V / "Man_Walking__add_a_cowboy_hat.png", frames=5), tmp_path / "b")
    assert (plan["width"], plan["height"]) == (624, 624) and plan["crop"] == {"frame_cut": 0.0, "edit_cut": 0.0}
    assert not [r for r in caplog.records if "cuts away" in r.getMessage()]


# ------------------------------------------------------------------ through the stage


def textured(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3)).astype(np.uint8), (0, 0), 2)
    return cv2.normalize(img, None, 30, 220, cv2.NORM_MINMAX)


def moving_square_clip(folder: Path, fps: int, seconds: float, size=(96, 64)) -> dict:
    """A red square moving 1 px per source frame over texture, frame number drawn in a corner."""
    w, h = size
    bg = textured(h, w)
    n = int(fps * seconds)
    video = np.repeat(bg[None], n, axis=0)
    for i in range(n):
        x = 8 + i * 40 // n
        video[i, 20:36, x:x + 16] = (210, 40, 40)
    edited = video[0].copy()
    edited[20:36, 8:24] = (40, 40, 220)
    p = {"video": folder / f"clip{fps}.mkv", "first_frame": folder / f"edited{fps}.png"}
    write_video(p["video"], video, fps, lossless=True)
    write_png(p["first_frame"], edited)
    return p


def _args(video, first_frame, **kw):
    return PrepareSettings(**{"model": "unused", "video": str(video), "first_frame": str(first_frame), "frames": 17, **kw})


def test_prepare_takes_a_60fps_clip_at_16fps_and_writes_at_that_rate(tmp_path):
    clip = moving_square_clip(tmp_path, 60, 2.0)
    plan = prepare.run(_args(clip["video"], clip["first_frame"], frames=17), tmp_path / "run")
    assert plan["fps"] == 16 and plan["frame_rule"] == "model rate" and plan["model_fps"] == 16
    assert plan["indices"] == [math.ceil(k * 60 / 16 - 0.5) for k in range(17)]  # nearest k/16 s, ties to the earlier
    assert plan["audio_in_sync"] and (plan["width"], plan["height"]) == (768, 512)
    assert plan["mode"] == "mask-aware" and plan["mode_reason"].startswith("local edit")


def test_prepare_start_in_seconds_and_frames_auto_through_the_cli(tmp_path, capsys):
    clip = moving_square_clip(tmp_path, 30, 3.0)
    out = tmp_path / "run"
    argv = ["prepare", "--model", str(TOY_MODEL), "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]),
            "--out", str(out), "--frames", "auto", "--start", "1s", "--size", "96x64", "--mask-style", "tight"]
    # the edited first frame is frame 0's edit: from 1 s on the square has moved, which is fine for this check
    assert main(argv) == 0
    import json

    plan = json.loads((out / "prepare" / "plan.json").read_text())
    assert plan["start_time"] == 1.0 and plan["indices"][0] == 30 and plan["frames"] == 29  # 2 s left: 32 instants at 16 fps
    assert not plan["audio_in_sync"]  # the sound starts at 0 s, the frames at 1 s
    assert main([*argv[:-6], "--frames", "49"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "--frames 29" in err[0]


# ------------------------------------------------------------------ local or global edit


def hue_shift(img, by=40):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + by) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def snow(img, seed=0):
    rng = np.random.default_rng(seed)
    out = img.copy()
    H, W = img.shape[:2]
    for _ in range(H * W // 170):
        cv2.circle(out, (int(rng.integers(0, W)), int(rng.integers(0, H))), int(rng.integers(2, 6)), (250, 250, 250), -1)
    return out


def colourful(h, w, seed=0):
    """A scene of saturated colours: hue running across, texture on top."""
    hsv = np.zeros((h, w, 3), np.uint8)
    hsv[..., 0] = (np.arange(w)[None, :] * 179 // w).astype(np.uint8)
    hsv[..., 1] = 180
    hsv[..., 2] = 200
    tex = textured(h, w, seed).astype(int) - 125
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(int) + tex // 3, 0, 255).astype(np.uint8)


def test_global_edits_are_told_from_local_ones_on_known_truth():
    src = colourful(256, 384, seed=3)
    src[100:180, 150:230] = (200, 60, 60)
    local = src.copy()
    local[100:180, 150:230] = (60, 60, 200)
    assert not prepare.edit_extent(src, local).is_global
    for name, edited in [("grade", np.clip(src.astype(int) * [1.2, 1.0, 0.7] + 15, 0, 255).astype(np.uint8)),
                         ("hue", hue_shift(src)), ("snow", snow(src))]:
        e = prepare.edit_extent(src, edited)
        assert e.is_global, (name, e)


def test_real_edits_local_and_global():
    require_data(ANYV2V)
    src = read_video_frames(ANYV2V / "Man_Walking.mp4", [0])[0]
    for name in ("add_a_cowboy_hat", "change_his_clothes_to_red"):
        e = prepare.edit_extent(src, read_image(ANYV2V / f"Man_Walking__{name}.png"))
        assert not e.is_global and e.spread < 0.45, (name, e)
    kitten = read_video_frames(ANYV2V / "A_kitten_turning_its_head_on_a_wooden_floor.mp4", [0])[0]
    dog = read_image(ANYV2V / "A_kitten_turning_its_head_on_a_wooden_floor__A_dog_turning_its_head_on_a_wooden_floor.png")
    assert not prepare.edit_extent(kitten, dog).is_global
    sketch, _ = cv2.pencilSketch(src[..., ::-1].copy(), sigma_s=60, sigma_r=0.07, shade_factor=0.05)
    for name, edited in [("sketch", np.repeat(sketch[..., None], 3, axis=2)), ("snow", snow(src)), ("hue", hue_shift(src))]:
        assert prepare.edit_extent(src, edited).is_global, name


def test_mode_auto_switches_a_global_edit_to_naive_and_records_why(tmp_path, caplog):
    clip = moving_square_clip(tmp_path, 12, 2.0)
    graded = hue_shift(read_image(clip["first_frame"]), 60)
    write_png(tmp_path / "graded.png", graded)
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        plan = prepare.run(_args(clip["video"], tmp_path / "graded.png", size="96x64"), tmp_path / "run")
    assert plan["mode"] == "naive" and plan["mode_reason"].startswith("global edit") and plan["edit_extent"]["spread"] >= 0.6
    assert any("global edit; training naive" in r.getMessage() for r in caplog.records)
    # asked for mask-aware: kept, with the suggestion
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        plan = prepare.run(_args(clip["video"], tmp_path / "graded.png", size="96x64", mode="mask-aware"), tmp_path / "run2")
    assert plan["mode"] == "mask-aware" and any("--mode naive" in r.getMessage() for r in caplog.records)


def test_a_small_real_edit_does_not_get_the_looks_the_same_warning(tmp_path, caplog):
    clip = moving_square_clip(tmp_path, 12, 2.0, size=(320, 192))
    edited = read_image(clip["first_frame"])
    small = read_video_frames(clip["video"], [0])[0]
    small[20:36, 8:24] = (40, 40, 220)  # 256 pixels of 61440: a mean difference far under 0.5
    write_png(tmp_path / "small.png", small)
    assert np.abs(small.astype(int) - read_video_frames(clip["video"], [0])[0]).mean() < 0.5
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        prepare.run(_args(clip["video"], tmp_path / "small.png", size="320x192"), tmp_path / "run")
    assert not [r for r in caplog.records if "looks the same" in r.getMessage()]
    # the same file as the source with a given region: the warning is the only sign of the mistake
    write_png(tmp_path / "same.png", read_video_frames(clip["video"], [0])[0])
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        prepare.run(_args(clip["video"], tmp_path / "same.png", size="320x192", box=["8,20,24,36"]), tmp_path / "run2")
    assert [r for r in caplog.records if "looks the same" in r.getMessage()]
    del edited


def test_the_model_folder_sets_the_rate_and_the_size(tmp_path):
    from loraedit.tiny import save_tiny_layout

    assert prepare.model_frame_rate(None) == 16
    ti2v = str(save_tiny_layout(tmp_path, "ti2v"))
    assert prepare.model_frame_rate(ti2v) == 24
    # at 24 fps from a 60 fps clip; a square clip at TI2V's pixel budget in multiples of 32
    c, size = prepare.select(info(60, 10), prepare.Footage(frames=9), 24, model=ti2v)
    assert c.fps == 24 and np.abs(np.asarray(c.indices) / 60 - np.arange(9) / 24).max() <= 0.5 / 60 + 1e-6 and size == (1152, 768)
    _, size = prepare.select(VideoInfo("sq.mp4", 512, 512, 30, 300, 0, False), prepare.Footage(frames=9), 24, model=ti2v)
    assert size == (960, 960)
    # a folder that states its rate
    index = Path(ti2v) / "model_index.json"
    index.write_text(json.dumps(dict(json.loads(index.read_text()), fps=12)))
    assert prepare.model_frame_rate(ti2v) == 12


def test_the_bundled_toy_model_works_at_its_own_size_not_wan21s(tmp_path):
    from loraedit.tiny import save_tiny_model

    # it was trained at 128x128: at Wan2.1's 480P budget a 128x128 clip became 624x624, 24x the pixels, and an
    # edit that takes half a minute took nine
    for (w, h), size in [((128, 128), (128, 128)), ((128, 224), (96, 176)), ((1920, 1080), (176, 96)), ((640, 640), (128, 128))]:
        _, got = prepare.select(VideoInfo("c.mp4", w, h, 16, 40, 0, False), prepare.Footage(frames=17),
                                16, prepare.model_pixel_budget(str(TOY_MODEL)), str(TOY_MODEL))
        assert got == size, (w, h)
    assert prepare.model_pixel_budget(str(TOY_MODEL)) == 128 * 128
    # an explicit --size still wins
    _, got = prepare.select(VideoInfo("c.mp4", 128, 128, 16, 40, 0, False), prepare.Footage(frames=17, size=(256, 256)),
                            16, model=str(TOY_MODEL))
    assert got == (256, 256)
    # through the CLI, as a user runs it: a 96x64 clip of 4 s is prepared at the toy's pixel count, not blown up,
    # and at its own 17 frames, not 49
    clip = moving_square_clip(tmp_path, 16, 4.0)
    out = tmp_path / "run"
    assert main(["prepare", "--model", str(TOY_MODEL), "--video", str(clip["video"]), "--first-frame",
                 str(clip["first_frame"]), "--out", str(out), "--mask-style", "tight"]) == 0
    plan = json.loads((out / "prepare" / "plan.json").read_text())
    assert (plan["width"], plan["height"], plan["frames"]) == (160, 112, 17)
    # another model folder keeps the default of 49 frames; a given --frames wins with the toy too
    other = tmp_path / "tiny"
    save_tiny_model(other)
    assert main(["prepare", "--model", str(other), "--video", str(clip["video"]), "--first-frame",
                 str(clip["first_frame"]), "--out", str(tmp_path / "run49"), "--size", "96x64", "--mask-style", "tight"]) == 0
    assert json.loads((tmp_path / "run49" / "prepare" / "plan.json").read_text())["frames"] == 49
    assert main(["prepare", "--model", str(TOY_MODEL), "--video", str(clip["video"]), "--first-frame",
                 str(clip["first_frame"]), "--out", str(tmp_path / "run33"), "--frames", "33", "--mask-style", "tight"]) == 0
    assert json.loads((tmp_path / "run33" / "prepare" / "plan.json").read_text())["frames"] == 33
