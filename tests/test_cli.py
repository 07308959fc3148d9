"""`loraedit` end to end on the tiny model: outputs, LoRA formats, re-rendering, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from loraedit.cli import main, resolve
from loraedit.settings import TrainSettings

from conftest import edit_argv


@pytest.fixture(scope="module")
def trained_run(tiny_model, clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "jacket"
    # a large learning rate so the LoRA moves far from zero in a few steps
    assert main(edit_argv(tiny_model, clip, out, "--ref", f"8={clip['ref']}", "--ref-steps", "2", "--lr", "5e-3",
                          "--prompt", "a blue square")) == 0
    return out


def test_edit_writes_every_output(trained_run):
    out = trained_run
    for rel in ("render/edited.mp4", "render/side_by_side.mp4", "render/contact_sheet.png", "render/frames/016.png",
                "lora/pytorch_lora_weights.safetensors", "lora/wan_lora.safetensors", "train/losses.csv",
                "train/losses.png", "manifest.json", "job.json", "prepare/region/016.png", "prepare/refs/008.png"):
        assert (out / rel).is_file(), rel
    from loraedit.video import probe_video

    info = probe_video(out / "render" / "edited.mp4")
    assert (info.width, info.height, info.n_frames) == (96, 64, 17)
    assert probe_video(out / "render" / "side_by_side.mp4").width == 192
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["stages"]) >= {"prepare", "encode", "train", "render"}
    assert m["stages"]["train"]["settings"]["steps"] == 4 and m["stages"]["prepare"]["settings"]["mask_style"] == "bbox"
    assert m["stages"]["render"]["settings"]["seed"] == 0
    assert m["stages"]["train"]["total"] == 6 and m["stages"]["train"]["seconds"] > 0
    assert {"video", "first_frame", "mask", "ref 8"} <= set(m["stages"]["prepare"]["inputs"])
    assert {"frames", "region", "refs", "first_frame", "model"} <= set(m["stages"]["train"]["inputs"])
    assert m["stages"]["render"]["inputs"]["lora"] == m["stages"]["train"]["lora_sha256"]["diffusers"]
    assert m["versions"]["diffusers"] and m["versions"]["torch"]
    lines = (out / "train" / "losses.csv").read_text().splitlines()
    assert lines[0] == "step,stage,sample,loss" and len(lines) == 7


def test_saved_lora_loads_into_the_diffusers_pipeline_in_both_formats_identically(trained_run, tiny_model):
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_model)
    image = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))

    def run():
        return pipe(image=image, prompt="a blue square", height=32, width=48, num_frames=5, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    base = run()
    pipe.load_lora_weights(trained_run / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="ours")
    with_diffusers = run()
    pipe.unload_lora_weights()
    torch.testing.assert_close(run(), base)
    pipe.load_lora_weights(trained_run / "lora", weight_name="wan_lora.safetensors", adapter_name="wan")
    with_wan = run()
    assert (with_diffusers - base).abs().max() > 1e-4  # the LoRA changes the output …
    torch.testing.assert_close(with_wan, with_diffusers, atol=1e-5, rtol=1e-4)  # … the same way in both formats
    from safetensors import safe_open

    with safe_open(str(trained_run / "lora" / "wan_lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys
    assert "diffusion_model.blocks.1.ffn.2.lora_B.weight" in keys
    assert not any("k_img" in k for k in keys)


def test_rerunning_a_finished_edit_does_no_work(trained_run, tiny_model, clip, caplog):
    argv = edit_argv(tiny_model, clip, trained_run, "--ref", f"8={clip['ref']}", "--ref-steps", "2", "--lr", "5e-3",
                     "--prompt", "a blue square")
    before = sorted(p.name for p in trained_run.iterdir())
    assert main(argv) == 0
    assert "already rendered" in caplog.text
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_render_again_with_another_seed_keeps_the_first_result(trained_run, tiny_model):
    before = (trained_run / "render" / "frames" / "008.png").read_bytes()
    done = (trained_run / "train" / "done.json").read_text()
    assert main(["render", "--out", str(trained_run), "--seed", "3", "-q"]) == 0
    assert (trained_run / "render" / "frames" / "008.png").read_bytes() == before
    assert (trained_run / "render-2" / "frames" / "008.png").read_bytes() != before
    assert (trained_run / "train" / "done.json").read_text() == done  # no retraining
    m = json.loads((trained_run / "manifest.json").read_text())
    assert m["stages"]["render-2"]["seed"] == 3


def test_render_with_another_first_frame(trained_run, clip, tmp_path):
    from loraedit.video import read_image, write_png

    other = read_image(clip["first_frame"]).copy()
    other[20:40, 10:26] = (40, 220, 40)
    write_png(tmp_path / "green.png", other)
    assert main(["render", "--out", str(trained_run), "--first-frame", str(tmp_path / "green.png"), "--name", "green", "-q"]) == 0
    from safetensors.torch import load_file

    m = json.loads((trained_run / "manifest.json").read_text())
    first = load_file(str(trained_run / m["stages"]["render"]["cache"]))
    green = load_file(str(trained_run / m["stages"]["green"]["cache"]))
    # a new condition for frame 0 (and a new CLIP embedding) under the same keep mask
    assert (green["cond_render"][:, 4:, 0] - first["cond_render"][:, 4:, 0]).abs().max() > 1e-3
    assert torch.equal(green["cond_render"][:, :4], first["cond_render"][:, :4])
    assert not torch.equal(green["image_render"], first["image_render"])
    for key in ("x0", "cond_train", "image_train", "ref.8.x0", "ref.8.cond"):  # reused, not re-encoded
        assert torch.equal(green[key], first[key]), key
    a = read_image(trained_run / "render" / "frames" / "000.png").astype(int)
    b = read_image(trained_run / "green" / "frames" / "000.png").astype(int)
    assert np.abs(a - b).max() > 0


def test_naive_mode_conditions_on_the_first_frame_only(tiny_model, clip, tmp_path):
    from safetensors.torch import load_file

    assert main(edit_argv(tiny_model, clip, tmp_path / "naive", "--mode", "naive", "--steps", "1")) == 0
    assert main(edit_argv(tiny_model, clip, tmp_path / "aware", "--steps", "1")) == 0
    [naive_file] = (tmp_path / "naive" / "cache").glob("encoded-*.safetensors")
    [aware_file] = (tmp_path / "aware" / "cache").glob("encoded-*.safetensors")
    naive, aware = load_file(str(naive_file)), load_file(str(aware_file))
    assert naive["cond_train"][0, :4, 1:].sum() == 0  # stock mask: nothing kept after frame 0
    assert aware["cond_train"][0, :4, 1:].mean() > 0.3  # mask-aware: the background is kept
    assert torch.equal(naive["x0"], aware["x0"])


def test_toml_job_file_with_flags_overriding_it(tiny_model, clip, tmp_path):
    job = clip["ref"].parent / "job.toml"
    job.write_text(f'model = "{tiny_model}"\nvideo = "{clip["video"]}"\nfirst-frame = "{clip["first_frame"]}"\n'
                   f'mask = "{clip["mask"]}"\nframes = 17\nsize = "96x64"\nsteps = 3\nrank = 4\n'
                   f'[ref]\n8 = "{clip["ref"].name}"\n')  # relative to the job file
    assert main(["prepare", "--config", str(job), "--out", str(tmp_path / "run"), "--frames", "17"]) == 0
    saved = json.loads((tmp_path / "run" / "job.json").read_text())["prepare"]
    assert saved["frames"] == 17 and saved["size"] == "96x64" and "steps" not in saved  # prepare takes its own keys
    assert saved["ref"] == {"8": str(clip["ref"])} and (tmp_path / "run" / "prepare" / "refs" / "008.png").is_file()
    # train takes the training keys of the same file; a flag overrides the file
    inv = resolve(["train", "--config", str(job), "--out", str(tmp_path / "run"), "--rank", "2"])
    train = inv.stages[TrainSettings]
    assert (train.steps, train.rank, train.model) == (3, 2, str(tiny_model))
    (tmp_path / "bad.toml").write_text("stepz = 3\n")
    assert main(["prepare", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "x")]) == 2


def _run_cli(args):
    return subprocess.run([sys.executable, "-m", "loraedit", *args], capture_output=True, text=True)


def _bad(tiny_model, clip, tmp_path, **change):
    argv = {"--model": str(tiny_model), "--video": str(clip["video"]), "--first-frame": str(clip["first_frame"]),
            "--mask": str(clip["mask"]), "--out": str(tmp_path / "run"), "--frames": "17", "--size": "96x64"}
    argv.update(change)
    return ["prepare"] + [x for kv in argv.items() for x in kv]


@pytest.mark.parametrize("case,expect", [
    ("missing video", "no such video"),
    ("not a video", "cannot be read as a video"),
    ("too short", "fewer than --frames"),
    ("empty mask", "mask is empty"),
    ("not wan", "not a Wan image-to-video model"),
    ("wan 2.2", "the 'transformer_2' folder is missing"),
    ("no model", "no such model folder"),
    ("size", "multiples of 16"),
    ("ref outside", "outside the clip"),
    ("frames not 4k+1", "must be 4k+1"),
    ("missing first frame", "no such image"),
])
def test_bad_input_gets_one_line_and_exit_code_2(case, expect, tiny_model, clip, tmp_path, capsys):
    import shutil

    from loraedit.video import write_png

    change = {}
    if case == "missing video":
        change["--video"] = str(tmp_path / "nope.mp4")
    elif case == "not a video":
        (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
        change["--video"] = str(tmp_path / "junk.mp4")
    elif case == "too short":
        change["--frames"] = "49"
    elif case == "empty mask":
        write_png(tmp_path / "empty.png", np.zeros((64, 96), np.uint8))
        change["--mask"] = str(tmp_path / "empty.png")
    elif case == "not wan":
        shutil.copytree(tiny_model, tmp_path / "other")
        idx = tmp_path / "other" / "model_index.json"
        idx.write_text(idx.read_text().replace("WanImageToVideoPipeline", "StableDiffusionPipeline"))
        change["--model"] = str(tmp_path / "other")
    elif case == "wan 2.2":
        shutil.copytree(tiny_model, tmp_path / "wan22")
        idx = tmp_path / "wan22" / "model_index.json"
        idx.write_text(json.dumps(dict(json.loads(idx.read_text()), transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.9)))
        change["--model"] = str(tmp_path / "wan22")
    elif case == "no model":
        change["--model"] = str(tmp_path / "missing-model")
    elif case == "size":
        change["--size"] = "100x64"
    elif case == "ref outside":
        change["--ref"] = f"17={clip['ref']}"
    elif case == "frames not 4k+1":
        change["--frames"] = "16"
    elif case == "missing first frame":
        change["--first-frame"] = str(tmp_path / "nope.png")
    assert main(_bad(tiny_model, clip, tmp_path, **change)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("loraedit: error:") and expect in lines[0], lines


def test_bad_input_from_the_shell_has_no_traceback(tiny_model, clip, tmp_path):
    r = _run_cli(_bad(tiny_model, clip, tmp_path, **{"--size": "100x64"}))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["loraedit: error: --size 100x64: width and height must be positive multiples of 16 (e.g. 832x480)"]


# ---------------------------------------------------------------- per-command flags


def test_a_flag_of_another_command_is_an_error_naming_that_command(tmp_path, capsys):
    assert main(["render", "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loraedit: error: render: --steps is not a setting of `loraedit render`; it belongs to "
                   "`loraedit train` and `loraedit edit`"]
    assert not (tmp_path / "run").exists()  # nothing made for a refused command
    assert main(["prepare", "--out", str(tmp_path / "run"), "--render-steps", "3"]) == 2
    assert "`loraedit render` and `loraedit edit`" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "run"), "--stepz", "3"]) == 2
    assert "unknown flag --stepz" in capsys.readouterr().err


def test_help_of_each_command_lists_only_its_own_flags():
    from loraedit.cli import build_parser
    from loraedit.settings import command_fields, flag_name

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    everything = {flag_name(f) for c in ("edit",) for f in command_fields(c).values()}
    for command in ("prepare", "train", "render", "edit"):
        text = sub.choices[command].format_help()
        own = {flag_name(f) for f in command_fields(command).values()}
        assert own and all(flag in text for flag in own), command
        for flag in everything - own:
            assert f"{flag} " not in text and f"{flag}\n" not in text, (command, flag)
    assert "--steps" in sub.choices["train"].format_help() and "--steps" not in sub.choices["render"].format_help()
