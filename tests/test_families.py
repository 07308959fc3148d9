"""The Wan2.2 layouts and Wan2.1-720P: what a folder is, and the method against diffusers' own
pipeline on tiny two-expert (A14B) and TI2V-5B folders."""

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from loraedit import family, method
from loraedit.errors import InputError


@pytest.fixture(scope="session")
def tiny_layouts(tmp_path_factory):
    from loraedit.tiny import save_tiny_layout

    parent = tmp_path_factory.mktemp("layouts")
    return {layout: save_tiny_layout(parent, layout) for layout in ("a14b", "ti2v", "t2v", "wan2.1-720p")}


def test_each_folder_is_recognised_with_its_factors_from_its_configs(tiny_layouts, tiny_model):
    a14b = family.detect(tiny_layouts["a14b"])
    assert a14b.name == family.A14B and a14b.experts == ("transformer", "transformer_2")
    assert a14b.boundary_timestep == 900 and not a14b.has_clip and a14b.latent_channels == 16 and a14b.spatial == 8
    assert a14b.sigma_range("transformer") == (0.9, 1.0) and a14b.sigma_range("transformer_2") == (0.0, 0.9)
    ti2v = family.detect(tiny_layouts["ti2v"])
    assert ti2v.name == family.TI2V and ti2v.expand_timesteps and ti2v.experts == ("transformer",)
    assert (ti2v.latent_channels, ti2v.spatial, ti2v.temporal, ti2v.size_multiple) == (48, 16, 4, 32)
    assert family.auto_size(ti2v, 1920, 1080) == (1280, 704) and family.auto_size(ti2v, 1080, 1920) == (704, 1280)
    w, h = family.auto_size(ti2v, 640, 480)  # another aspect keeps its shape, in whole 32-pixel tokens
    assert w % 32 == 0 and h % 32 == 0 and abs(w / h - 4 / 3) < 0.05 and abs(w * h / (1280 * 704) - 1) < 0.05
    p720 = family.detect(tiny_layouts["wan2.1-720p"])
    assert p720.name == family.WAN21 and p720.has_clip and family.auto_size(p720, 1920, 1080) == (1280, 720)
    assert family.auto_size(p720, 720, 1280) == (720, 1280) and ti2v.fps == 24 and p720.fps == 16
    p480 = family.detect(tiny_model)
    assert p480.default_size == (832, 480) and p480.size_multiple == 16


def test_a_text_to_video_folder_is_refused_in_one_line(tiny_layouts):
    with pytest.raises(InputError) as e:
        family.detect(tiny_layouts["t2v"])
    assert "text-to-video" in str(e.value) and "\n" not in str(e.value)


def test_token_keep_mask_generates_every_token_the_region_touches_in_any_frame():
    edit = torch.zeros(9, 64, 96, dtype=torch.bool)
    edit[3, 40, 70] = True  # one pixel in frame 3 (latent frame 1), token (1, 2) with 16x VAE and 2x2 patch
    keep = method.token_keep_mask(edit, spatial=16, temporal=4, patch=(1, 2, 2))
    assert keep.shape == (3, 4, 6)
    assert keep[0].all() and keep[2].all()  # frame 0 and latent frame 2 (pixel frames 5..8) untouched
    assert keep[1, 2:4, 4:6].eq(0).all() and keep[1].sum() == 24 - 4  # the whole 2x2-latent token


def test_ti2v_per_token_timesteps_follow_the_transformer_token_order():
    keep = torch.ones(1, 1, 2, 4, 6)
    keep[:, :, 1, 2:4, 0:2] = 0
    ts = method.ti2v_timesteps(keep, torch.tensor([500.0]), (1, 2, 2))
    assert ts.shape == (1, 2 * 2 * 3)
    assert ts[0].tolist() == [0.0] * 6 + [0, 0, 0, 500, 0, 0]


def _image(H, W, seed=1):
    rgb = (np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8)
    return rgb, Image.fromarray(rgb)


