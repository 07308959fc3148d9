"""`loraedit` end to end on the tiny model: outputs, LoRA formats, re-rendering, bad input."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert main(["render", "--out", str(trained_run), "--seed", "3", "-q"]) == 0  # the same again: reused
    assert not (trained_run / "render-3").exists()


def test_edit_after_render_with_another_seed_renders_the_trained_seed_and_says_what_it_took(trained_run, caplog):
    """`render --seed 3` is a one-off: a later `edit` (or `render`) does not inherit its seed; what a
    command takes from the run's job.json is said in one line."""
    assert main(["render", "--out", str(trained_run), "--seed", "3", "-q"]) == 0
    before = sorted(p.name for p in trained_run.glob("render*"))
    caplog.clear()
    assert main(["edit", "--out", str(trained_run), "-q"]) == 0  # everything else from the run
    assert f"already rendered with these settings: {trained_run / 'render' / 'edited.mp4'}" in caplog.text
    assert sorted(p.name for p in trained_run.glob("render*")) == before
    [said] = [r.getMessage() for r in caplog.records if "from the run's job.json" in r.getMessage()]
    assert "--steps 4" in said and "--render-steps 2" in said and "--ref 8=" in said and "--seed" not in said, said
    caplog.clear()
    assert main(["render", "--out", str(trained_run), "--guidance", "4", "-q"]) == 0
    # the caption it renders with is the trained run's, not a render flag: named too
    [caption] = [r.getMessage() for r in caplog.records if "edited-video caption" in r.getMessage()]
    assert "'sks a blue square'" in caption and "--edit-prompt" in caption, caption
    m = json.loads((trained_run / "manifest.json").read_text())
    new = [k for k in m["stages"] if k.startswith("render") and k not in before]
    assert len(new) == 1 and m["stages"][new[0]]["seed"] == 0 and m["stages"][new[0]]["settings"]["render_steps"] == 2


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
    # the render keeps the first frame it started from: eval's frame-0 PSNR compares with it, not the prepared one
    assert np.array_equal(read_image(trained_run / "green" / "first_frame.png"), other)
    from loraedit.evaluate import load_run

    assert np.array_equal(load_run(trained_run, "green").first, other)


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
    assert not (tmp_path / "run").exists()  # a refused command leaves nothing new on disk


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
    assert main(["masks", "--video", "v.mp4", "--first-frame", "f.png", "--out", str(tmp_path / "m"), "--steps", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("loraedit: error: masks: --steps is not a setting of `loraedit masks`; "
                                               "it belongs to `loraedit train` and `loraedit edit`")


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


# ---------------------------------------------------------------- bad values: one line, exit 2, before any model loads

BAD_VALUES = [  # (flags added to a good `edit`, or a special case, and what the one line must say)
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "0"], "--lr 0: must be greater than 0"),
    (["--weight-decay", "-1"], "--weight-decay -1: must be at least 0"),
    (["--device", "tpu7"], "--device tpu7: is not a device"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU"),
    (["--feather", "-4", "--composite"], "--feather -4: must be at least 0"),
    (["--lora-targets", "nothing_like_this"], "matches none of the model's"),
    (["--lora-targets", "blocks.(["], "is not a valid regular expression"),
    (["--seed", "-5"], "--seed -5: must lie between 0 and 10000000000000"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999: must lie between 0 and 10000000000000"),
    (["--guidance", "-3"], "--guidance -3: must be at least 1"),
    (["--alpha", "0"], "--alpha 0: must be greater than 0"),
    (["--rank", "0"], "--rank 0: must be at least 1"),
    (["--steps", "-1"], "--steps -1: must be at least 0"),
    (["--steps", "two"], "--steps two: must be a whole number"),
    (["--render-steps", "0"], "--render-steps 0: must be at least 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0: must be at least 1"),
    (["--memory", "fp16"], "--memory fp16: unknown memory mode"),
    (["--ref", "abc"], "write it as FRAME=PATH"),
    (["--ref", "4="], "4=: the path is missing"),
    (["--ref", "x=a.png"], "the frame must be a whole number"),
    (["--size", "100x64"], "multiples of 16"),
    (["--frames", "16"], "must be 4k+1"),
    (["--mask", "/nonexistent/mask.png"], "no such mask file"),
    (["--first-frame", "/nonexistent/edited.png"], "no such image"),
    (["--grow", "-0.5"], "--grow -0.5: must be at least 0"),
    ("toml steps = \"two\"", "steps = 'two': must be a whole number"),
    ("toml rank = 2.5", "rank = 2.5: must be a whole number"),
    ("toml stepz = 3", "unknown setting 'stepz'"),
    ("toml ref = 4", "write each reference as FRAME=PATH"),
    ("toml render-steps = 1\nrender_steps = 2", "'render-steps' and 'render_steps' are the same setting; keep one"),
    ("out is a file", "is an existing file, not a run folder"),
    ("out read-only", "cannot create the run folder (Read-only file system)"),
    ("render --steps 1", "--steps is not a setting of `loraedit render`"),
]


@pytest.mark.parametrize("change,expect", BAD_VALUES, ids=[str(c) for c, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_with_exit_2_before_any_model_loads(change, expect, tiny_model, clip, tmp_path, capsys, monkeypatch):
    import errno

    from loraedit import encode, models, render, train

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the bad value was reported")

    for module in (models, encode, train, render):  # where they are defined and where they are used
        for name in ("load_transformer", "load_encoders", "load_vae"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_loading)
    argv = edit_argv(tiny_model, clip, tmp_path / "run")
    if isinstance(change, list):
        argv += change
    elif change.startswith("toml"):
        line = change.removeprefix("toml ")
        key = "--" + line.split(" =")[0]
        if key in argv:  # the flag would override the file's value
            del argv[argv.index(key) : argv.index(key) + 2]
        (tmp_path / "job.toml").write_text(line + "\n")
        argv += ["--config", str(tmp_path / "job.toml")]
    elif change == "out is a file":
        (tmp_path / "file").write_text("x")
        argv[argv.index("--out") + 1] = str(tmp_path / "file")
    elif change == "out read-only":
        real_mkdir = Path.mkdir

        def read_only(self, *a, **k):
            if self == tmp_path / "ro" / "run":
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", read_only)
        argv[argv.index("--out") + 1] = str(tmp_path / "ro" / "run")
    elif change == "render --steps 1":
        argv = ["render", "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("loraedit: error: ") and expect in lines[0], lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "ro").exists()  # nothing new on disk


def test_flag_mistakes_are_reported_before_torch_is_imported(tmp_path):
    """The checks run before the heavy imports, so a typo costs a fraction of a second."""
    script = (
        "import sys\n"
        "from loraedit.cli import main\n"
        f"codes = [main(['edit', '--out', {str(tmp_path / 'r')!r}, '--lr', 'nan']),\n"
        f"         main(['render', '--out', {str(tmp_path / 'r')!r}, '--steps', '1']),\n"
        f"         main(['edit', '--out', {str(tmp_path / 'r')!r}, '--size', '128X12'])]\n"
        "print(codes, 'torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.stdout.strip() == "[2, 2, 2] False False", (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 3 and "Traceback" not in r.stderr


def test_values_are_normalised_before_they_are_recorded_or_compared(tiny_model, clip, tmp_path):
    """128X128 is 128x128; a TOML ref string is one reference; relative paths become absolute."""
    from loraedit.settings import PrepareSettings

    s = PrepareSettings(size=" 96X64 ", ref="8=" + str(clip["ref"]), frames=17)
    assert s.size == "96x64" and s.ref == {8: str(clip["ref"])}
    (tmp_path / "job.toml").write_text(f'ref = "8={clip["ref"].name}"\n')
    import shutil

    shutil.copy(clip["ref"], tmp_path / clip["ref"].name)
    inv = resolve(["prepare", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "job.toml"), "--frames", "17"])
    assert inv.stages[PrepareSettings].ref == {8: str(tmp_path / clip["ref"].name)}
    run = tmp_path / "run"
    assert main(edit_argv(tiny_model, clip, run, "--steps", "1", "--render-steps", "1")) == 0
    argv = edit_argv(tiny_model, clip, run, "--steps", "1", "--render-steps", "1")
    argv[argv.index("--size") + 1] = "96X64"
    assert main(argv) == 0  # the same run: nothing refused, nothing redone
    assert sorted(p.name for p in run.glob("render*")) == ["render"]


# ---------------------------------------------------------------- failures during a run


def test_a_non_finite_loss_stops_training_at_once_naming_the_step(tiny_model, clip, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(edit_argv(tiny_model, clip, run, "--lr", "1e30", "--steps", "6", "--checkpoint-every", "1")) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("loraedit:")]
    assert len(lines) == 1 and "training diverged at step" in lines[0] and "lower --lr (now 1e+30; try 1e+29)" in lines[0], lines
    assert not (run / "lora").exists() and not (run / "render").exists()
    step = int(lines[0].split("step ")[1].split(":")[0])
    import torch
    from safetensors.torch import load_file

    kept = sorted((run / "train" / "checkpoints").glob("step-*"))
    assert kept and int(kept[-1].name.split("-")[1]) == step - 1  # the last good step is kept, nothing after it
    assert all(torch.isfinite(t).all() for t in load_file(str(kept[-1] / "state.safetensors")).values())


def test_a_full_disk_is_one_line_and_a_rerun_continues(tiny_model, clip, tmp_path, capsys, monkeypatch):
    import errno

    from loraedit import train

    real = train.save_file
    calls = {"n": 0}

    def disk_full(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(train, "save_file", disk_full)
    argv = edit_argv(tiny_model, clip, tmp_path / "run", "--steps", "4", "--checkpoint-every", "2", "--render-steps", "1")
    assert main(argv) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("loraedit:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "run the same command again" in lines[0], lines
    monkeypatch.setattr(train, "save_file", real)
    assert main(argv) == 0
    assert '"resumed_from": 2' in (tmp_path / "run" / "train" / "done.json").read_text()


def test_ctrl_c_during_render_says_what_is_left_and_the_rerun_finishes_it(tiny_model, clip, tmp_path, capsys, monkeypatch):
    from loraedit import method

    run = tmp_path / "run"
    argv = edit_argv(tiny_model, clip, run, "--steps", "1", "--render-steps", "1")
    real = method.sample_latents

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(method, "sample_latents", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "render" in err
    assert not (run / "render" / "settings.json").exists()
    monkeypatch.setattr(method, "sample_latents", real)
    assert main(["render", "--out", str(run), "-q"]) == 0
    assert sorted(p.name for p in run.glob("render*")) == ["render"]  # the interrupted one, finished in place
    assert (run / "render" / "settings.json").is_file()


# ---------------------------------------------------------------- one command per run folder; identical bytes


def test_two_edits_on_one_folder_the_second_refuses_and_identical_runs_give_identical_bytes(tiny_model, clip, tmp_path, capsys):
    import os
    import time

    argv = edit_argv(tiny_model, clip, tmp_path / "a", "--steps", "3", "--checkpoint-every", "2", "--render-steps", "1",
                     "--ref", f"8={clip['ref']}", "--ref-steps", "1")
    env = dict(os.environ, PYTHONHASHSEED="123")  # another process, another hash seed: no dict-order luck
    first = subprocess.Popen([sys.executable, "-m", "loraedit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lock = tmp_path / "a" / ".lock"
        for _ in range(600):
            if lock.is_file() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert lock.is_file(), first.communicate()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by another loraedit command" in err[0] and f"pid {first.pid}" in err[0], err
    finally:
        out, errs = first.communicate(timeout=600)
    assert first.returncode == 0, errs
    assert not lock.exists()
    assert "Loading pipeline components" not in errs and "it/s]" not in errs  # -q: no library loading bars either
    # the twin runs in a process of its own too: torch's thread setup (the test process calls
    # torch.set_num_threads) changes the order of float reductions, and so the last bits
    argv_b = list(argv)
    argv_b[argv_b.index("--out") + 1] = str(tmp_path / "b")
    twin = subprocess.run([sys.executable, "-m", "loraedit", *argv_b], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONHASHSEED="7"), timeout=600)
    assert twin.returncode == 0, twin.stderr
    for rel in ("lora/pytorch_lora_weights.safetensors", "lora/wan_lora.safetensors",
                "train/checkpoints/step-000004/state.safetensors", "train/checkpoints/step-000004/state.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_model, clip, tmp_path):
    import socket

    run = tmp_path / "run"
    argv = edit_argv(tiny_model, clip, run, "--steps", "1", "--render-steps", "1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "edit"}))
    assert main(argv) == 0
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------- memory modes: train in one, render in another


def test_fp8_trains_and_renders_end_to_end_and_renders_again_in_bf16(tiny_model, clip, tmp_path, capsys):
    """The 24 GB user's path: fp8 storage, bf16 compute, gradient checkpointing; then the same run in bf16."""
    from loraedit.video import read_image

    run = tmp_path / "run"
    argv = edit_argv(tiny_model, clip, run, "--steps", "2", "--render-steps", "2", "--lr", "5e-3", "--memory", "fp8",
                     "--gradient-checkpointing", "on")
    assert main(argv) == 0, capsys.readouterr().err
    lora = (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    m = json.loads((run / "manifest.json").read_text())
    assert m["stages"]["train"]["memory_mode"] == "fp8" and m["stages"]["render"]["settings"]["memory"] == "fp8"
    # the same run rendered in bf16: not refused, the LoRA reused, a new render beside the fp8 one
    argv[argv.index("--memory") + 1] = "bf16"
    assert main(argv) == 0, capsys.readouterr().err
    assert (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert sorted(p.name for p in run.glob("render*")) == ["render", "render-2"]
    fp8 = np.stack([read_image(p) for p in sorted((run / "render" / "frames").glob("*.png"))]).astype(float)
    bf16 = np.stack([read_image(p) for p in sorted((run / "render-2" / "frames").glob("*.png"))]).astype(float)
    assert fp8.std() > 5  # a picture, not a black (NaN) video
    assert np.abs(fp8 - bf16).mean() < 8, np.abs(fp8 - bf16).mean()  # close to the bf16 render (0-255 scale)


# ---------------------------------------------------------------- the user's path: the same clip through masks and edit


def test_masks_warns_about_a_crop_as_prepare_does(tiny_model, clip, tmp_path, caplog):
    size = ["--frames", "5", "--size", "48x64"]  # a 96x64 clip cut to 48x64: half the frame and part of the edit
    both = ["--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]), *size]
    assert main(["masks", "--out", str(tmp_path / "m"), "-q", *both]) == 0
    from_masks = [r.getMessage() for r in caplog.records if "cuts away" in r.getMessage()]
    caplog.clear()
    assert main(["prepare", "--model", str(tiny_model), "--out", str(tmp_path / "run"), *both]) == 0
    from_prepare = [r.getMessage() for r in caplog.records if "cuts away" in r.getMessage()]
    assert from_masks == from_prepare and len(from_masks) == 1 and "of the edit" in from_masks[0], (from_masks, from_prepare)


def test_a_too_short_clip_gives_one_length_and_a_fix_that_works(tiny_model, tmp_path, capsys):
    """The kitten clip (16 frames at 8 fps): its length is 2.00 s in every message, and the fix offered
    works when typed in (never --frames 1, which edits nothing)."""
    import re

    from loraedit.samples import shared_data_dir

    from conftest import require_data

    kitten = (shared_data_dir() or Path("missing")) / "anyv2v-demo" / "A_kitten_turning_its_head_on_a_wooden_floor.mp4"
    require_data(kitten)
    dog = kitten.with_name(kitten.stem + "__A_dog_turning_its_head_on_a_wooden_floor.png")

    def prepare(*flags):
        code = main(["prepare", "--model", str(tiny_model), "--video", str(kitten), "--first-frame", str(dog),
                     "--out", str(tmp_path / "run"), "--size", "64x64", *flags])
        return code, (capsys.readouterr().err.strip().splitlines() or [""])[-1]

    lengths = {}
    for flags in (["--frames", "81"], ["--frames", "9", "--start", "99s"]):
        code, err = prepare(*flags)
        assert code == 2 and err.startswith("loraedit: error: "), err
        lengths[err] = re.findall(r"(\d+\.\d+) s\b", err)[0]
    assert set(lengths.values()) == {"2.00"}, lengths
    code, err = prepare("--frames", "9", "--start", "1.5s")
    assert code == 2 and "--frames 1 " not in err and "--frames 1)" not in err
    fix = re.search(r"use (--start \S+) or earlier", err)
    assert fix, err
    assert prepare("--frames", "9", *fix.group(1).split())[0] == 0


def test_a_refused_command_on_a_new_folder_leaves_nothing_behind(tiny_model, clip, tmp_path, capsys):
    new = tmp_path / "new" / "deeper" / "run"
    good = ["--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]), "--frames", "5"]
    refused = [
        edit_argv(tiny_model, clip, new, "--frames", "49"),  # a clip too short: found while preparing
        edit_argv(tiny_model, clip, new, "--video", str(tmp_path / "typo.mp4")),
        ["train", "--out", str(new), "--steps", "1"],  # nothing prepared there
        ["render", "--out", str(new)],
        ["masks", "--out", str(new), *good, "--mask", str(clip["first_frame"]), "--frames", "49"],
        ["batch", str(tmp_path / "missing.toml"), "--out", str(new)],
    ]
    for argv in refused:
        assert main(argv) == 2, argv
        assert "loraedit: error:" in capsys.readouterr().err
        assert not (tmp_path / "new").exists(), argv
    assert main(["train", "--out", str(new), "--steps", "1"]) == 2
    assert "is not a prepared run" in capsys.readouterr().err  # the problem, not a missing --model


def test_a_render_name_is_a_folder_inside_the_run_and_masks_out_a_folder(clip, tmp_path, capsys):
    run = tmp_path / "runs" / "run"
    for name in ("../elsewhere", "lora", ".hidden", "a/b"):
        assert main(["render", "--out", str(run), "--name", name]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--name '{name}': must be the name of a folder inside the run" in err[0], err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "file").write_text("x")
    assert main(["masks", "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]), "--frames", "5",
                 "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loraedit: error: --out {tmp_path / 'file'}: is an existing file, not a masks folder; pass a folder path"]
    assert main(["masks", "--video", str(clip["video"]), "--out", str(tmp_path / "m"), "--box", "10,10,5,5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("--box") == 1 and "needs x0 < x1" in err, err  # the flag named once


def test_batch_with_no_ray_cluster_at_the_address_is_one_line_at_once(tiny_model, clip, tmp_path, capsys):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "jobs.toml").write_text(f'model = "{tiny_model}"\n[[job]]\nname = "a"\nvideo = "{clip["video"]}"\n'
                                        f'first-frame = "{clip["first_frame"]}"\n')
    assert main(["batch", str(tmp_path / "jobs.toml"), "--out", str(tmp_path / "b"), "--ray", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--ray 127.0.0.1:{port}: no Ray cluster there" in err[0], err
    assert not (tmp_path / "b").exists()


def test_sigint_stops_a_run_started_with_it_ignored():
    """A shell starts a script's background jobs (`loraedit ui &`) with SIGINT ignored and every child inherits
    that; the UI's Stop button sends SIGINT, so the CLI must take it back, or Stop waits 60 s and kills."""
    code = ("import signal\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "from loraedit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "True", r.stdout + r.stderr


def test_every_output_folder_flag_that_cannot_be_written_is_one_line_before_any_work(clip, tmp_path, capsys):
    """demo, batch, ui and eval --table: a folder that cannot be made is refused at once, not after the
    clip was rendered, the jobs trained or the videos scored (tests run as root, so "cannot be made" is
    a path under a regular file)."""
    (tmp_path / "file").write_text("x")
    under_file = str(tmp_path / "file" / "sub")
    (tmp_path / "jobs.toml").write_text(f'[[job]]\nname = "a"\nvideo = "{clip["video"]}"\n'
                                        f'first_frame = "{clip["first_frame"]}"\n')
    cases = [
        (["demo", "--out", under_file], "--out", "demo folder"),
        (["batch", str(tmp_path / "jobs.toml"), "--out", under_file], "--out", "batch folder"),
        (["ui", "--runs", under_file], "--runs", "folder of the run folders"),
        (["eval", str(clip["video"]), "--table", under_file + "/t.md"], "--table", "table's folder"),
    ]
    for argv, flag, what in cases:
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith(f"loraedit: error: {flag} ") and f"cannot create the {what}" in err[0], err
    assert main(["eval", str(clip["video"]), "--table", str(tmp_path)]) == 2  # a folder, not a file name
    assert "is a folder; pass a file name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "jobs.toml"]  # nothing written


def test_an_input_edited_in_place_inside_the_run_folder_is_refused_not_overwritten(tiny_model, clip, tmp_path, capsys):
    """README: prepare/source/ shows the frames numbered. A person who edits one there and passes it as
    --first-frame or --ref would have it replaced by the plain source frame when prepare runs again."""
    import shutil

    run = tmp_path / "run"
    argv = ["prepare", "--model", str(tiny_model), "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]),
            "--out", str(run), "--frames", "9", "--size", "128x128"]
    assert main(argv) == 0
    inside = run / "prepare" / "source" / "000.png"
    shutil.copy(clip["first_frame"], inside)  # "edited in place"
    ref_inside = run / "prepare" / "source" / "004.png"
    before = {p: p.read_bytes() for p in (inside, ref_inside)}
    capsys.readouterr()
    for extra, flag in ((["--first-frame", str(inside)], f"--first-frame {inside}:"), (["--ref", f"4={ref_inside}"], f"--ref 4={ref_inside}:")):
        assert main(argv + extra) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and f"loraedit: error: {flag}" in err[0] and "inside the run's prepare/ folder" in err[0], err
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing rewritten
    shutil.copy(inside, tmp_path / "edited.png")  # the copy the message asks for is taken
    assert main(argv + ["--first-frame", str(tmp_path / "edited.png")]) == 0


def test_render_takes_sound_only_from_the_source_it_prepared(tiny_model, clip, tmp_path, caplog):
    """The result carries the source's sound; a render after the source file was replaced must not put
    another clip's sound under the old frames."""
    import av

    from loraedit.video import read_video_frames, write_video

    wav = tmp_path / "tone.wav"
    with av.open(str(wav), "w") as out:
        a = out.add_stream("pcm_s16le", rate=8000)
        a.layout = "mono"
        frame = av.AudioFrame.from_ndarray((np.sin(np.arange(24000) * 0.3) * 8000).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux([*a.encode(frame), *a.encode()])
    frames = read_video_frames(clip["video"], list(range(24)))
    video = tmp_path / "with_sound.mkv"
    write_video(video, frames, 16, audio_from=str(wav))
    run = tmp_path / "run"
    argv = edit_argv(tiny_model, dict(clip, video=video), run, "--steps", "1", "--render-steps", "1")
    assert main(argv) == 0

    def has_sound(path):
        with av.open(str(path)) as c:
            return bool(c.streams.audio)

    assert has_sound(run / "render" / "edited.mp4")
    write_video(video, frames[::-1], 16, audio_from=str(wav))  # another clip at the same path
    with caplog.at_level("WARNING"):
        assert main(["render", "--out", str(run), "--seed", "1", "-q"]) == 0
    assert not has_sound(run / "render-2" / "edited.mp4")
    assert any("is gone or has changed since it was prepared; the result gets no sound from it" in r.getMessage() for r in caplog.records)
    write_video(video, frames, 16, audio_from=str(wav))  # the source put back (the same bytes): not the silent render again
    assert main(["render", "--out", str(run), "--seed", "1", "-q"]) == 0
    assert has_sound(run / "render-3" / "edited.mp4")


def test_demo_refuses_a_negative_world_clip_number(capsys):
    assert main(["demo", "--seed", "-1"]) == 2  # was a ValueError traceback from numpy
    assert "--seed -1: the world clip's number must lie between 0 and" in capsys.readouterr().err


def test_a_job_file_is_checked_whole_and_its_paths_are_its_own(tiny_model, clip, tmp_path, capsys, monkeypatch):
    """A bad value in the file passed unchecked when a flag overrode it; a relative path was read from
    the working folder unless the file happened to exist beside the job file."""
    import shutil

    (tmp_path / "job.toml").write_text('steps = "ten"\n')
    argv = edit_argv(tiny_model, clip, tmp_path / "run") + ["--config", str(tmp_path / "job.toml")]
    assert main(argv) == 2  # --steps 4 is on the command line too
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "steps = 'ten': must be a whole number" in err[0], err
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "job.toml").write_text('first-frame = "edited.png"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(clip["first_frame"], elsewhere / "edited.png")  # the working folder has one; the job file's folder not
    monkeypatch.chdir(elsewhere)
    inv = resolve(["prepare", "--out", str(tmp_path / "r"), "--config", str(jobs / "job.toml")])
    from loraedit.settings import PrepareSettings

    assert inv.stages[PrepareSettings].first_frame == str(jobs / "edited.png")


def test_a_hub_id_that_is_not_downloaded_is_one_line_before_any_work(tiny_model, clip, tmp_path, capsys, monkeypatch):
    """A mistyped relative folder ("models/toy") looks like a hub id: the frames were prepared, then a
    network traceback; --caption auto offline retried for 2.5 minutes before its one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    argv = edit_argv(tiny_model, clip, tmp_path / "run")
    argv[argv.index("--model") + 1] = "models/toy"
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--model models/toy: no such folder here, and it is not in the Hugging Face cache" in err[0], err
    assert not (tmp_path / "run").exists()
    argv = edit_argv(tiny_model, clip, tmp_path / "run2", "--caption", "auto")
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--caption auto: the captioner florence-community/Florence-2-base: no such folder here" in err[0], err
    assert not (tmp_path / "run2").exists()  # before the frames were prepared
