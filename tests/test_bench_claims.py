"""bench/bench_claims.py as a person runs it (one clip, a few steps): the rows it prints and what it keeps."""

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_claims", ROOT / "bench" / "bench_claims.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_scores_the_source_row_against_the_source_and_prints_the_bounds(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "b"
    argv = ["--clips", "1", "--steps", "2", "--ref-steps", "2", "--render-steps", "2", "--out", str(out),
            "--variants", "stock I2V from source,mask-aware + reference"]
    # one variant, then the other: the second run adds to the results instead of dropping the first's
    assert bench.main(argv[:-1] + ["stock I2V from source", "--no-ceiling"]) == 0
    assert bench.main(argv[:-1] + ["mask-aware + reference", "--no-ceiling"]) == 0
    capsys.readouterr()
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "clip " not in text.split("claims benchmark")[0]  # both rows read back, none run again
    for row in ("(truth through the VAE)", "(frame 0 only, VAE)", "stock I2V from source", "mask-aware + reference"):
        assert row in text
    assert "video every 2" in text  # the demo's stage-2 schedule unless --ref-video-every says otherwise
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["ref_video_every"] == 2
    seed = str(bench.SEEDS[0])
    src = saved["per_clip"]["stock I2V from source"][seed]
    ref = saved["per_clip"]["mask-aware + reference"][seed]
    assert {"colour_err_front", "colour_err_back", "psnr_front"} <= set(src)
    # the result frames are kept to re-score, and the source row's score is against the source video
    from loraedit.world import clip_metrics, make_clip

    clip = make_clip(bench.SEEDS[0])
    frames = np.load(out / "results" / seed / f"{seed}-stock_I2V_from_source.npz")["frames"]
    assert frames.shape == clip.source.shape
    import dataclasses

    assert clip_metrics(frames, dataclasses.replace(clip, truth=clip.source))["psnr_in"] == src["psnr_in"]
    assert clip_metrics(frames, clip)["psnr_in"] != src["psnr_in"]
    assert ref["psnr_back"] == ref["psnr_back"]  # measured (not NaN): the clip shows the back face
    # other stage-2 settings re-measure only the reference row: the stock row is reused, not run again
    base = argv[:-2] + ["--no-ceiling", "--ref-video-every", "5"]
    assert bench.main(base + ["--variants", "stock I2V from source"]) == 0
    assert f"clip {seed} stock I2V from source" not in capsys.readouterr().out
    assert bench.main(base + ["--variants", "mask-aware + reference"]) == 0
    assert f"clip {seed} mask-aware + reference" in capsys.readouterr().out