def test_a14b_sampler_switches_experts_exactly_as_the_diffusers_pipeline(tiny_layouts):
    from loraedit.encode import encode_video, to_video_tensor
    from loraedit.models import load_scheduler

    model = tiny_layouts["a14b"]
    pipe = WanImageToVideoPipeline.from_pretrained(model)
    pipe.scheduler = load_scheduler(str(model), shift=5.0)
    F, H, W, steps = 9, 32, 48, 6
    rgb, image = _image(H, W)
    prompt = "a red car on the street"
    kwargs = dict(image=image, prompt=prompt, negative_prompt=method.WAN_NEGATIVE_PROMPT, height=H, width=W, num_frames=F,
                  num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="latent")
    theirs = pipe(guidance_scale_2=2.0, **kwargs).frames

    with torch.no_grad():
        text, negative = pipe.encode_prompt(prompt, method.WAN_NEGATIVE_PROMPT, max_sequence_length=512, device=torch.device("cpu"))
        video, keep = method.stock_plan(to_video_tensor(rgb[None])[0], F)
        cond = method.condition_tensor(encode_video(pipe.vae, video), keep)
    noise = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(7))
    asked = []

    def expert(name):
        asked.append(name)
        return getattr(pipe, name)

    boundary = pipe.config.boundary_ratio * 1000

    def ours(guidance_2):
        asked.clear()
        return method.sample_latents(expert, load_scheduler(str(model), shift=5.0), noise, cond, text, negative, None, steps,
                                     5.0, boundary=boundary, guidance_2=guidance_2)

    torch.testing.assert_close(ours(2.0), theirs, atol=1e-5, rtol=1e-4)
    assert asked == ["transformer", "transformer_2"]  # each expert asked for once, high noise first
    # the low-noise expert and its own guidance scale both matter, so the comparison is not vacuous
    assert (ours(None) - theirs).abs().max() > 1e-3
    only_high = method.sample_latents(pipe.transformer, load_scheduler(str(model), shift=5.0), noise, cond, text, negative, None,
                                      steps, 5.0)
    assert (only_high - theirs).abs().max() > 1e-3


def test_ti2v_stock_first_frame_condition_reproduces_the_diffusers_pipeline(tiny_layouts):
    from loraedit.encode import encode_video, to_video_tensor
    from loraedit.models import load_scheduler

    model = tiny_layouts["ti2v"]
    pipe = WanImageToVideoPipeline.from_pretrained(model)  # a WanPipeline folder, loaded as I2V
    assert pipe.config.expand_timesteps and pipe.image_encoder is None
    pipe.scheduler = load_scheduler(str(model), shift=5.0)
    fam = family.detect(model)
    F, H, W, steps = 9, 64, 96, 4
    rgb, image = _image(H, W)
    prompt = "a red car on the street"
    theirs = pipe(image=image, prompt=prompt, negative_prompt=method.WAN_NEGATIVE_PROMPT, height=H, width=W, num_frames=F,
                  num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="latent").frames

    with torch.no_grad():
        text, negative = pipe.encode_prompt(prompt, method.WAN_NEGATIVE_PROMPT, max_sequence_length=512, device=torch.device("cpu"))
        y = encode_video(pipe.vae, to_video_tensor(rgb[None]))  # (1, 48, 1, 4, 6): the first frame alone
    T, h, w = fam.latent_frames(F), H // fam.spatial, W // fam.spatial
    keep = method.ti2v_stock_keep(F, h, w, fam.temporal)
    cond = method.ti2v_condition(torch.cat([y, torch.zeros(1, 48, T - 1, h, w)], dim=2), keep)
    noise = torch.randn(1, 48, T, h, w, generator=torch.Generator().manual_seed(7))
    ours = method.sample_latents(pipe.transformer, load_scheduler(str(model), shift=5.0), noise, cond, text, negative, None, steps, 5.0)
    assert ours.shape == theirs.shape == (1, 48, 3, 4, 6)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:, :, :1], y)  # the kept first frame is the condition's
    unguided = method.sample_latents(pipe.transformer, load_scheduler(str(model), shift=5.0), noise, cond, text, negative, None, steps, 1.0)
    assert (unguided - theirs).abs().max() > 1e-3


