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
    assert ti2v.size_for(1920, 1080) == (1280, 704) and ti2v.size_for(1080, 1920) == (704, 1280)
    p720 = family.detect(tiny_layouts["wan2.1-720p"])
    assert p720.name == family.WAN21 and p720.has_clip and p720.size_for(1920, 1080) == (1280, 720)
    assert p720.size_for(720, 1280) == (720, 1280)
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
