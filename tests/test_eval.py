"""`loraedit eval`: the metrics on known cases, CLIP from a tiny random model saved in the real
transformers layout, and on the toy world the ranking its ground truth gives."""

import math

import numpy as np
import pytest

from loraedit import world
from loraedit.cli import main
from loraedit.evaluate import ClipScorer, Scored, pixel_metrics
from loraedit.files import read_json
from loraedit.video import write_png, write_video


@pytest.fixture(scope="module")
def world_clip():
    return world.make_clip(101)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (vision + text towers) saved as openai/clip-vit-* folders are."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}).save_pretrained(folder)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    return folder


def test_pixel_metrics_see_background_damage_and_flicker_but_not_the_edit(world_clip):
    c = world_clip
    truth = pixel_metrics(Scored("truth", c.truth, c.source, c.truth[0], c.region))
    # the world's edit recolours the object only: outside the region the truth is the source
    assert truth["psnr_out"] == 99.0 and truth["ssim_out"] == pytest.approx(1.0) and truth["first_psnr"] == 99.0
    # it moves exactly as the source does, so the source's flow explains it about as well as the source
    assert truth["warp_err"] < 1.5 * truth["warp_err_source"] + 1.0

    rng = np.random.default_rng(0)
    noisy = c.truth.astype(np.int16) + rng.integers(-25, 26, c.truth.shape)
    noisy = np.where(c.region[..., None], c.truth, noisy).clip(0, 255).astype(np.uint8)  # damage outside only
    damaged = pixel_metrics(Scored("damaged", noisy, c.source, c.truth[0], c.region))
    assert damaged["psnr_out"] < 30 and damaged["ssim_out"] < 0.9

    flicker = c.truth.astype(np.int16)
    flicker[1::2] += 30
    flicker = flicker.clip(0, 255).astype(np.uint8)
    m = pixel_metrics(Scored("flicker", flicker, c.source, c.truth[0], c.region))
    assert m["warp_err"] > truth["warp_err"] + 15


def test_clip_metrics_from_a_tiny_clip_folder(world_clip, tiny_clip):
    c = world_clip
    scorer = ClipScorer(str(tiny_clip))
    same = scorer.scores(Scored("same", c.source, c.source, c.truth[0], c.region))
    assert same["input_similarity"] == pytest.approx(1.0, abs=1e-5)
    other = world.make_clip(202)
    different = scorer.scores(Scored("other", other.source, c.source, c.truth[0], c.region))
    assert different["input_similarity"] < same["input_similarity"] - 1e-4
    assert -1 <= different["clip_score"] <= 1 and not math.isnan(different["clip_score"])
    # the edited first frame repeated: every frame has the first frame's embedding
    still = scorer.scores(Scored("still", np.repeat(c.truth[:1], c.frames, 0), c.source, c.truth[0], c.region))
    assert still["clip_score"] == pytest.approx(1.0, abs=1e-5)


