"""Speed settings on the CPU: --compile trains as uncompiled, --attention refuses what cannot run,
batched guidance renders as sequential, the render cache keeps cond and uncond apart, plans are cached.

torch.compile runs with the aot_eager backend here (LORAEDIT_COMPILE_BACKEND): it traces the blocks
exactly as inductor does (graph breaks, guards, autograd) but skips code generation, which on two
CPU cores would take minutes.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from loraedit import memory as mem
from loraedit import method, models, train
from loraedit.errors import InputError
from loraedit.settings import RenderSettings, TrainSettings
from loraedit.tiny import tiny_transformer_config

CPU = torch.device("cpu")


def train_losses(mode_name: str, compile_: bool, steps: int = 2) -> tuple[list[float], list[int]]:
    cfg = tiny_transformer_config(num_layers=3)
    mode = mem.parse_mode(mode_name)
    model = mem.random_transformer(cfg, mode, CPU, seed=1)
    model._memory_mode = mode
    models.add_lora(model, 4, 4, seed=3)
    models.setup_training(model, CPU)
    compiled = models.speed_up(model, CPU, "auto", compile_)
    model.train()
    params = models.lora_parameters(model)
    opt = train.make_optimizer(params.values(), 1e-3, 0.01)
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 20, 2, 8, 8, generator=g)
    text, image = torch.randn(1, 512, cfg["text_dim"], generator=g), torch.randn(1, 8, cfg["image_dim"], generator=g)
    losses = []
    for s in range(steps):
        g = train.step_generator(0, s)
        sigma, noise = method.sample_sigma(1, "uniform", g), torch.randn(x0.shape, generator=g)
        losses.append(train.training_step(model, opt, x0, cond, text, image, sigma, noise, 1.0))
    return losses, compiled


def test_compile_trains_like_uncompiled_with_checkpointed_offload_and_swap(monkeypatch):
    monkeypatch.setenv(models.COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    for mode in ("bf16-offload", "bf16-swap1"):  # our checkpoint function; the swapped block stays uncompiled
        plain, none = train_losses(mode, False)
        fast, compiled = train_losses(mode, True)
        assert none == [] and compiled == ([0, 1, 2] if mode == "bf16-offload" else [0, 1])
        assert fast == pytest.approx(plain, rel=1e-3), mode
        assert fast[1] != fast[0]  # the LoRA trained through the compiled blocks


def test_compile_is_refused_where_it_cannot_run():
    with pytest.raises(InputError, match="--compile with --memory fp8-offload.*--memory bf16-offload"):
        TrainSettings(compile=True, memory="fp8-offload")
    with pytest.raises(InputError, match="--compile with --render-cache"):
        RenderSettings(compile="on", render_cache="first-block")
    assert TrainSettings(compile="yes", memory="bf16").compile is True and not TrainSettings().compile


def test_attention_backend_refused_on_this_machine_and_math_matches_sdpa():
    for name in ("flash", "cudnn", "flash-attn", "sage"):
        with pytest.raises(InputError, match=f"--attention {name}: needs a CUDA GPU"):
            models.check_attention(name, CPU)
    with pytest.raises(InputError, match="--attention fast: choose one of auto, sdpa"):
        TrainSettings(attention="fast")
    cfg = tiny_transformer_config()
    torch.manual_seed(0)
    model = WanTransformer3DModel(**cfg).eval()
    x = torch.randn(1, 36, 2, 8, 8)
    args = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 16, cfg["text_dim"]),
                encoder_hidden_states_image=torch.randn(1, 4, cfg["image_dim"]), return_dict=False)
    with torch.no_grad():
        ref = model(**args)[0]
        models.speed_up(model, CPU, "math")
        out = model(**args)[0]
        assert model.blocks[0].attn1.processor._attention_backend == "_native_math"
        assert torch.allclose(out, ref, atol=1e-5)
        # diffusers made math the process's default too; the next model on auto is back on SDPA
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        assert _AttentionBackendRegistry.get_active_backend()[0] == "_native_math"
        models.speed_up(WanTransformer3DModel(**cfg), CPU, "auto")
        assert _AttentionBackendRegistry.get_active_backend()[0] == "native"


def _bf16(cfg, seed):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**cfg).to(torch.bfloat16).eval()


def _sample(denoiser, cfg, batch_cfg, boundary=None, steps=3, condition=None, text_len=16):
    g = torch.Generator().manual_seed(1)
    lat = cfg["out_channels"]
    noise = torch.randn(1, lat, 2, 8, 8, generator=g)
    if condition is None:
        condition = torch.randn(1, cfg["in_channels"] - lat, 2, 8, 8, generator=g)
    text, neg = torch.randn(2, 1, text_len, cfg["text_dim"], generator=g)
    image = torch.randn(1, 4, cfg["image_dim"], generator=g) if cfg.get("image_dim") else None
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    return method.sample_latents(denoiser, sched, noise, condition, text, neg, image, steps, 5.0, boundary=boundary, batch_cfg=batch_cfg)


def test_batched_guidance_renders_as_sequential_wan21_a14b_ti2v():
    wan = tiny_transformer_config()
    model = _bf16(wan, 0)
    seq, both = _sample(model, wan, False), _sample(model, wan, True)
    assert torch.allclose(both, seq, atol=0.03, rtol=0.03) and not torch.equal(seq, torch.zeros_like(seq))
    # two experts (the sampler asks for each by name), no CLIP image
    a14b = tiny_transformer_config(image_dim=None, added_kv_proj_dim=None)
    experts = {method.HIGH_NOISE: _bf16(a14b, 1), method.LOW_NOISE: _bf16(a14b, 2)}
    asked = []
    seq = _sample(lambda n: asked.append(n) or experts[n], a14b, False, boundary=900.0, steps=4)
    both = _sample(lambda n: asked.append(n) or experts[n], a14b, True, boundary=900.0, steps=4)
    assert asked == [method.HIGH_NOISE, method.LOW_NOISE] * 2
    assert torch.allclose(both, seq, atol=0.03, rtol=0.03)
    # TI2V: a token condition (keep channel + latents), per-token timesteps of a batch of two
    ti2v = tiny_transformer_config(in_channels=48, out_channels=48, image_dim=None, added_kv_proj_dim=None)
    keep = method.ti2v_stock_keep(5, 8, 8)
    cond = method.ti2v_condition(torch.randn(1, 48, 2, 8, 8, generator=torch.Generator().manual_seed(3)), keep)
    model = _bf16(ti2v, 4)
    seq, both = _sample(model, ti2v, False, condition=cond), _sample(model, ti2v, True, condition=cond)
    assert torch.allclose(both, seq, atol=0.03, rtol=0.03)
    assert torch.equal(both[:, :, 0], cond[:, 1:, 0].to(both))  # the kept frame is the condition's


def test_render_cache_names_cond_and_uncond_and_skips_only_above_zero_threshold():
    cfg = tiny_transformer_config(num_layers=3)
    plain = _sample(_bf16(cfg, 0), cfg, False, steps=6)
    for batch_cfg in (False, True):
        exact = _bf16(cfg, 0)
        models.enable_render_cache(exact, "first-block", threshold=1e-9)  # never similar enough: every block runs
        assert torch.allclose(_sample(exact, cfg, batch_cfg, steps=6), plain, atol=0.03, rtol=0.03)
        loose = _bf16(cfg, 0)
        models.enable_render_cache(loose, "first-block", threshold=10.0)  # always similar: the tail runs once per context
        ran = []
        loose.blocks[-1].ffn.register_forward_hook(lambda *a: ran.append(1))
        out = _sample(loose, cfg, batch_cfg, steps=6)
        assert len(ran) == (1 if batch_cfg else 2)  # cond and uncond each filled their own cache once
        assert out.isfinite().all() and not torch.allclose(out, plain, atol=0.03)


def test_plan_results_are_cached_on_disk(tmp_path, monkeypatch):
    from loraedit import plan

    monkeypatch.setenv("LORAEDIT_CACHE_DIR", str(tmp_path))
    cfg = tiny_transformer_config(num_layers=2)
    first = plan.cached_predict(cfg, "bf16", (2, 8, 8), kind="render", cfg_batch=2)
    assert len(list((tmp_path / "plan").glob("*.json"))) == 1
    calls = []
    monkeypatch.setattr(plan, "predict", lambda *a, **k: calls.append(a))
    assert plan.cached_predict(cfg, "bf16", (2, 8, 8), kind="render", cfg_batch=2) == first and calls == []
    plan.cached_predict(cfg, "bf16", (3, 8, 8), kind="render", cfg_batch=2)  # another latent size is another entry
    assert len(calls) == 1


def test_plan_table_for_the_clip_and_the_toy_models_own_size(tmp_path, monkeypatch, tiny_model):
    from loraedit import demo, plan

    monkeypatch.setenv("LORAEDIT_CACHE_DIR", str(tmp_path))
    peaks = {"bf16": 30.0, "bf16-offload": 23.0, "fp8": 20.0, "fp8-offload": 12.0}  # a card where bf16 does not fit
    calls = []

    def fake_predict(config, mode, latent, kind="train", **_):
        calls.append((mode, kind))
        peak = peaks.get(mode, 5.0) * (0.5 if kind == "render" else 1.0)
        return {"peak_gib": peak, "weights_gib": 1.0, "host_gib": 0.0, "tflop": 1.0, "moved_gib": 0.0, "offloaded_gib": 0.0,
                "tokens": 120, "mode": mode, "kind": kind}

    monkeypatch.setattr(plan, "predict", fake_predict)
    lines = models.plan_lines(str(tiny_model), 5, 64, 48, 24.0, "NVIDIA L4")
    assert lines[0].startswith("memory plan: 5 frames 64x48 (120 tokens), 24.0 GiB free on NVIDIA L4 → 21.8 GiB")
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert rows["bf16"].endswith("does not fit") and "train   30.0 GiB  render   15.0 GiB" in rows["bf16"]
    assert rows["fp8"].endswith(" fits") and lines[-1] == "  --memory auto takes fp8"
    n = len(calls)
    assert models.plan_lines(str(tiny_model), 5, 64, 48, 24.0, "NVIDIA L4") == lines and len(calls) == n  # from the cache
    # the bundled toy model plans at the size it was trained at, not Wan2.1's 832x480 x 49
    spec = plan.spec_for(str(demo.TOY_MODEL), None, None)
    assert (spec.size, spec.frames) == ((128, 128), 17)
    assert plan.spec_for(str(demo.TOY_MODEL), "256x128", 9).size == (256, 128)


def test_gpu_check_speed_rows_run_on_a_tiny_config(tmp_path, monkeypatch):
    """The rows of the GPU run: compile vs not in one process, sequential / batched / cached render, TI2V render."""
    import json
    import sys
    from pathlib import Path

    monkeypatch.setenv(models.COMPILE_BACKEND_ENV, "aot_eager")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_check

    out = tmp_path / "g.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--tiny", "--in-process", "--steps", "1", "--out", str(out),
                                      "--rows", "speed: train bf16 compile,speed: render,speed: ti2v5b render"])
    gpu_check.main()
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert [r["status"] for r in rows.values()] == ["ok"] * 3, rows
    comp = rows["speed: train bf16 compile vs not"]
    assert comp["compiled_blocks"] == 4 and comp["compile_s"] > 0 and comp["uncompiled_s_per_step"] > 0 and comp["loss_finite"]
    render = rows["speed: render bf16 batched CFG + cache"]["variants"]
    assert set(render) == {"sequential", "batched", "cache"} and all(v["s_per_step"] > 0 for v in render.values())
    assert render["sequential"]["tail_runs_per_head_run"] == 1.0 and 0 < render["cache"]["tail_runs_per_head_run"] <= 1.0
    assert set(rows["speed: ti2v5b render bf16 49x1280x704"]["variants"]) == {"sequential", "batched"}
    assert "compile" in (out.with_suffix(".log")).read_text()


def test_gpu_check_compile_row_keeps_its_uncompiled_figures_when_compiling_fails(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_check

    def fails(*a, **k):
        raise RuntimeError("inductor: simulated failure")

    monkeypatch.setattr(models, "speed_up", fails)
    res = gpu_check.run_row(dict(name="c", kind="train", model="tiny", mode="bf16", compile=True, steps=1), "cpu", 1, 1)
    assert res["status"] == "ok" and res["s_per_step"] == res["uncompiled_s_per_step"] > 0
    assert res["compile_error"] == "RuntimeError: inductor: simulated failure" and "compile_s" not in res
