"""The prepare stage: frame choice, sizes, the edited frame's size, references."""

import numpy as np
import pytest

from loraedit import prepare
from loraedit.errors import InputError
from loraedit.settings import PrepareSettings
from loraedit.video import fit_edited, frame_indices, read_image


def _args(clip, out, **kw):
    base = dict(model="unused", video=str(clip["video"]), first_frame=str(clip["first_frame"]), mask=str(clip["mask"]), frames=17,
                size="96x64", mask_style="bbox", grow=0.10)
    base.update(kw)
    return PrepareSettings(**base)


def test_frames_are_spread_evenly_or_strided():
    assert frame_indices(24, 17) == [round(i * 23 / 16) for i in range(17)]
    assert frame_indices(100, 5, start=10, stride=3) == [10, 13, 16, 19, 22]
    with pytest.raises(InputError, match="fewer than --frames"):
        frame_indices(10, 17)


def test_prepare_writes_lossless_frames_regions_and_plan(clip, tmp_path, tiny_model):
    plan = prepare.run(_args(clip, tmp_path, ref=[f"8={clip['ref']}"], model=str(tiny_model)), tmp_path)
    assert (plan["width"], plan["height"], plan["frames"]) == (96, 64, 17)
    loaded = prepare.load(tmp_path)
    assert loaded["source"].shape == (17, 64, 96, 3) and loaded["region"].shape == (17, 64, 96)
    assert list(loaded["refs"]) == [8]
    # the region follows the square (mask given per frame), loosened into a box
    xs = [np.nonzero(r.any(axis=0))[0] for r in loaded["region"]]
    assert xs[-1].min() > xs[0].min() + 20
    assert loaded["region"][0].sum() >= 16 * 20
    # PNG intermediates are exact
    assert np.array_equal(read_image(tmp_path / "prepare" / "first_frame.png"), loaded["first"])


def test_an_edited_frame_at_the_working_size_or_the_source_aspect_is_accepted(clip, tmp_path):
    src = read_image(clip["first_frame"])  # 96x64: the source size and the working size here
    assert fit_edited(src, 96, 64, 96, 64, "x").shape == (64, 96, 3)
    big = np.repeat(np.repeat(src, 2, axis=0), 2, axis=1)  # 192x128, same aspect
    assert fit_edited(big, 96, 64, 96, 64, "x").shape == (64, 96, 3)
    with pytest.raises(InputError, match="different aspect ratio"):
        fit_edited(np.zeros((100, 100, 3), np.uint8), 96, 64, 96, 64, "x.png")


def test_reference_index_must_lie_inside_the_clip(clip):
    assert PrepareSettings(ref=[f"16={clip['ref']}"], frames=17).ref == {16: str(clip["ref"])}
    for bad in ("0", "17", "-1"):
        with pytest.raises(InputError, match="outside the clip"):
            PrepareSettings(ref=[f"{bad}={clip['ref']}"], frames=17)
    with pytest.raises(InputError, match="FRAME=PATH"):
        PrepareSettings(ref=[str(clip["ref"])], frames=17)


def test_an_edit_exported_as_a_transparent_layer_shows_the_video_where_it_is_transparent(clip, tmp_path):
    """Only the recoloured square is opaque (a layer exported alone): its transparent pixels were
    filled with black, so the edit covered the whole frame and was trained naive."""
    from PIL import Image

    edited = read_image(clip["first_frame"])
    layer = np.zeros((64, 96, 4), np.uint8)
    layer[20:40, 10:26, :3] = edited[20:40, 10:26]
    layer[20:40, 10:26, 3] = 255
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    plan = prepare.run(_args(clip, tmp_path / "run", first_frame=str(tmp_path / "layer.png"), mask=None, mode="auto",
                             mask_style="tight"), tmp_path / "run")
    loaded = prepare.load(tmp_path / "run")
    assert plan["mode"] == "mask-aware"
    assert np.array_equal(loaded["first"][20:40, 10:26], edited[20:40, 10:26])
    outside = np.ones((64, 96), bool)
    outside[20:40, 10:26] = False
    assert np.abs(loaded["first"][outside].astype(int) - loaded["source"][0][outside].astype(int)).max() <= 1


