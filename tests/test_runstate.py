"""A rerun on an existing run folder: every input and setting changed in turn, and what must follow.

For each change the stage that depends on it is redone (a new render beside the old ones), or the
command refuses in one line naming the change (a trained LoRA whose inputs changed), or — where
nothing a stage depends on changed — the stage is reused. Never a silent reuse of a stale stage.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from loraedit.cli import main
from loraedit.settings import RenderSettings, TrainSettings, text

from conftest import edit_argv

BASE = ("--steps", "2", "--render-steps", "1", "--checkpoint-every", "2")


def _argv(tiny_model, clip, out, *extra):
    return edit_argv(tiny_model, clip, out, *BASE, "--ref", f"8={clip['ref']}", "--ref-steps", "1", *extra)


@pytest.fixture(scope="module")
def base_run(tiny_model, clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(_argv(tiny_model, clip, out)) == 0
    return out


def _snapshot(run):
    return {
        "lora": (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes(),
        "renders": sorted(p.parent.name for p in run.glob("render*/settings.json")),
        "prepare": (run / "prepare" / "record.json").read_text(),
        "region": (run / "prepare" / "region" / "008.png").read_bytes(),
    }


def _changed_value(f: dataclasses.Field):
    """Another valid value for a setting (so every setting, also ones added later, is covered)."""
    default = f.default
    choices = getattr(f.metadata["parse"], "choices", None)
    if choices:
        return next(c for c in choices if c != default)
    if default is None and f.metadata["parse"] is text:
        return "blurry"
    if f.name == "memory":
        return "bf16"
    if f.name == "lora_targets":
        return r".*blocks\.\d+\.attn1\.to_q"
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default * 2
    if isinstance(default, str):
        return default + " and more"
    raise AssertionError(f"no changed value for {f.name}: add one here")


def _flag(f, value):
    name = "--" + f.name.replace("_", "-")
    if isinstance(value, bool):
        return [name if value else "--no-" + f.name.replace("_", "-")]
    return [name, str(value)]


def _for_this_model(f) -> bool:
    """Settings of two-expert models only (refused for the one-transformer tiny model used here)."""
    return not f.metadata["help"].startswith("Wan2.2-I2V-A14B:")


TRAINING = [f for f in dataclasses.fields(TrainSettings) if f.metadata["affects_result"] and f.name != "model" and _for_this_model(f)]
RENDERING = [f for f in dataclasses.fields(RenderSettings)
             if f.metadata["affects_result"] and f.name not in ("model", "first_frame", "seed") and _for_this_model(f)]


@pytest.mark.parametrize("f", TRAINING, ids=[f.name for f in TRAINING])
def test_a_changed_training_setting_on_a_trained_run_is_refused(f, base_run, tiny_model, clip, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = _snapshot(run)
    value = _changed_value(f)
    if f.name == "steps":
        value = 3
    assert main(_argv(tiny_model, clip, run, *_flag(f, value))) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("loraedit:")]
    assert len(err) == 1 and f"--{f.name.replace('_', '-')}" in err[0] and "--restart" in err[0], err
    assert _snapshot(run) == before  # nothing touched


def _write_other_mask(clip, tmp_path):
    from loraedit.video import write_png

    m = np.zeros((64, 96), np.uint8)
    m[10:50, 30:80] = 255
    write_png(tmp_path / "static_mask.png", m)
    return tmp_path / "static_mask.png"


def _recoloured(path, tmp_path, name, colour):
    from loraedit.video import read_image, write_png

    img = read_image(path).copy()
    img[20:40, 10:26] = colour
    write_png(tmp_path / name, img)
    return tmp_path / name


@pytest.mark.parametrize("case", ["mask file", "mask style", "grow", "reference contents", "first frame contents", "prompt",
                                  "edit prompt", "frames", "size", "start"])
def test_a_changed_training_input_is_refused_and_restart_retrains(case, base_run, tiny_model, clip, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = _snapshot(run)
    argv = _argv(tiny_model, clip, run)
    expect = {"mask file": "edit region", "mask style": "--mask-style", "grow": "--grow", "reference contents": "reference",
              "first frame contents": "first frame", "prompt": "--prompt", "edit prompt": "captions", "frames": "--frames", "size": "--size",
              "start": "--start"}[case]
    if case == "mask file":
        argv[argv.index("--mask") + 1] = str(_write_other_mask(clip, tmp_path))
    elif case == "mask style":
        argv += ["--mask-style", "static"]
    elif case == "grow":
        argv += ["--grow", "0.5"]
    elif case == "reference contents":
        # the same path, other contents
        new_ref = _recoloured(clip["ref"], tmp_path, "ref.png", (200, 200, 40))
        argv[argv.index("--ref") + 1] = f"8={new_ref}"
        shutil.copy(new_ref, tmp_path / "ref-same-path.png")
    elif case == "first frame contents":
        argv[argv.index("--first-frame") + 1] = str(_recoloured(clip["first_frame"], tmp_path, "e.png", (40, 220, 40)))
    elif case == "prompt":
        argv += ["--prompt", "a green square"]
    elif case == "edit prompt":  # stage 2 trains the references with it
        argv += ["--edit-prompt", "a green square"]
    elif case == "frames":
        argv[argv.index("--frames") + 1] = "13"
    elif case == "size":
        argv[argv.index("--size") + 1] = "64x48"
    elif case == "start":
        argv += ["--start", "1"]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("loraedit:")]
    assert len(err) == 1 and expect in err[0] and "--restart" in err[0], err
    assert case != "prompt" or "--prompt '' → 'a green square'" in err[0], err  # as typed: an empty one shows
    assert _snapshot(run) == before  # refused before anything was overwritten
    if case in ("mask file", "prompt"):  # --restart discards the LoRA and trains on the new inputs
        assert main(argv + ["--restart"]) == 0
        after = _snapshot(run)
        assert after["lora"] != before["lora"]
        assert set(before["renders"]) < set(after["renders"])  # the old render stays, with its own record
        m = json.loads((run / "manifest.json").read_text())
        assert m["discarded"][0]["stage"] == "train"
        # the discarded LoRA's encoding is pruned: only the one the new training and its render use is left
        key = json.loads((run / "train" / "record.json").read_text())["encoding"]
        assert json.loads((run / after["renders"][-1] / "settings.json").read_text())["encoding"] == key
        assert sorted(p.name for p in (run / "cache").glob("encoded-*")) == [f"encoded-{key}.safetensors"]


def test_a_new_first_frame_without_references_renders_again_with_the_same_lora(tiny_model, clip, tmp_path):
    run = tmp_path / "run"
    argv = edit_argv(tiny_model, clip, run, *BASE)
    assert main(argv) == 0
    before = _snapshot(run)
    argv[argv.index("--first-frame") + 1] = str(_recoloured(clip["first_frame"], tmp_path, "green.png", (40, 220, 40)))
    assert main(argv) == 0
    after = _snapshot(run)
    assert after["lora"] == before["lora"] and after["region"] == before["region"]  # the given mask: same region
    assert after["renders"] == ["render", "render-2"]
    a = json.loads((run / "render" / "settings.json").read_text())
    b = json.loads((run / "render-2" / "settings.json").read_text())
    assert a["first_frame"] != b["first_frame"] and a["lora"] == b["lora"]
    # without references --edit-prompt is a render input: the same LoRA renders the new text
    assert main(argv + ["--edit-prompt", "a green square"]) == 0
    c = json.loads((run / "render-3" / "settings.json").read_text())
    assert c["lora"] == a["lora"] and "a green square" in c["prompt"] and "a green square" not in b["prompt"]


@pytest.mark.parametrize("f", RENDERING, ids=[f.name for f in RENDERING])
def test_a_changed_render_setting_renders_again_beside_the_old_render(f, base_run, tiny_model, clip, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = _snapshot(run)
    assert main(_argv(tiny_model, clip, run, *_flag(f, _changed_value(f)))) == 0
    after = _snapshot(run)
    assert after["lora"] == before["lora"] and after["renders"] == before["renders"] + ["render-2"]
    assert (run / "render" / "settings.json").is_file()


@pytest.mark.parametrize("flags", [["--dilate", "3"], ["--checkpoint-every", "1"], ["--gradient-checkpointing", "on"]])
def test_a_setting_that_changes_nothing_made_reuses_everything(flags, base_run, tiny_model, clip, tmp_path, caplog):
    """--dilate does nothing with the bbox style; the others change how training runs, not the LoRA."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = _snapshot(run)
    assert main(_argv(tiny_model, clip, run, *flags)) == 0
    after = _snapshot(run)
    assert after["lora"] == before["lora"] and after["renders"] == before["renders"] and after["region"] == before["region"]
    assert "already rendered" in caplog.text


