"""Training: the loss falls, resume equals an uninterrupted run, the memory modes train."""


import pytest
import torch
from safetensors.torch import load_file

from loraedit import method, train
from loraedit.cli import main
from loraedit.models import DEFAULT_LORA_TARGETS, add_lora, load_transformer, lora_parameters

from conftest import edit_argv


def _batch(transformer):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 3, 4, 6, generator=g)
    cond = torch.randn(1, 20, 3, 4, 6, generator=g)
    text = torch.randn(1, 512, transformer.config.text_dim, generator=g)
    image = torch.randn(1, 5, transformer.config.image_dim, generator=g)
    return x0, cond, text, image, torch.tensor([0.5]), torch.randn(x0.shape, generator=g)


def test_training_lowers_the_loss_on_a_fixed_batch(tiny_model):
    transformer = load_transformer(str(tiny_model), torch.device("cpu"), "fp32")
    add_lora(transformer, 8, 8, DEFAULT_LORA_TARGETS)
    params = lora_parameters(transformer)
    names = list(params)
    assert names and all("lora_" in n for n in names)
    assert not any("add_k_proj" in n or "add_v_proj" in n for n in names)  # image k/v stay frozen
    assert any("attn1.to_q" in n for n in names) and any("ffn.net.2" in n for n in names)
    frozen_before = transformer.blocks[0].attn1.to_q.base_layer.weight.clone()
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    batch = _batch(transformer)
    losses = [train.training_step(transformer, opt, *batch, grad_clip=1.0) for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(transformer.blocks[0].attn1.to_q.base_layer.weight, frozen_before)


def test_fp8_memory_mode_stores_base_weights_in_float8_and_trains_the_lora_in_fp32(tiny_model):
    transformer = load_transformer(str(tiny_model), torch.device("cpu"), "fp8")
    add_lora(transformer, 4, 4, DEFAULT_LORA_TARGETS)
    assert transformer.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    params = lora_parameters(transformer)
    assert all(p.dtype == torch.float32 for p in params.values())
    opt = torch.optim.AdamW(params.values(), lr=2e-3)
    batch = _batch(transformer)
    losses = [train.training_step(transformer, opt, *batch, grad_clip=1.0) for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(tiny_model):
    results = []
    for checkpointing in (False, True):
        transformer = load_transformer(str(tiny_model), torch.device("cpu"), "fp32")
        add_lora(transformer, 4, 4, DEFAULT_LORA_TARGETS, seed=1)
        with torch.no_grad():  # B starts at zero; make it non-zero so A gets gradients too
            for n, p in lora_parameters(transformer).items():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        x0, cond, text, image, sigma, noise = _batch(transformer)
        loss = method.velocity_loss(transformer, x0, cond, text, image, sigma, noise)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in lora_parameters(transformer).items()}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys() and all(g0[n].abs().sum() > 0 for n in g0)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-4)