def test_a_reference_that_cannot_be_used_is_refused_before_the_frames_are_tracked(clip, tmp_path, monkeypatch):
    from loraedit import masks

    def no_tracking(*a, **k):
        raise AssertionError("the region was tracked before the reference was checked")

    monkeypatch.setattr(masks, "edit_regions", no_tracking)
    from loraedit.video import write_png

    write_png(tmp_path / "square.png", np.zeros((50, 50, 3), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InputError, match=r"--ref 8=.*square.png: is 50x50, a different aspect ratio"):
        prepare.run(_args(clip, tmp_path, ref=[f"8={tmp_path / 'square.png'}"]), tmp_path / "a")
    with pytest.raises(InputError, match="broken.png: cannot be read as an image"):
        prepare.run(_args(clip, tmp_path, ref=[f"8={tmp_path / 'broken.png'}"]), tmp_path / "b")


def _textured_video(path, frames=17, h=64, w=120, sar=None):
    import av
    import cv2

    rng = np.random.default_rng(1)
    scene = cv2.GaussianBlur((rng.random((h, w + frames, 3)) * 255).astype(np.uint8), (0, 0), 1.5)
    video = np.stack([np.ascontiguousarray(scene[:, i:i + w]) for i in range(frames)])
    with av.open(str(path), "w") as out:
        lossless = path.suffix == ".mkv"
        s = out.add_stream("ffv1" if lossless else "libx264", rate=16)
        s.pix_fmt, s.height, s.width = "bgr0" if lossless else "yuv420p", h, w
        if sar is not None:
            s.codec_context.sample_aspect_ratio = sar
        for f in video:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    return video


def test_a_transparent_reference_at_the_source_size_shows_the_frame_in_the_right_place(tmp_path):
    """A 120x64 clip worked at 96x64 (cropped): a transparent reference at the source size showed a
    re-cropped, stretched frame behind the edit (32 grey levels off)."""
    from PIL import Image

    video = _textured_video(tmp_path / "clip.mkv")
    edited = video[0].copy()
    edited[20:40, 50:70] = (250, 30, 30)
    Image.fromarray(edited).save(tmp_path / "first.png")
    layer = np.zeros((64, 120, 4), np.uint8)
    layer[20:40, 50:70] = (250, 30, 30, 255)
    Image.fromarray(layer, "RGBA").save(tmp_path / "ref8.png")
    s = PrepareSettings(model="unused", video=str(tmp_path / "clip.mkv"), first_frame=str(tmp_path / "first.png"), frames=17,
                        size="96x64", ref=[f"8={tmp_path / 'ref8.png'}"])
    prepare.run(s, tmp_path / "run")
    loaded = prepare.load(tmp_path / "run")
    ref, frame = loaded["refs"][8].astype(int), loaded["source"][8].astype(int)
    outside = np.ones((64, 96), bool)
    outside[18:42, 36:58] = False  # the patch (x 50-70 of 120 is 38-58 of the 96-wide crop) and its edge
    assert np.abs(ref - frame)[outside].mean() < 1.0


def test_an_edited_frame_at_an_anamorphic_videos_stored_size_is_accepted(tmp_path):
    """ffmpeg -frames:v 1 grabs the stored 96x64 picture of a clip shown at 128x64; it was refused as 'another aspect'."""
    from fractions import Fraction

    from loraedit.video import write_png

    video = _textured_video(tmp_path / "ana.mp4", w=96, sar=Fraction(4, 3))
    edited = video[0].copy()
    edited[20:40, 30:50] = (250, 30, 30)
    write_png(tmp_path / "grab.png", edited)  # the stored size
    s = PrepareSettings(model="unused", video=str(tmp_path / "ana.mp4"), first_frame=str(tmp_path / "grab.png"), frames=17,
                        size="128x64")
    plan = prepare.run(s, tmp_path / "run")
    assert (plan["source_width"], plan["source_height"], plan["source_stored"]) == (128, 64, [96, 64])
    first = prepare.load(tmp_path / "run")["first"]
    assert first.shape == (64, 128, 3) and first[25:35, 45:62, 0].mean() > 200  # the edit, widened with the picture