def test_render_with_another_model_is_refused(base_run, tiny_model, tmp_path, capsys):
    import json as _json

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    cfg = other / "transformer" / "config.json"
    cfg.write_text(_json.dumps(dict(_json.loads(cfg.read_text()), num_layers=1)))
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    assert main(["render", "--out", str(run), "--model", str(other), "--seed", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on another model" in err[0]


def test_manifest_keeps_what_each_stage_and_render_was_made_with(base_run, tiny_model, clip, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    other = _recoloured(clip["first_frame"], tmp_path, "other.png", (40, 220, 40))
    assert main(["render", "--out", str(run), "--seed", "3", "-q"]) == 0
    assert main(["render", "--out", str(run), "--first-frame", str(other), "-q"]) == 0
    m = json.loads((run / "manifest.json").read_text())
    train = m["stages"]["train"]
    assert train["settings"]["steps"] == 2 and train["settings"]["lr"] == 1e-4 and train["settings"]["ref_steps"] == 1
    assert m["stages"]["prepare"]["settings"]["mask_style"] == "bbox"
    r1, r2, r3 = m["stages"]["render"], m["stages"]["render-2"], m["stages"]["render-3"]
    # a render's seed is its own: the next render starts from the run's (edit's) settings, not from it
    assert (r1["settings"]["seed"], r2["settings"]["seed"], r3["settings"]["seed"]) == (0, 3, 0)
    assert r3["settings"]["first_frame"] == str(other) and r1["settings"]["first_frame"] is None
    assert r1["inputs"]["first_frame"] == r2["inputs"]["first_frame"] != r3["inputs"]["first_frame"]
    assert r1["inputs"]["lora"] == r2["inputs"]["lora"] == r3["inputs"]["lora"] == train["lora_sha256"]["diffusers"]
    # each render folder's own record agrees with the manifest
    for name in ("render", "render-2", "render-3"):
        rec = json.loads((run / name / "settings.json").read_text())
        assert rec["lora"] == m["stages"][name]["inputs"]["lora"] and rec["seed"] == m["stages"][name]["settings"]["seed"]


def _killed_at_step(n: int, argv: list[str], monkeypatch) -> int:
    """`main(argv)` with the process "killed" (Ctrl-C) during training step n; the exit code."""
    from loraedit import train

    real_step = train.training_step
    calls = {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train, "training_step", dying_step)
    try:
        return main(argv)
    finally:
        monkeypatch.setattr(train, "training_step", real_step)


def test_a_resume_with_a_changed_training_setting_is_refused(tiny_model, clip, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = edit_argv(tiny_model, clip, run, "--steps", "4", "--checkpoint-every", "2", "--render-steps", "1")
    assert _killed_at_step(3, argv, monkeypatch) == 130
    assert main(argv + ["--lr", "5e-4"]) == 2
    err = capsys.readouterr().err
    assert "partly trained" in err and "--lr 0.0001 → 0.0005" in err
    assert (run / "train" / "checkpoints" / "step-000002").is_dir()  # kept
    assert main(["train", "--out", str(run), "--rank", "8", "-q"]) == 2  # the train command checks too
    assert "--rank 16 → 8" in capsys.readouterr().err
    assert main(argv) == 0
    assert '"resumed_from": 2' in (run / "train" / "done.json").read_text()


def test_prepare_alone_refuses_to_replace_what_a_trained_lora_was_made_from(base_run, tiny_model, clip, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = _snapshot(run)
    argv = ["prepare", "--out", str(run), "--model", str(tiny_model), "--video", str(clip["video"]),
            "--first-frame", str(clip["first_frame"]), "--mask", str(_write_other_mask(clip, tmp_path)),
            "--frames", "17", "--size", "96x64", "--ref", f"8={clip['ref']}"]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("loraedit:")]
    assert len(err) == 1 and "the edit region" in err[0] and "--restart" in err[0], err
    assert _snapshot(run) == before and not (run / ".prepare-new").exists()
    argv[argv.index("--mask") + 1] = str(clip["mask"])  # the same inputs: reused, nothing rewritten
    assert main(argv) == 0
    assert _snapshot(run) == before
    argv[argv.index("--mask") + 1] = str(_write_other_mask(clip, tmp_path))
    assert main(argv + ["--restart"]) == 0  # explicit: the LoRA goes, the renders stay
    assert not (run / "lora").exists() and not (run / "train").exists() and _snapshot_renders(run) == before["renders"]


def _snapshot_renders(run):
    return sorted(p.parent.name for p in run.glob("render*/settings.json"))


def test_a_record_from_before_a_setting_existed_counts_as_its_default(base_run, tiny_model, clip, tmp_path, capsys):
    """A run trained by an older loraedit (its record lacks --colour-copies, --ref-sample) is reused by the same
    command, as it trained with what those settings' defaults do; another value is still refused."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    record_file = run / "train" / "record.json"
    record = json.loads(record_file.read_text())
    for name in ("colour_copies", "ref_sample"):
        del record["settings"][name]
    record_file.write_text(json.dumps(record))
    before = _snapshot(run)
    assert main(_argv(tiny_model, clip, run)) == 0
    assert _snapshot(run)["lora"] == before["lora"]
    capsys.readouterr()
    assert main(_argv(tiny_model, clip, run, "--colour-copies", "1")) == 2
    assert "--colour-copies 0 → 1" in capsys.readouterr().err


def test_weights_replaced_in_place_at_the_same_size_are_noticed(base_run, tiny_model, clip, tmp_path, capsys, caplog):
    """Another checkpoint of the same architecture saved over the model's files (same names, same
    sizes): the LoRA and render were reused. VAE and encoder files did not count at all."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    lora = (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    with caplog.at_level("INFO"):
        assert main(_argv(model, clip, run)) == 0  # a copy of the model it was trained on is the same model
    assert "training already finished" in caplog.text  # the LoRA is reused (the encodings name the model's path: a new render)
    capsys.readouterr()
    for part in ("vae", "transformer"):
        w = next((model / part).glob("*.safetensors"))
        data = bytearray(w.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # other weights, same header, same size
        w.write_bytes(bytes(data))
        assert main(_argv(model, clip, run)) == 2, part
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and "the model (its configs or weights)" in err[0], err
        assert main(["render", "--out", str(run), "--seed", "3", "-q"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and "its weights or configs have changed since the run's LoRA was trained" in err[0], err
    assert (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == lora  # nothing replaced
    # --restart trains on encodings made with the new VAE, not the cache of the old one (same path, same key)
    with caplog.at_level("INFO"):
        assert main(_argv(model, clip, run, "--restart")) == 0
    assert "encoded with other weights" in caplog.text


def test_a_run_recorded_before_weights_were_fingerprinted_is_not_called_stale(base_run, tiny_model, clip, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    for rec in [run / "train" / "record.json", *run.glob("render*/settings.json")]:
        data = json.loads(rec.read_text())
        model = data["inputs"]["model"] if "inputs" in data else data["model"]
        model.pop("weights")  # as written before this change
        rec.write_text(json.dumps(data))
    before = _snapshot(run)
    assert main(_argv(tiny_model, clip, run)) == 0
    assert _snapshot(run) == before and "already rendered" in caplog.text


def test_after_an_interrupted_edit_render_refuses_and_train_alone_finishes_it(tiny_model, clip, tmp_path, monkeypatch, capsys):
    """render on a half-trained run wrote the base model's video into render/ (the result's place), and
    `train --out RUN` fell back to default settings (job.json got the edit's only after training)."""
    run = tmp_path / "run"
    argv = edit_argv(tiny_model, clip, run, "--steps", "6", "--checkpoint-every", "2", "--render-steps", "1")
    assert _killed_at_step(4, argv, monkeypatch) == 130
    capsys.readouterr()
    assert main(["render", "--out", str(run), "-q"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "its training was interrupted and is not finished" in err[0], err
    assert not list(run.glob("render*"))
    assert main(["train", "--out", str(run), "-q"]) == 0  # the edit's settings (6 steps), resumed
    assert '"resumed_from": 2' in (run / "train" / "done.json").read_text()
    assert main(["render", "--out", str(run), "-q"]) == 0 and (run / "render" / "edited.mp4").is_file()
    fresh = edit_argv(tiny_model, clip, tmp_path / "fresh")
    assert main(["prepare", *fresh[1:fresh.index("--steps")]]) == 0
    assert main(["render", "--out", str(tmp_path / "fresh"), "-q"]) == 2
    assert "is not trained yet" in capsys.readouterr().err


def test_the_same_frames_at_another_frame_rate_are_rendered_again_not_reused(tiny_model, clip, tmp_path):
    """The frames, region and LoRA are the same, but edited.mp4 plays at the source's rate: it was reused at the old one."""
    import av

    from loraedit.video import read_video_frames, write_video

    frames = read_video_frames(clip["video"], list(range(24)))
    video = tmp_path / "clip.mkv"
    write_video(video, frames, 12, lossless=True)
    run = tmp_path / "run"
    argv = edit_argv(tiny_model, dict(clip, video=video), run, "--steps", "1", "--render-steps", "1")
    assert main(argv) == 0
    lora = (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    write_video(video, frames, 8, lossless=True)  # the same pictures, slower
    assert main(argv) == 0
    assert (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == lora
    rates = []
    for name in ("render", "render-2"):
        with av.open(str(run / name / "edited.mp4")) as c:
            rates.append(float(c.streams.video[0].average_rate))
    assert rates == [12.0, 8.0]


def test_change_descriptions_read_as_typed():
    """'--mask None → …' and '--ref {} → {'4': …}' were shown raw."""
    from loraedit.runstate import describe_changes

    text = describe_changes({"settings": {"mask": None, "ref": {}, "steps": 4}},
                            {"settings": {"mask": "/data/clips/a-rather-long-folder-name/walk_mask.mkv", "ref": {"4": "/x/r4.png"},
                                          "steps": 6}})
    assert text == "--mask (none) → walk_mask.mkv, --ref (none) → 4=r4.png, --steps 4 → 6", text
    # another file for the same reference, and references added to a run trained without: said once each
    text = describe_changes({"settings": {"ref": {"8": "/a/x.png"}}, "inputs": {"refs": {"8": "h1"}}},
                            {"settings": {"ref": {"8": "/b/y.png"}}, "inputs": {"refs": {"8": "h2"}}})
    assert text == "--ref 8=x.png → 8=y.png", text
    text = describe_changes({"settings": {"ref": {}}, "inputs": {"refs": {}}},
                            {"settings": {"ref": {"4": "/a/r.png"}}, "inputs": {"refs": {"4": "h"}, "first_frame": "f"}})
    assert text == "--ref (none) → 4=r.png", text