def test_stage_two_mixes_references_with_the_video():
    g = lambda s: train.step_generator(0, s)  # noqa: E731
    picks = [train.sample_for_step(s, 10, [8, 12], 10, g(s)) for s in range(40)]
    assert picks[:10] == [None] * 10  # stage 1: the video
    stage2 = picks[10:]
    assert stage2[9] is None and stage2[19] is None  # every 10th: the video
    assert {p for p in stage2 if p is not None} == {8, 12}
    assert train.sample_for_step(15, 10, [], 10, g(15)) is None


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_model, clip, tmp_path, monkeypatch):
    argv = lambda out: edit_argv(tiny_model, clip, out, "--steps", "6", "--checkpoint-every", "2", "--ref", f"8={clip['ref']}",  # noqa: E731
                                 "--ref-steps", "3")
    assert main(argv(tmp_path / "whole")) == 0

    real_step = train.training_step
    calls = {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # killed during step 6, after the checkpoint at step 4
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train, "training_step", dying_step)
    assert main(argv(tmp_path / "killed")) == 130
    assert not (tmp_path / "killed" / "lora").exists()
    monkeypatch.setattr(train, "training_step", real_step)
    assert main(argv(tmp_path / "killed")) == 0

    done = (tmp_path / "killed" / "train" / "done.json").read_text()
    assert '"resumed_from": 4' in done
    for name in ("pytorch_lora_weights.safetensors", "wan_lora.safetensors"):
        a = load_file(str(tmp_path / "whole" / "lora" / name))
        b = load_file(str(tmp_path / "killed" / "lora" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    whole = (tmp_path / "whole" / "train" / "losses.csv").read_text()
    assert whole == (tmp_path / "killed" / "train" / "losses.csv").read_text()
    assert len(whole.strip().splitlines()) == 1 + 9 and ",2,ref8," in whole


def test_colour_copies_take_turns_with_the_video_wherever_the_video_trains():
    g = lambda s: train.step_generator(0, s)  # noqa: E731
    picks = [train.sample_for_step(s, 6, [8], 2, g(s), colour_copies=2) for s in range(14)]
    assert picks[:6] == [None, "hue1", "hue2", None, "hue1", "hue2"]
    assert picks[6:] == [8, None, 8, "hue1", 8, "hue2", 8, None]  # stage 2: every 2nd step the video, in turn
    assert [train.sample_for_step(s, 6, [8], 0, g(s), colour_copies=2) for s in range(6, 9)] == [8, 8, 8]
    assert [train.sample_for_step(s, 2, [], 2, g(s), colour_copies=1) for s in range(4)] == [None, "hue1", None, None]


def test_colour_copies_and_paired_references_train_what_they_say(tiny_model, clip, tmp_path, monkeypatch):
    """One edit with --colour-copies 2 and --ref-sample pair: what each training step was handed."""
    seen = []
    real_step, real_positions = train.training_step, method.rope_time_positions

    def recording_positions(transformer, positions):
        seen.append([list(positions)])
        return real_positions(transformer, positions)

    def recording_step(transformer, optimizer, x0, cond, text, image, *a, **k):
        seen[-1] += [x0.clone(), cond.clone(), None if image is None else image.clone()]
        return real_step(transformer, optimizer, x0, cond, text, image, *a, **k)

    monkeypatch.setattr(method, "rope_time_positions", recording_positions)
    monkeypatch.setattr(train, "training_step", recording_step)
    assert main(edit_argv(tiny_model, clip, tmp_path / "run", "--steps", "3", "--colour-copies", "2", "--ref", f"8={clip['ref']}",
                          "--ref-steps", "1", "--ref-video-every", "0", "--ref-sample", "pair", "--render-steps", "1")) == 0
    cache = load_file(str(next((tmp_path / "run" / "cache").glob("encoded-*.safetensors"))))
    # stage 1: the video, then its two colour copies, each with its own condition video and CLIP image
    assert [s[0] for s in seen[:3]] == [[0, 1, 2, 3, 4]] * 3
    assert torch.equal(seen[0][1], cache["x0"]) and torch.equal(seen[1][1], cache["hue.1of3.x0"]) and torch.equal(seen[2][1], cache["hue.2of3.x0"])
    assert not torch.allclose(cache["hue.1of3.x0"], cache["x0"], atol=0.05)  # another video, not a copy
    assert torch.equal(seen[1][2][:, :4], cache["cond_train"][:, :4])  # the same keep mask, a turned condition video
    assert torch.equal(seen[1][3], cache["hue.1of3.image"]) and not torch.equal(seen[1][3], cache["image_train"])
    # stage 2: the reference after the edited first frame, at frame 8's latent frame (2): two latent frames
    ref = seen[3]
    assert ref[0] == [0, 2] and ref[1].shape[2] == 2
    assert torch.equal(ref[2][:, -16:, :1], cache["cond_render"][:, -16:, :1])  # latent frame 0: the edited first frame
    assert torch.equal(ref[1][:, :, 1:], cache["ref.8.x0"])
    losses = (tmp_path / "run" / "train" / "losses.csv").read_text()
    assert ",1,hue1," in losses and ",1,hue2," in losses and ",2,ref8," in losses
    assert '"ref_sample": "pair"' in (tmp_path / "run" / "train" / "record.json").read_text()
    # another number of copies is another training: refused in the same run folder, not silently reused
    assert main(edit_argv(tiny_model, clip, tmp_path / "run", "--steps", "3", "--colour-copies", "1", "--ref", f"8={clip['ref']}",
                          "--ref-steps", "1", "--ref-video-every", "0", "--ref-sample", "pair", "--render-steps", "1")) == 2
