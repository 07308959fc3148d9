"""Memory modes on the CPU: every mode trains like bf16, resumes bit-identically, renders; the GPU check runs.

Activation offload and block swap run here as CPU-to-CPU copies through the same code a GPU runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraedit import memory as mem
from loraedit import method, models, train
from loraedit.tiny import tiny_transformer_config

CPU = torch.device("cpu")
CFG = tiny_transformer_config(num_layers=3)


def batch():
    g = torch.Generator().manual_seed(0)
    T, h, w = 2, 8, 8
    return (torch.randn(1, 16, T, h, w, generator=g), torch.randn(1, 20, T, h, w, generator=g),
            torch.randn(1, 512, CFG["text_dim"], generator=g), torch.randn(1, 8, CFG["image_dim"], generator=g))


def trained(mode_name: str, steps: int, start_from: Path | None = None, save_to: Path | None = None, seed: int = 3):
    """(losses, LoRA state, first-step LoRA grads) of `steps` training steps in `mode_name`."""
    mode = mem.parse_mode(mode_name)
    model = mem.random_transformer(CFG, mode, CPU, seed=1)
    model._memory_mode = mode
    models.add_lora(model, 4, 4, seed=seed)
    models.setup_training(model, CPU)
    model.train()
    params = models.lora_parameters(model)
    opt = train.make_optimizer(params.values(), 1e-3, 0.01)
    first = 0
    if start_from is not None:
        first, _ = train.load_checkpoint(start_from, params, opt)
    x0, cond, text, image = batch()
    losses, grads = [], None
    for s in range(first, first + steps):
        g = train.step_generator(0, s)
        sigma = method.sample_sigma(1, "uniform", g)
        noise = torch.randn(x0.shape, generator=g)
        loss = method.velocity_loss(model, x0, cond, text, image, sigma, noise)
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in params.items()}
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if save_to is not None:
        train.save_checkpoint(save_to, first + steps, params, opt, losses)
    return losses, models.lora_state_dict(model), grads, model


def test_mode_names():
    assert mem.parse_mode("bf16-swap12") == mem.MemoryMode("bf16", True, True, 12)
    assert mem.parse_mode("fp8-offload").name == "fp8-offload"
    assert not mem.parse_mode("fp32").checkpointing and mem.parse_mode("bf16").checkpointing
    for bad in ("bf17", "fp8-swap", "bf16-swap0", "swap3", "fp8-offload2"):
        with pytest.raises(ValueError, match="memory mode"):
            mem.parse_mode(bad)


def test_every_mode_starts_from_the_same_lora_and_trains_like_bf16():
    results = {name: trained(name, 2) for name in ("bf16", "bf16-offload", "bf16-swap2", "fp8", "fp8-swap3", "fp32")}
    # the same LoRA at step 0 whatever the storage (A drawn in fp32 after every cast)
    for name, (*_, model) in results.items():
        a = dict(model.named_parameters())["blocks.0.attn1.to_q.lora_A.edit.weight"]
        assert a.dtype == (torch.float32 if name == "fp32" else torch.bfloat16)  # LoRA computes in the compute dtype
    bf16_losses, bf16_sd, bf16_grads, _ = results["bf16"]
    for name, (losses, sd, grads, _) in results.items():
        if name.startswith("bf16"):  # offload and swap move tensors, never change a value
            assert losses == bf16_losses, name
            assert all(torch.equal(sd[k], bf16_sd[k]) for k in sd), name
            assert all(torch.equal(grads[k], bf16_grads[k]) for k in grads), name
        else:
            assert losses == pytest.approx(bf16_losses, rel=2e-3), name
            g = torch.cat([grads[k].flatten() for k in sorted(grads)])
            ref = torch.cat([bf16_grads[k].flatten() for k in sorted(grads)])
            assert (g - ref).norm() / ref.norm() < 0.1, name  # fp8 rounds the base weights; fp32 skips bf16 rounding
    # the saved LoRA is the fp32 master, not its bf16 compute copy
    assert all(v.dtype == torch.float32 for v in bf16_sd.values())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in bf16_sd.values())
    # fp8 storage really is float8
    fp8_model = results["fp8"][3]
    assert fp8_model.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn


def test_the_lora_starts_the_same_in_every_storage():
    starts = {}
    for name in ("fp32", "bf16", "fp8"):
        mode = mem.parse_mode(name)
        model = mem.random_transformer(CFG, mode, CPU, seed=1)
        model._memory_mode = mode
        models.add_lora(model, 4, 4, seed=7)
        starts[name] = {k: v.clone() for k, v in models.lora_parameters(model).items()}
    for name in ("bf16", "fp8"):
        assert all(torch.equal(starts[name][k], starts["fp32"][k]) for k in starts["fp32"]), name
    a = [v for k, v in starts["fp32"].items() if "lora_A" in k]
    assert all(v.abs().sum() > 0 for v in a) and all(not v.any() for k, v in starts["fp32"].items() if "lora_B" in k)


@pytest.mark.parametrize("mode", ["fp8-swap2", "bf16-offload"])
def test_resume_is_bit_identical(tmp_path, mode):
    straight, sd_straight, *_ = trained(mode, 4)
    first, *_ = trained(mode, 2, save_to=tmp_path / "ck")
    rest, sd_resumed, *_ = trained(mode, 2, start_from=tmp_path / "ck")
    assert first + rest == straight
    assert all(torch.equal(sd_resumed[k], sd_straight[k]) for k in sd_straight)


def test_block_swap_keeps_weights_on_the_host_and_streams_them(tmp_path):
    mode = mem.parse_mode("bf16-swap2")
    model = mem.random_transformer(CFG, mode, CPU, seed=1)
    model._memory_mode = mode
    models.add_lora(model, 4, 4)
    runner = models.setup_training(model, CPU)
    assert sorted(runner.host) == [1, 2]
    x0, cond, text, image = batch()
    method.velocity_loss(model, x0, cond, text, image, torch.tensor([0.5]), torch.randn_like(x0)).backward()
    # every swapped block is back on its host copy after the step, and was moved in forward and backward
    assert all(p.data_ptr() == h.data_ptr() for i in (1, 2) for p, h in runner.host[i])
    per_block = sum(h.numel() * h.element_size() for _, h in runner.host[2])
    assert runner.bytes_moved >= 3 * per_block  # 2 swapped blocks in forward + backward, minus the turn-around
    assert not runner.ready and not runner.stack
    assert all(p.grad is None for p in model.parameters())  # grads went to the fp32 masters
    masters = models.lora_parameters(model)
    assert all(p.grad is not None for p in masters.values())
    # an optimizer step on the masters is what the next forward computes with
    opt = train.make_optimizer(masters.values(), 1e-2, 0.0)
    opt.step()
    method.velocity_loss(model, x0, cond, text, image, torch.tensor([0.5]), torch.randn_like(x0))
    compute = dict(model.named_parameters())
    assert all(torch.equal(compute[n], m.detach().bfloat16()) for n, m in masters.items())


def test_render_in_every_mode_from_a_bf16_trained_lora(tmp_path, tiny_model):
    """Issue: fp8 render crashed (peft made the LoRA float8). Train in one mode, render in others."""
    t = models.load_transformer(str(tiny_model), CPU, "bf16")
    models.add_lora(t, 4, 4)
    with torch.no_grad():
        for p in models.lora_parameters(t).values():
            p.add_(0.05)
    files = models.save_lora(t, tmp_path / "lora", 4, 4, models.DEFAULT_LORA_TARGETS)
    x0, cond, text, image = batch()
    text = torch.randn(1, 512, 32)
    image = torch.randn(1, 8, 16)
    effects = {}
    for mode in ("fp32", "bf16", "fp8", "fp8-swap1", "bf16-offload"):
        with torch.no_grad():
            plain = method.predict_velocity(models.load_transformer(str(tiny_model), CPU, mode).eval(), x0, cond, torch.tensor([0.4]), text, image)
            model = models.load_transformer(str(tiny_model), CPU, mode).eval()
            models.load_trained_lora(model, files["diffusers"])
            out = method.predict_velocity(model, x0, cond, torch.tensor([0.4]), text, image)
        assert torch.isfinite(out).all(), mode
        effects[mode] = (out.float() - plain.float()).flatten()
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        # fused into bf16/fp32 weights; kept as a separate bf16 LoRA over fp8 storage or swapped weights
        assert not lora if mode in ("fp32", "bf16", "bf16-offload") else all(p.dtype == torch.bfloat16 for p in lora), mode
    ref = effects["fp32"]
    assert ref.abs().mean() > 1e-3
    for mode, e in effects.items():  # the trained change is there in every mode
        assert torch.nn.functional.cosine_similarity(e, ref, dim=0) > 0.9, mode
        assert 0.7 < e.norm() / ref.norm() < 1.3, mode


def test_loading_never_builds_a_full_precision_copy(tiny_model):
    """Weights go tensor by tensor into their final dtype: fp8 storage from the start, norms in fp32."""
    model = models.load_transformer(str(tiny_model), CPU, "fp8")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.ffn.net.0.proj.weight"] == torch.float8_e4m3fn
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    ref = models.load_transformer(str(tiny_model), CPU, "fp32")
    w = dict(ref.named_parameters())["blocks.1.attn1.to_v.weight"]
    assert torch.equal(dict(model.named_parameters())["blocks.1.attn1.to_v.weight"], w.to(torch.float8_e4m3fn))


def test_gpu_check_runs_end_to_end_on_a_tiny_config(tmp_path, monkeypatch):
    """The GPU check script on tiny configs: one row in its own process, as the GPU run does, the
    other kinds in-process (each process start costs seconds on a shared CPU)."""
    out = tmp_path / "gpu_check.json"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "bench" / "gpu_check.py"), "--tiny", "--out", str(out), "--steps", "1", "--rows", "train 24GB"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["s_per_step"] > 0 and row["loss_finite"], row
    assert "s/step" in out.with_suffix(".log").read_text()

    sys.path.insert(0, str(root / "bench"))
    import gpu_check

    monkeypatch.setattr(sys, "argv", ["gpu_check", "--tiny", "--in-process", "--steps", "1", "--out", str(out),
                                      "--rows", "render fp8,attention,vae,ti2v"])
    gpu_check.main()
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 4
    bad = {n: row.get("error") for n, row in rows.items() if row["status"] != "ok"}
    assert not bad, bad
    assert rows["attention backends"]["backends"]["native"]["block_fwd_bwd_s"] > 0
    assert "decode_tiled" in rows["vae encode+decode"]


def test_gpu_check_keeps_going_after_a_failing_row(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_check

    def boom(row, device, steps):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    monkeypatch.setitem(gpu_check.RUNNERS, "render", boom)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--tiny", "--in-process", "--steps", "1", "--out", str(tmp_path / "g.json"),
                                      "--rows", "render bf16,train bf16-offload"])
    gpu_check.main()
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "OOM"]


# ---------------------------------------------------------------- the memory model

WIDE = tiny_transformer_config(num_layers=4, num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, text_dim=64, image_dim=32)
WIDE_LATENT = (5, 64, 96)  # 5 latent frames of 96x64: 7,680 tokens

def test_memory_model_is_within_15_percent_of_the_real_cpu_peak():
    """The prediction (meta tensors, flash attention's memory, solved from 2-3 block copies) against a
    real CPU run of the same training steps: real kernels, real autograd, real tensors, whose live
    bytes are counted as they are allocated and freed. (Against a GPU's allocator the same model was
    within 0.1-1.1 GiB, <= 6%, on every 14B row measured on an H200: README, Performance.)"""
    from loraedit import plan

    # 640 tokens and a narrower FFN: on a CPU without native bf16 each backward matmul of WIDE takes ~90 ms, so
    # WIDE at 1,920 tokens took 222 s here (2026-11-27); this size keeps 4 blocks (the solve from copies) in ~40 s
    config = {**WIDE, "ffn_dim": 512}
    latent = (5, 16, 32)
    predicted = plan.predict(config, "bf16", latent, count_flops=False)
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(1, 16, *latent, generator=g), torch.randn(1, 20, *latent, generator=g)
    text, image = torch.randn(1, 512, config["text_dim"], generator=g), torch.randn(1, 257, config["image_dim"], generator=g)
    with plan._LiveMemory() as live:
        mode = mem.parse_mode("bf16")
        model = mem.random_transformer(config, mode, CPU)
        model._memory_mode = mode
        models.add_lora(model, 16, 16)
        models.setup_training(model, CPU)
        params = models.lora_parameters(model)
        opt = torch.optim.AdamW(params.values(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, foreach=False)
        inputs = [t.clone() for t in (x0, cond, text, image)]
        for _ in range(2):
            loss = method.velocity_loss(model, *inputs, torch.tensor([0.5]), torch.randn_like(x0))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0, foreach=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        real = live.peak["device"] / 2**30
    assert abs(predicted["peak_gib"] - real) / real < 0.15, (predicted, real)


def test_memory_model_shapes_are_the_real_model():
    """Solving from shallow copies gives the full-depth simulation; offload moves block inputs to the host, swap weights."""
    from loraedit import plan

    deep = {**WIDE, "num_layers": 6}
    latent = (2, 16, 16)
    full = plan.simulate(deep, "bf16-offload", latent, count_flops=False)
    solved = plan.predict(deep, "bf16-offload", latent, count_flops=False)
    for k in ("weights_gib", "peak_gib", "host_gib"):
        assert solved[k] == pytest.approx(full[k], rel=1e-3), k
    plain = plan.predict(deep, "bf16", latent, count_flops=False)
    assert solved["host_gib"] > 0 and plain["host_gib"] == 0  # (peaks: offload saves at real sizes, see README)
    swapped = plan.predict(deep, "bf16-swap5", latent, count_flops=False)
    assert swapped["weights_gib"] < solved["weights_gib"]
    assert swapped["moved_gib"] > 0, swapped


def test_plan_command_from_config_files_only(tmp_path, tiny_model):
    """A user plans before downloading: the folder holds only the JSON configs."""
    import shutil

    folder = tmp_path / "configs-only"
    for f in Path(tiny_model).rglob("*.json"):
        (folder / f.relative_to(tiny_model)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f.relative_to(tiny_model))
    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run([sys.executable, "-m", "loraedit", "plan", "--model", str(folder), *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=600, cwd=root, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    r = run("--size", "96x64", "--frames", "17", "--gpu-memory", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    p = json.loads(r.stdout)
    names = [m["name"] for m in p["modes"]]
    assert names[:4] == ["bf16", "bf16-offload", "fp8", "fp8-offload"] and names[4].startswith("bf16-swap")
    for m in p["modes"]:
        assert {"name", "train_peak_gib", "render_peak_gib", "host_ram_gib", "fits"} <= set(m)
        assert m["train_peak_gib"] > 0 and m["fits"] is True  # a tiny model fits in 2 GiB
    assert p["chosen"] == "bf16"
    bad = run("--size", "96x64", "--frames", "10")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("loraedit: error: --frames 10") and "Traceback" not in bad.stderr


def test_a_mode_that_cannot_fit_is_refused_naming_one_that_would():
    from loraedit.errors import InputError

    latent = WIDE_LATENT
    need = {m: __import__("loraedit.plan", fromlist=["x"]).predict(WIDE, m, latent, count_flops=False)["peak_gib"] for m in ("bf16", "fp8-offload")}
    free = (need["fp8-offload"] + need["bf16"]) / 2 / 0.95 + 1.0 / 0.95  # room for fp8-offload, not for bf16
    assert models.fitting_mode("fp8-offload", WIDE, latent, "train", free) == "fp8-offload"
    chosen = models.fitting_mode("auto", WIDE, latent, "train", free)
    assert chosen != "bf16"
    with pytest.raises(InputError, match=rf"--memory bf16: predicted peak .* use --memory {chosen}"):
        models.fitting_mode("bf16", WIDE, latent, "train", free)
    with pytest.raises(InputError, match="no memory mode"):
        models.fitting_mode("auto", WIDE, latent, "train", 0.001)


def test_plan_says_when_it_plans_other_frames_than_edit_takes(monkeypatch, capsys):
    """TI2V-5B is planned at its own 121 frames; `edit` without --frames takes 49, and --memory auto picks for those."""
    import argparse

    from loraedit import plan as plan_module

    fake = {"model": "m", "frames": 121, "size": "1280x704", "tokens": 1, "gpu_memory_gib": None, "experts": 1, "modes": [],
            "gpu": "H100", "chosen": None}
    monkeypatch.setattr(plan_module, "spec_for", lambda *a: None)
    monkeypatch.setattr(plan_module, "plan", lambda *a, **k: dict(fake))
    args = argparse.Namespace(model="wan2.2-ti2v-5b", size=None, frames=None, gpu_memory=24.0, rank=16, json=False)
    assert plan_module.run_plan(args) == 0
    assert "note: this plans the model's own 121 frames; `loraedit edit` takes 49 unless given --frames" in capsys.readouterr().out
    fake["frames"] = 49
    assert plan_module.run_plan(args) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("flags,expect", [(["--frames", "0"], "--frames 0: must be 4k+1"),
                                          (["--frames", "100001"], "--frames 100001: must be 4k+1 between 1 and 1001"),
                                          (["--gpu-memory", "inf"], "--gpu-memory inf: give the card's memory in GiB"),
                                          (["--gpu-memory", "nan"], "--gpu-memory nan: give the card's memory in GiB")])
def test_plan_refuses_frames_and_memory_it_cannot_plan(flags, expect, capsys):
    """--frames 0 silently became the default, 100001 crashed; inf GiB was planned."""
    from loraedit.cli import main

    assert main(["plan", "--model", "wan2.2-ti2v-5b", *flags]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and expect in err[0], err