# ---------------------------------------------------------------- end to end, as a person runs it


def _edit(model, clip, out, *extra):
    from loraedit.cli import main

    from conftest import edit_argv

    return main(edit_argv(model, clip, out, *extra))


def _live_models_tracker(monkeypatch):
    """Wrap load_transformer in train and render: every load asserts no other transformer is alive."""
    import gc
    import weakref

    from loraedit import render, train

    live, loads = [], []
    for module in (train, render):
        original = module.load_transformer

        def load(*args, _original=original, **kwargs):
            gc.collect()
            alive = [r for r in live if r() is not None]
            assert not alive, f"loading {kwargs.get('subfolder')} while another transformer is in memory"
            model = _original(*args, **kwargs)
            live.append(weakref.ref(model))
            loads.append(kwargs.get("subfolder", "transformer"))
            return model

        monkeypatch.setattr(module, "load_transformer", load)
    return loads


def test_a14b_edit_trains_one_lora_per_expert_on_its_own_noise_levels_one_expert_in_memory(tiny_layouts, clip, tmp_path, monkeypatch):
    from loraedit import train

    sigmas = []
    original_step = train.training_step

    def record(transformer, optimizer, x0, condition, text, image, sigma, noise, grad_clip):
        sigmas.append(float(sigma))
        return original_step(transformer, optimizer, x0, condition, text, image, sigma, noise, grad_clip)

    monkeypatch.setattr(train, "training_step", record)
    loads = _live_models_tracker(monkeypatch)
    out = tmp_path / "run"
    assert _edit(tiny_layouts["a14b"], clip, out, "--ref", f"8={clip['ref']}", "--ref-steps", "2", "--lr", "5e-3", "--render-steps", "6",
                 "--frames", "9") == 0
    assert loads == ["transformer", "transformer_2", "transformer", "transformer_2"]  # train high, low; render high, low
    assert len(sigmas) == 12 and min(sigmas[:6]) >= 0.9 and max(sigmas[6:]) < 0.9
    for rel in ("lora/high_noise/pytorch_lora_weights.safetensors", "lora/low_noise/pytorch_lora_weights.safetensors",
                "lora/high_noise/wan_lora_high_noise.safetensors", "lora/low_noise/wan_lora_low_noise.safetensors",
                "train/high_noise/losses.csv", "train/low_noise/losses.png", "render/edited.mp4"):
        assert (out / rel).is_file(), rel

    # both LoRAs load into diffusers' pipeline, each into its own expert, the same in both formats
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_layouts["a14b"])
    _, image = _image(32, 48, seed=0)

    def run():
        return pipe(image=image, prompt="a blue square", height=32, width=48, num_frames=5, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    base = run()
    pipe.load_lora_weights(out / "lora" / "high_noise", adapter_name="high")
    high_only = run()
    pipe.load_lora_weights(out / "lora" / "low_noise", adapter_name="low", load_into_transformer_2=True)
    both = run()
    assert (high_only - base).abs().max() > 1e-4 and (both - high_only).abs().max() > 1e-4
    pipe.unload_lora_weights()
    torch.testing.assert_close(run(), base)
    pipe.load_lora_weights(out / "lora" / "high_noise", weight_name="wan_lora_high_noise.safetensors", adapter_name="wh")
    pipe.load_lora_weights(out / "lora" / "low_noise", weight_name="wan_lora_low_noise.safetensors", adapter_name="wl",
                           load_into_transformer_2=True)
    torch.testing.assert_close(run(), both, atol=1e-5, rtol=1e-4)


def test_a14b_low_noise_expert_only_and_its_own_guidance(tiny_layouts, clip, tmp_path, monkeypatch, caplog):
    from loraedit import method as method_module
    from loraedit.cli import main

    seen = {}
    original = method_module.sample_latents

    def record(*args, **kwargs):
        seen.update(boundary=kwargs.get("boundary"), guidance_2=kwargs.get("guidance_2"))
        return original(*args, **kwargs)

    monkeypatch.setattr(method_module, "sample_latents", record)
    out = tmp_path / "run"
    # in fp8 storage, as on a 24-40 GB card
    assert _edit(tiny_layouts["a14b"], clip, out, "--experts", "low", "--guidance-2", "3", "--frames", "5", "--memory", "fp8") == 0
    assert (out / "lora" / "low_noise" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "lora" / "high_noise").exists()
    assert "high-noise expert renders with its base weights" in caplog.text
    assert seen == {"boundary": 900.0, "guidance_2": 3.0}
    # another expert choice for the trained run is refused in one line, never mixed silently
    assert main(["train", "--out", str(out), "--experts", "both", "--device", "cpu", "-q"]) == 2
    assert not (out / "lora" / "high_noise").exists()


def test_a14b_killed_in_the_low_noise_expert_resumes_to_the_same_loras(tiny_layouts, clip, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from loraedit import train
    from loraedit.cli import main

    from conftest import edit_argv

    def argv(out):
        return edit_argv(tiny_layouts["a14b"], clip, out, "--frames", "5", "--steps", "4", "--checkpoint-every", "2",
                         "--render-steps", "1")

    assert main(argv(tmp_path / "whole")) == 0
    real_step, calls = train.training_step, {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # the low-noise expert's step 3, after its checkpoint at step 2
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train, "training_step", dying_step)
    assert main(argv(tmp_path / "killed")) == 130
    monkeypatch.setattr(train, "training_step", real_step)
    assert main(argv(tmp_path / "killed")) == 0
    assert '"resumed_from": 2' in (tmp_path / "killed" / "train" / "low_noise" / "done.json").read_text()
    for expert in ("high_noise", "low_noise"):
        a = load_file(str(tmp_path / "whole" / "lora" / expert / "pytorch_lora_weights.safetensors"))
        b = load_file(str(tmp_path / "killed" / "lora" / expert / "pytorch_lora_weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), expert


@pytest.mark.parametrize("flag", [["--experts", "low"], ["--guidance-2", "3"], ["--high-noise-steps", "10"]])
def test_two_expert_settings_on_a_one_transformer_model_get_one_line(flag, tiny_model, clip, tmp_path, capsys):
    from loraedit.cli import main

    from conftest import edit_argv

    assert main(edit_argv(tiny_model, clip, tmp_path / "run", *flag)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and flag[0] in lines[0] and "two-expert" in lines[0], lines


def test_ti2v_edit_end_to_end_keeps_the_tokens_outside_the_region(tiny_layouts, clip, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert _edit(tiny_layouts["ti2v"], clip, out, "--ref", f"8={clip['ref']}", "--ref-steps", "2", "--memory", "bf16",
                 "--colour-copies", "1", "--ref-sample", "pair") == 0
    assert (out / "render" / "edited.mp4").is_file() and (out / "lora" / "wan_lora.safetensors").is_file()
    (cache_file,) = (out / "cache").glob("encoded-*.safetensors")  # named by its inputs
    cache = load_file(str(cache_file))
    x0, cond = cache["x0"], cache["cond_train"]
    assert x0.shape == (1, 48, 5, 4, 6) and cond.shape == (1, 49, 5, 4, 6) and "image_render" not in cache
    keep = cond[0, 0]
    assert keep[0].all() and 0 < keep[1:].mean() < 1  # frame 0 whole; the square's tokens generated after it
    torch.testing.assert_close(cond[:, 1:], x0)  # kept tokens take the source's own latents
    render = cache["cond_render"]
    torch.testing.assert_close(render[:, 1:, 1:], x0[:, :, 1:])
    assert (render[:, 1:, :1] - x0[:, :, :1]).abs().max() > 1e-3  # frame 0: the edited first frame
    assert cache["ref.8.cond"].shape == (1, 49, 1, 4, 6) and cache["ref.8.cond"][0, 0].mean() < 1
    # the colour copy: its own latents, kept where the source's are, no CLIP image (TI2V has no image encoder)
    copy, copy_cond = cache["hue.1of2.x0"], cache["hue.1of2.cond"]
    assert copy.shape == x0.shape and (copy - x0).abs().max() > 1e-2 and "hue.1of2.image" not in cache
    assert torch.equal(copy_cond[:, :1], cond[:, :1]) and torch.equal(copy_cond[:, 1:], copy)
    assert ",1,hue1," in (out / "train" / "losses.csv").read_text()


def test_ti2v_sampler_returns_the_condition_on_kept_tokens_and_the_loss_ignores_them(tiny_layouts):
    from diffusers import WanTransformer3DModel

    from loraedit.models import load_scheduler

    model = tiny_layouts["ti2v"]
    transformer = WanTransformer3DModel.from_pretrained(model, subfolder="transformer").eval()
    keep = torch.ones(3, 4, 6)
    keep[1:, 2:4, 2:4] = 0
    g = torch.Generator().manual_seed(0)
    y, noise, x0 = (torch.randn(1, 48, 3, 4, 6, generator=g) for _ in range(3))
    text = torch.randn(1, 512, 32, generator=g)
    cond = method.ti2v_condition(y, keep)
    out = method.sample_latents(transformer, load_scheduler(str(model), shift=5.0), noise, cond, text, text, None, 3, 1.0)
    kept = keep.bool()[None, None].expand_as(out)
    assert torch.equal(out[kept], y[kept]) and (out[~kept] - y[~kept]).abs().min() > 0
    # the loss is the MSE over generated tokens: changing x0 on kept tokens does not change it
    sigma = torch.tensor([0.5])
    loss = method.velocity_loss(transformer, x0, cond, text, None, sigma, noise)
    x0_changed = torch.where(kept, x0 + 3.0, x0)
    assert torch.equal(method.velocity_loss(transformer, x0_changed, cond, text, None, sigma, noise), loss)
    with torch.no_grad():
        pred = method.predict_velocity(transformer, method.noisy_latents(x0, noise, sigma)[0], cond, sigma, text)
    expected = ((pred - (noise - x0)) ** 2)[~kept].mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_720p_folder_defaults_to_1280x720_and_edits_end_to_end(tiny_layouts, clip, tmp_path):
    from loraedit.cli import main
    from loraedit.files import read_json

    from conftest import make_clip

    model = tiny_layouts["wan2.1-720p"]
    wide = make_clip(tmp_path, frames=9, height=72, width=128)  # 16:9 footage
    base = ["--model", str(model), "--video", str(wide["video"]), "--first-frame", str(wide["first_frame"]), "--mask",
            str(wide["mask"]), "--frames", "1", "-q"]
    assert main(["prepare", "--out", str(tmp_path / "default"), *base]) == 0
    plan = read_json(tmp_path / "default" / "prepare" / "plan.json")
    assert (plan["width"], plan["height"]) == (1280, 720)
    # the whole edit on the same folder (at a small size: the tiny VAE takes ~9 s a frame at 1280x720 on a CPU)
    assert _edit(model, clip, tmp_path / "run", "--frames", "5") == 0
    assert (tmp_path / "run" / "render" / "edited.mp4").is_file()


@pytest.mark.parametrize("layout,expect", [
    ("t2v", "is a Wan text-to-video model (WanPipeline)"),
    ("bad channels", "input channels"),
    ("ti2v size", "multiples of 32"),
])
def test_a_folder_that_is_none_of_these_gets_one_line(layout, expect, tiny_layouts, tiny_model, clip, tmp_path, capsys):
    import json
    import shutil

    from loraedit.cli import main

    model, size = tiny_layouts.get(layout), "96x64"
    if layout == "bad channels":  # a Wan I2V index over a transformer that takes neither layout's input
        model = tmp_path / "odd"
        shutil.copytree(tiny_model, model)
        cfg = model / "transformer" / "config.json"
        cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), in_channels=40)))
    if layout == "ti2v size":
        model, size = tiny_layouts["ti2v"], "80x64"
    argv = ["prepare", "--model", str(model), "--video", str(clip["video"]), "--first-frame", str(clip["first_frame"]),
            "--mask", str(clip["mask"]), "--out", str(tmp_path / "run"), "--frames", "17", "--size", size]
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("loraedit: error:") and expect in lines[0], lines


def test_ti2v_naive_mode_keeps_frame_zero_only_and_references_keep_outside_their_region(tiny_layouts):
    from loraedit.encode import token_conditions
    from loraedit.models import load_vae

    model = tiny_layouts["ti2v"]
    fam, vae = family.detect(model), load_vae(str(model), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    source, first = torch.rand(9, 3, 64, 96, generator=g) * 2 - 1, torch.rand(3, 64, 96, generator=g) * 2 - 1
    region = torch.zeros(9, 64, 96, dtype=torch.bool)
    region[:, 0:20, 40:70] = True  # tokens (0, 1) and (0, 2) of the 2x3 token grid (32 pixels a token)
    ref = (torch.rand(64, 96, 3, generator=g) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        naive = token_conditions(vae, fam, source, first, region, "naive", {}, {})
        aware = token_conditions(vae, fam, source, first, region, "mask-aware", {4: ref}, {})
    keep = naive["cond_train"][0, 0]
    assert keep.shape == (3, 4, 6) and keep[0].all() and not keep[1:].any()
    keep = aware["cond_train"][0, 0]
    assert keep[0].all() and keep[1:, 0:2, 2:6].eq(0).all() and keep[1:].sum() == 2 * (24 - 8)
    ref_keep = aware["ref.4.cond"][0, 0, 0]
    assert ref_keep[0:2, 2:6].eq(0).all() and ref_keep.sum() == 24 - 8
    torch.testing.assert_close(naive["cond_render"][:, 1:, :1], aware["cond_render"][:, 1:, :1])  # the edited first frame


def test_masks_takes_the_models_size_as_edit_does(tiny_layouts, tmp_path, capsys):
    from loraedit.cli import main
    from loraedit.files import read_json

    from conftest import make_clip

    wide = make_clip(tmp_path, frames=9, height=72, width=128)  # 16:9 footage
    base = ["--video", str(wide["video"]), "--first-frame", str(wide["first_frame"]), "--mask", str(wide["mask"]),
            "--frames", "1", "-q"]
    sizes = {}
    for name, model in (("480P default", None), ("720p", tiny_layouts["wan2.1-720p"]), ("ti2v", tiny_layouts["ti2v"])):
        with_model = ["--model", str(model)] if model else []
        assert main(["masks", "--out", str(tmp_path / f"m-{name}"), *with_model, *base]) == 0
        info = read_json(tmp_path / f"m-{name}" / "masks.json")
        sizes[name] = (info["width"], info["height"])
        if model:  # the frames `edit` would prepare with this model
            assert main(["prepare", "--model", str(model), "--out", str(tmp_path / f"p-{name}"), *base]) == 0
            plan = read_json(tmp_path / f"p-{name}" / "prepare" / "plan.json")
            assert sizes[name] == (plan["width"], plan["height"]) and info["model"] == str(model)
    assert sizes == {"480P default": (832, 480), "720p": (1280, 720), "ti2v": (1280, 704)}
    capsys.readouterr()
    assert main(["masks", "--out", str(tmp_path / "bad"), "--model", str(tiny_layouts["t2v"]), *base]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "text-to-video" in lines[0], lines
