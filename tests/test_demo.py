"""`loraedit demo` end to end with a few steps: every output is written and the metrics are sane."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loraedit.demo import TOY_MODEL


@pytest.mark.skipif(not (TOY_MODEL / "model_index.json").is_file(), reason="loraedit/toymodel not built")
def test_short_demo_writes_every_output(tmp_path):
    from loraedit.cli import main
    from loraedit.video import probe_video, read_image

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--ref-steps", "2", "--render-steps", "2", "-q"]) == 0
    for rel in ("source.mp4", "result.mp4", "truth.mp4", "side_by_side.mp4", "contact_sheet.png", "metrics.json",
                "inputs/first_frame_edited.png", "inputs/mask/016.png", "run/render/edited.mp4",
                "run/render/frames/016.png", "run/lora/pytorch_lora_weights.safetensors", "run/manifest.json",
                "run/train/losses.csv"):
        assert (out / rel).is_file(), rel
    assert probe_video(out / "side_by_side.mp4").width == 3 * 128
    assert read_image(out / "contact_sheet.png").shape[0] == 3 * 128
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    assert set(m) >= {"psnr_in", "colour_err_in", "psnr_out", "first_psnr", "temporal_err"}
    assert all(np.isfinite(v) for k, v in m.items() if k != "psnr_back")
    assert record["reference_frame"] is not None and "--ref" in record["command"]
    # stage 1 takes turns with the demo's hue-turned copies of the video
    assert "--colour-copies" in record["command"] and ",1,hue1," in (out / "run/train/losses.csv").read_text()


def test_demo_names_a_wrong_model_folder_and_the_fix(tmp_path, capsys):
    from loraedit import cli

    rc = cli.main(["demo", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere" in err and "no such model folder" in err and "reinstall" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value", [("--colour-copies", "-1"), ("--steps", "-2"), ("--render-steps", "0"), ("--threads", "-1")])
def test_a_bad_demo_flag_is_one_line_before_anything_is_written(flag, value, tmp_path, capsys):
    from loraedit import cli

    rc = cli.main(["demo", flag, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{flag} {value}" in err[0]
    assert not (tmp_path / "o").exists()