def test_eval_command_on_videos_with_and_without_clip(world_clip, tiny_clip, tmp_path, capsys, caplog):
    c = world_clip
    paths = world.write_clip(c, tmp_path / "clip")
    out = tmp_path / "other_method.mkv"
    write_video(out, c.truth, c.fps, lossless=True)
    first = tmp_path / "first.png"
    write_png(first, c.truth[0])
    table = tmp_path / "scores.md"
    argv = ["eval", str(out), "--source", str(paths["source_lossless"]), "--first-frame", str(first),
            "--mask", str(paths["mask"]), "--table", str(table)]
    assert main([*argv, "--clip", str(tiny_clip)]) == 0
    text = table.read_text()
    assert "CLIP score" in text and "input sim" in text and "PSNR out (dB)" in text and "| 99.00 |" in text
    caplog.clear()
    assert main(argv) == 0
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "need CLIP weights: give --clip PATH" in notes[0] and "\n" not in notes[0]
    assert "CLIP score" not in table.read_text()
    capsys.readouterr()
    assert main([*argv, "--clip", str(tmp_path / "no-clip-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraedit: error: --clip ") and "no such folder" in err and err.count("\n") == 1
    assert main(["eval", str(out)]) == 2
    assert "--like RUN" in capsys.readouterr().err


DEQA_STANDIN = '''
"""Stands in for DeQA-Score's remote code: score(list of PIL images) -> one score (1-5) per image."""
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel


class StandInConfig(PretrainedConfig):
    model_type = "deqa_standin"


class StandIn(PreTrainedModel):
    config_class = StandInConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.post_init()

    def score(self, images):  # brighter = "better": 1 + 4 * mean brightness
        return torch.stack([1 + 4 * self.scale[0] * float(np.asarray(im, np.float32).mean() / 255) for im in images])
'''


def test_deqa_is_loaded_as_remote_code_and_averaged_over_frames(world_clip, tmp_path):
    """The real DeQA-Score is a 7B transformers remote-code model; a stand-in with its interface,
    saved the way such a folder is (config.json with auto_map, the module, safetensors)."""
    import importlib
    import sys

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "deqa_standin.py").write_text(DEQA_STANDIN)
    sys.path.insert(0, str(tmp_path / "code"))
    try:
        mod = importlib.import_module("deqa_standin")
        cfg = mod.StandInConfig(auto_map={"AutoConfig": "deqa_standin.StandInConfig",
                                          "AutoModelForCausalLM": "deqa_standin.StandIn"})
        folder = tmp_path / "deqa"
        mod.StandIn(cfg).save_pretrained(folder)
    finally:
        sys.path.remove(str(tmp_path / "code"))
        sys.modules.pop("deqa_standin", None)
    (folder / "deqa_standin.py").write_text(DEQA_STANDIN)
    c = world_clip
    out = tmp_path / "result.mkv"
    write_video(out, c.truth, c.fps, lossless=True)
    table = tmp_path / "t.md"
    assert main(["eval", str(out), "--source", str(out), "--deqa", str(folder), "--table", str(table)]) == 0
    row = table.read_text().splitlines()[2].split("|")
    expected = 1 + 4 * c.truth.astype(np.float32).mean() / 255
    assert "DeQA" in table.read_text() and float(row[2]) == pytest.approx(expected, abs=2e-3)


def test_on_the_toy_world_eval_ranks_truth_naive_and_no_lora_as_the_ground_truth_does(world_clip, tmp_path, capsys):
    """Through `loraedit batch` (variants: no LoRA, naive LoRA) and `loraedit eval`: where the world's
    truth says one result keeps the background / frame 0 / motion better than another, eval's
    truth-free metrics say the same, and the true edit ranks first."""
    from loraedit.demo import DEMO, TOY_MODEL, read_frames

    c = world_clip
    paths = world.write_clip(c, tmp_path / "clip")
    jobs = tmp_path / "claims.toml"
    jobs.write_text(f"""
model = "{TOY_MODEL}"
video = "{paths['source_lossless']}"
first-frame = "{paths['first_frame']}"
mask = "{paths['mask']}"
prompt = "{c.edited_caption}"
frames = {DEMO['frames']}
size = "{DEMO['size']}"
render-steps = 6
guidance = 1.0
lr = 1e-3
device = "cpu"
mode = "naive"
[[job]]
name = "world101"
steps = [0, 30]
""")
    root = tmp_path / "root"
    assert main(["batch", str(jobs), "--out", str(root), "-q"]) == 0
    truth_video = tmp_path / "truth.mkv"
    write_video(truth_video, c.truth, c.fps, lossless=True)
    runs = {"no LoRA": root / "world101.steps-0", "naive": root / "world101.steps-30"}
    assert main(["eval", str(truth_video), "--like", str(runs["naive"])]) == 0
    assert main(["eval", *map(str, runs.values())]) == 0
    ours = {n: read_json(r / "render" / "metrics.json") for n, r in runs.items()}
    batch = {j["name"]: j["metrics"] for j in read_json(root / "batch.json")["jobs"]}
    assert batch["world101.steps-30"] == ours["naive"]  # the page shows the same figures
    from loraedit.evaluate import load_video, score

    ours["truth"] = score(load_video(truth_video, runs["naive"], None, None, None))
    truth = {n: world.clip_metrics(read_frames(r / "render" / "frames", c.frames), c) for n, r in runs.items()}
    truth["truth"] = world.clip_metrics(c.truth, c)

    for n in ("naive", "no LoRA"):
        assert ours["truth"]["psnr_out"] > ours[n]["psnr_out"] and ours["truth"]["ssim_out"] > ours[n]["ssim_out"]
        assert ours["truth"]["warp_err"] < ours[n]["warp_err"]
    decided = 0
    for ours_key, truth_key, higher_better, margin in (("psnr_out", "psnr_out", True, 0.2),
                                                       ("first_psnr", "first_psnr", True, 0.2),
                                                       ("warp_err", "temporal_err", False, 0.2)):
        d = truth["naive"][truth_key] - truth["no LoRA"][truth_key]
        if abs(d) < margin:
            continue  # the ground truth does not tell them apart on this
        decided += 1
        e = ours["naive"][ours_key] - ours["no LoRA"][ours_key]
        assert np.sign(e) == np.sign(d), (ours_key, truth["naive"][truth_key], truth["no LoRA"][truth_key],
                                          ours["naive"][ours_key], ours["no LoRA"][ours_key])
    assert decided >= 1, truth


def test_eval_source_at_another_frame_rate_or_aspect(world_clip, tmp_path, capsys):
    """Frame i of a 16-fps result was compared with frame i of a 48-fps source (an exact copy scored
    17 dB); a source or first frame of another aspect was scored as if it fitted."""
    import cv2

    c = world_clip
    fast = np.repeat(c.source, 3, axis=0)  # the same clip at 3× the frame rate
    write_video(tmp_path / "src48.mkv", fast, c.fps * 3, lossless=True)
    write_video(tmp_path / "result.mkv", c.source, c.fps, lossless=True)
    table = tmp_path / "t.md"
    assert main(["eval", str(tmp_path / "result.mkv"), "--source", str(tmp_path / "src48.mkv"), "--table", str(table), "-q"]) == 0
    assert "| 99.00 |" in table.read_text()  # the same pictures at the same times
    wider = np.stack([cv2.resize(f, (f.shape[1] * 4 // 3, f.shape[0])) for f in c.source])  # a crop of it was edited
    write_video(tmp_path / "wider.mkv", wider, c.fps, lossless=True)
    assert main(["eval", str(tmp_path / "result.mkv"), "--source", str(tmp_path / "wider.mkv"), "-q"]) == 0
    wide = np.stack([cv2.resize(f, (f.shape[1] * 4, f.shape[0])) for f in c.source])
    write_video(tmp_path / "wide.mkv", wide, c.fps, lossless=True)
    write_png(tmp_path / "wide.png", wide[0])
    capsys.readouterr()
    for argv in (["--source", str(tmp_path / "wide.mkv")],
                 ["--source", str(tmp_path / "src48.mkv"), "--first-frame", str(tmp_path / "wide.png")]):
        assert main(["eval", str(tmp_path / "result.mkv"), *argv, "-q"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and "another aspect ratio than the result's" in err[0], err


def test_eval_on_a_single_frame_is_quiet(world_clip):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "mean of empty slice" printed under the table
        m = pixel_metrics(Scored("one", world_clip.source[:1], world_clip.source[:1], world_clip.source[0], None))
    assert math.isnan(m["psnr_out"]) and m["first_psnr"] > 90


def test_eval_refuses_inputs_that_cannot_be_what_a_result_was_made_from(world_clip, tmp_path, capsys):
    c = world_clip
    write_video(tmp_path / "result.mkv", c.source, c.fps, lossless=True)
    write_png(tmp_path / "frame.png", c.source[0])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "prepare").mkdir()
    (tmp_path / "run" / "prepare" / "plan.json").write_text("{}")
    cases = [(["--source", str(tmp_path / "frame.png")], "is an image; pass the source video"),  # every metric was "–", exit 0
             (["--source", str(tmp_path)], "is a folder; pass the source video"),
             (["--like", str(tmp_path / "run"), "--source", str(tmp_path / "result.mkv")], "not both"),
             (["--render", "../other/render"], "--render '../other/render': must be the name of a folder inside the run"),
             (["--source", str(tmp_path / "result.mkv")], "--source: is for scoring a result video; a run folder is scored")]
    for flags, expect in cases:
        target = str(tmp_path / "run") if flags[0] == "--render" or flags == cases[-1][0] else str(tmp_path / "result.mkv")
        assert main(["eval", target, *flags, "-q"]) == 2, flags
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and expect in err[0], err
