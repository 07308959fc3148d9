"""One GPU check: speed and true peak memory of every memory mode at the real size, random weights.

    python bench/gpu_check.py --out OUT/gpu_check.json            # on a GPU (≈ 6 min on an H100)
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.json    # CPU, tiny configs (what the test runs)

Nothing is downloaded and loraedit need not be installed: it runs from the repository root with
torch, diffusers and peft. The transformers are built from the real configs directly on the GPU in
their real storage dtype (meta device → final place, fp8 included; never fp32 first) and the peak
counter is reset after each build. Rows, in order of value (Wan2.1-I2V-14B at 49×832×480 = 20,280
tokens unless named otherwise):

  train <mode>          s/step of loraedit's training step and its true peak memory, per memory mode
  train <mode> @ N GB   the same under torch.cuda.set_per_process_memory_fraction(N GB)
  render <mode>         one sampling step with classifier-free guidance (two transformer calls)
  attention <backend>   one block forward+backward at full length, per available attention backend
  vae encode/decode     AutoencoderKLWan (random weights, default config), tiled and untiled
  a14b / ti2v5b         a training step of a Wan2.2-I2V-A14B expert and of TI2V-5B at its default size

Each row runs in its own process (a crash or OOM there cannot lose the other rows; OOM → the row
says OOM), prints as it finishes next to the memory model's prediction where there is one, and the
JSON at --out is rewritten after every row (the log beside it, .log). --budget-s skips the rows
that no longer fit in the time left.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30
# dense bf16 peak of the GPUs this is likely to meet (for MFU); unknown → no MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "A6000": 155.0}


# ---------------------------------------------------------------- the rows


def rows_for(tiny: bool) -> list[dict]:
    """Every row, in order of value. Each: what to run and the estimated seconds it takes on an H100.

    The `speed` rows (compile, batched guidance, render cache, TI2V at 49 frames, swap40, 720P) come first:
    the rows after them were measured on an H200 already (bench/results/gpu_check_2026-11-26_H200*.json),
    so `--rows speed` runs just the new ones, most valuable first, and a short budget cuts the least.
    """
    m = "tiny" if tiny else "wan2.1-i2v-14b-480p"
    ti2v = "tiny-ti2v" if tiny else "wan2.2-ti2v-5b"
    r = [
        # one process: the same model, one timed step uncompiled, then compiled (compile time apart)
        dict(name="speed: train bf16 compile vs not", kind="train", model=m, mode="bf16", compile=True, steps=1, est=100),
        # one process: sequential guidance, one batch of two, then with the first-block cache
        dict(name="speed: render bf16 batched CFG + cache", kind="render", model=m, mode="bf16", variants=["sequential", "batched", "cache"],
             steps=1, est=50),
        dict(name="speed: ti2v5b train bf16 49x1280x704", kind="train", model=ti2v, mode="bf16", frames=49, steps=2, est=30),
        dict(name="speed: ti2v5b render bf16 49x1280x704", kind="render", model=ti2v, mode="bf16", frames=49, variants=["sequential", "batched"],
             steps=1, est=25),
        dict(name="speed: train bf16-swap40", kind="train", model=m, mode="bf16-swap40", steps=2, est=50),
        # Wan2.1-I2V-14B-720P at 49x1280x720 (46,800 tokens): the same weights as 480P, 2.3x the tokens
        dict(name="speed: 720p train bf16 49x1280x720", kind="train", model="tiny" if tiny else "wan2.1-i2v-14b-720p",
             mode="bf16", steps=1, est=90),
        dict(name="train bf16", kind="train", model=m, mode="bf16", est=35),
        dict(name="train bf16-offload", kind="train", model=m, mode="bf16-offload", est=35),
        dict(name="train fp8", kind="train", model=m, mode="fp8", est=35),
        dict(name="train 48GB mode @ 48 GB", kind="train", model=m, mode="auto", cap_gib=48, target_gib=44, est=35),
        dict(name="train 24GB mode @ 24 GB", kind="train", model=m, mode="auto", cap_gib=24, target_gib=21, est=50),
        dict(name="render bf16 (CFG)", kind="render", model=m, mode="bf16", est=25),
        dict(name="render fp8 (CFG)", kind="render", model=m, mode="fp8", est=25),
        dict(name="attention backends", kind="attention", model=m, mode="bf16", est=25),
        dict(name="vae encode+decode", kind="vae", model=m, est=60),
        dict(name="train fp8-offload", kind="train", model=m, mode="fp8-offload", est=35),
        dict(name="a14b expert train bf16-offload", kind="train", model="tiny-noimage" if tiny else "wan2.2-i2v-a14b", mode="bf16-offload", est=35),
        dict(name="ti2v5b train bf16 121x1280x704", kind="train", model="tiny-ti2v" if tiny else "wan2.2-ti2v-5b", mode="bf16", est=35),
        dict(name="train bf16-swap40", kind="train", model=m, mode="bf16-swap40", est=50),
    ]
    return r


def row_spec(row: dict):
    """model_spec of the row's model, with the row's own frame count where it names one."""
    cfg, vf, frames, size = model_spec(row["model"])
    if row.get("frames") and not row["model"].startswith("tiny"):
        frames = row["frames"]
    return cfg, vf, frames, size


def model_spec(name: str):
    """(transformer config, VAE spatial factor, frames, (W, H)) of a row's model."""
    from loraedit.plan import KNOWN_MODELS

    if name.startswith("tiny"):
        from loraedit.tiny import tiny_transformer_config

        cfg = tiny_transformer_config(num_layers=4, num_attention_heads=2, attention_head_dim=24, ffn_dim=64)
        if name == "tiny-noimage":
            cfg.update(image_dim=None, added_kv_proj_dim=None)
        if name == "tiny-ti2v":
            cfg.update(image_dim=None, added_kv_proj_dim=None, in_channels=48, out_channels=48)
            return cfg, 16, 9, (64, 64)
        return cfg, 8, 9, (64, 48)
    return KNOWN_MODELS[name]


# ---------------------------------------------------------------- one row (in its own process)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem(device) -> dict:
    import torch

    if device.type != "cuda":
        import resource

        return {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {"peak_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "reserved_peak_gib": torch.cuda.max_memory_reserved(device) / GiB}


def _reset(device):
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _inputs(cfg, vae_factor, frames, size, device, dtype_text):
    import torch

    from loraedit import method

    W, H = size
    T, h, w = method.latent_frames(frames), H // vae_factor, W // vae_factor
    g = torch.Generator().manual_seed(0)
    lat = cfg["out_channels"]
    x0 = torch.randn(1, lat, T, h, w, generator=g).to(device)
    cond = torch.randn(1, cfg["in_channels"] - lat, T, h, w, generator=g).to(device) if cfg["in_channels"] > lat else None
    text = torch.randn(1, 512, cfg["text_dim"], generator=g).to(device)
    image = torch.randn(1, 257, cfg["image_dim"], generator=g).to(device) if cfg.get("image_dim") else None
    tokens = T * (h // cfg["patch_size"][1]) * (w // cfg["patch_size"][2])
    return x0, cond, text, image, tokens


def _build(cfg, mode_name, device, for_training=True):
    from loraedit import memory as mem
    from loraedit import models

    mode = mem.parse_mode(mode_name)
    model = mem.random_transformer(cfg, mode, device)
    model._memory_mode = mode
    if for_training:
        models.add_lora(model, 16, 16, models.DEFAULT_LORA_TARGETS)
        models.setup_training(model, device)
        model.train()
    return model, mode


def choose_mode(cfg, target_gib: float, measured: dict, predictions: dict) -> str:
    """The fastest mode expected under `target_gib`: the memory model's choice when the predictions
    file has one, else from the peaks measured by the earlier rows (swap sized from bf16-offload)."""
    chosen = predictions.get("choose", {}).get(f"{target_gib:g}")
    if chosen:
        return chosen
    order = ["bf16", "bf16-offload", "fp8", "fp8-offload"]
    for name in order:
        peak = measured.get(name)
        if peak is not None and peak <= target_gib:
            return name
    base = measured.get("bf16-offload")
    n = cfg["num_layers"]
    if base is None:
        return f"bf16-swap{n}"
    block_gib = _block_bytes(cfg) / GiB
    need = int((base - target_gib) / block_gib) + 3  # + the blocks in flight
    return f"bf16-swap{max(1, min(n, need))}"


def _block_bytes(cfg) -> int:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f = cfg["ffn_dim"]
    n = 8 * d * d + 2 * d * f + (2 * d * d if cfg.get("added_kv_proj_dim") else 0)
    return 2 * n


def run_train(row, device, steps: int, warmup: int) -> dict:
    import torch

    from loraedit import models, train

    cfg, vf, frames, size = row_spec(row)
    mode_name = row["mode"]
    if row.get("cap_gib") and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, row["cap_gib"] * GiB / total), 0)
    out = {"mode": mode_name, "frames": frames, "size": f"{size[0]}x{size[1]}"}
    _reset(device)
    t = time.perf_counter()
    model, mode = _build(cfg, mode_name, device)
    _sync(device)
    out["build_s"] = time.perf_counter() - t
    out["weights_gib"] = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
    x0, cond, text, image, tokens = _inputs(cfg, vf, frames, size, device, mode.compute_dtype)
    out["tokens"] = tokens
    params = models.lora_parameters(model)
    opt = train.make_optimizer(params.values(), 1e-4, 0.01)
    expand = cond is None  # TI2V: per-token timesteps, no condition channels

    def step(s):
        g = train.step_generator(0, s)
        sigma = torch.rand(1, generator=g).clamp(1e-3, 1 - 1e-3).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        if not expand:
            return train.training_step(model, opt, x0, cond, text, image, sigma, noise, 1.0)
        x_t = sigma.view(-1, 1, 1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1, 1, 1)) * x0
        ts = (sigma * 1000).expand(1, tokens).clone()
        pred = model(hidden_states=x_t.to(mode.compute_dtype), timestep=ts, encoder_hidden_states=text.to(mode.compute_dtype), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = row.get("steps", steps)
    losses = []

    def timed(first: int, n: int) -> list[float]:
        times = []
        for s in range(first, first + n):
            _sync(device)
            t = time.perf_counter()
            losses.append(step(s))
            _sync(device)
            times.append(time.perf_counter() - t)
        return times

    times = timed(0, warmup + steps)[warmup:]
    out.update(_mem(device))
    out["s_per_step"] = sorted(times)[len(times) // 2]
    out["step_times"] = times
    if row.get("compile"):  # the same model and optimizer, now with its repeated blocks compiled
        from loraedit import models as _models

        _save_partial(out)  # if compiling runs past the row's time, the uncompiled figures still come back

        out["uncompiled_s_per_step"] = out["s_per_step"]
        out["uncompiled_peak_gib"] = out.get("peak_gib")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            out["compiled_blocks"] = len(_models.speed_up(model, device, "auto", True))
            first = timed(warmup + steps, 1)[0]  # compiles forward and backward graphs
            times = timed(warmup + steps + 1, steps)
            compiled = {"compile_s": first - out["uncompiled_s_per_step"], **_mem(device), "s_per_step": sorted(times)[len(times) // 2],
                        "step_times": times}
            out.update(compiled, speedup=out["uncompiled_s_per_step"] / compiled["s_per_step"])
        except Exception as exc:  # noqa: BLE001 — a compile failure (or OOM) is this row's finding; the uncompiled figures stay
            out["compile_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            out["compile_traceback"] = traceback.format_exc()[-3000:]
    out["loss_finite"] = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    runner = getattr(model, "_block_runner", None)
    if runner is not None:
        out["swap_gib_per_step"] = runner.bytes_moved / GiB / (warmup + steps)
    flops = _step_flops(cfg, tokens, image is not None)
    out["tflop_per_step"] = flops / 1e12
    peak = _peak_tflops(device)
    if peak:
        out["mfu"] = flops / out["s_per_step"] / (peak * 1e12)
    return out


def _save_partial(out: dict) -> None:
    path = os.environ.get("GPU_CHECK_PARTIAL")
    if path:
        Path(path).write_text(json.dumps({"partial": True, **out}, default=str))


def _step_flops(cfg, tokens: int, image: bool) -> float:
    """Matmul FLOPs of a checkpointed training step (forward + recompute + backward = 4 forwards)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f = cfg["ffn_dim"]
    L = tokens
    ctx = 512 + (257 if image else 0)
    lin = 2 * L * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * ctx * 2 * d * d  # q,k,v,o self; q,o cross; ffn; cross k,v
    att = 4 * L * L * d + 4 * L * ctx * d
    return cfg["num_layers"] * 4 * (lin + att)


def _peak_tflops(device):
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run_render(row, device, steps: int) -> dict:
    import torch
    from diffusers import UniPCMultistepScheduler

    from loraedit import method

    cfg, vf, frames, size = row_spec(row)
    _reset(device)
    model, mode = _build(cfg, row["mode"], device, for_training=True)  # a LoRA as at render (unfused)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x0, cond, text, image, tokens = _inputs(cfg, vf, frames, size, device, mode.compute_dtype)
    if cond is None:  # TI2V: a token condition (keep channel + condition latents), the stock first-frame keep
        keep = method.ti2v_stock_keep(frames, x0.shape[3], x0.shape[4]).to(device)
        cond = method.ti2v_condition(torch.randn_like(x0), keep)
    negative = torch.randn_like(text)
    noise = torch.randn_like(x0)
    out = {"mode": row["mode"], "tokens": tokens, "frames": frames, "size": f"{size[0]}x{size[1]}"}
    steps = row.get("steps", steps)
    ran = {"tail": 0, "head": 0}  # block calls that computed (the cache skips the tail blocks' work)
    model.blocks[0].ffn.register_forward_hook(lambda *a: ran.__setitem__("head", ran["head"] + 1))
    model.blocks[-1].ffn.register_forward_hook(lambda *a: ran.__setitem__("tail", ran["tail"] + 1))
    results = {}
    for variant in row.get("variants", ["sequential"]):
        if variant == "cache":
            from loraedit import models as _models

            _models.enable_render_cache(model, "first-block", 0.05)
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
        _reset(device)
        ran.update(tail=0, head=0)
        marks = []

        def on_step(i):
            _sync(device)
            marks.append(time.perf_counter())

        _sync(device)
        t0 = time.perf_counter()
        try:
            # a warm-up step, then `steps` timed ones; the cache variant runs a whole short schedule
            n = 1 + steps if variant != "cache" else max(1 + steps, 4)
            method.sample_latents(model, sched, noise, cond, text, negative, image, n, 5.0, on_step=on_step,
                                  batch_cfg=variant != "sequential")
        except torch.OutOfMemoryError as exc:
            results[variant] = {"status": "OOM", "error": str(exc).splitlines()[0][:200], **_mem(device)}
            continue
        times = [b - a for a, b in zip([t0] + marks[:-1], marks)][1:]
        results[variant] = {"s_per_step": sorted(times)[len(times) // 2], "step_times": times, **_mem(device),
                            "tail_runs_per_head_run": ran["tail"] / max(1, ran["head"])}
    out["variants"] = results
    base = results.get(row.get("variants", ["sequential"])[0], {})
    out["s_per_step"] = base.get("s_per_step", float("nan"))
    out.update({k: v for k, v in base.items() if k.endswith("gib")})
    return out


def run_attention(row, device, steps: int) -> dict:
    """One block forward+backward (LoRA on, bf16) at full length, per attention backend."""
    import torch
    from diffusers.models.attention_dispatch import attention_backend

    cfg, vf, frames, size = model_spec(row["model"])
    cfg = {**cfg, "num_layers": 1}
    _reset(device)
    model, mode = _build(cfg, "bf16", device)
    x0, cond, text, image, tokens = _inputs(cfg, vf, frames, size, device, mode.compute_dtype)
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    block = model.blocks[0]
    hidden = torch.randn(1, tokens, d, device=device, dtype=torch.bfloat16)
    enc = torch.randn(1, 512 + (257 if image is not None else 0), d, device=device, dtype=torch.bfloat16)
    temb = torch.randn(1, 6, d, device=device, dtype=torch.float32)
    W, H = size
    probe = torch.zeros(1, 1, x0.shape[2], x0.shape[3], x0.shape[4], device=device)
    rope = model.rope(probe)
    backends = ["native", "_native_flash", "_native_cudnn", "_native_efficient", "_flash_3", "flash", "sage"]
    if device.type != "cuda":
        backends = ["native", "_native_math"]
    out = {"tokens": tokens, "backends": {}}
    for b in backends:
        try:
            with attention_backend(b):
                times = []
                for s in range(1 + steps):
                    _sync(device)
                    t = time.perf_counter()
                    y = block(hidden, enc, temb, rope)
                    y.float().square().mean().backward()
                    _sync(device)
                    times.append(time.perf_counter() - t)
            out["backends"][b] = {"block_fwd_bwd_s": sorted(times[1:])[len(times[1:]) // 2]}
        except Exception as exc:  # noqa: BLE001 — an unavailable backend is a row entry, not a failure
            out["backends"][b] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
        for p in model.parameters():
            p.grad = None
    return out


def run_vae(row, device, steps: int) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    from loraedit.memory import _random_init

    _, vf, frames, size = model_spec(row["model"])
    if row["model"].startswith("tiny"):
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    else:
        with torch.device("meta"):
            vae = AutoencoderKLWan()
        vae.to_empty(device=device)
        _random_init(list(vae.named_parameters()), 0)
    vae = vae.to(device).eval()
    W, H = size
    video = torch.rand(1, 3, frames, H, W, device=device) * 2 - 1
    out = {"frames": frames, "size": f"{W}x{H}", "dtype": "fp32"}
    for tiled in (False, True):
        if tiled:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        key = "tiled" if tiled else "untiled"
        for what in ("encode", "decode"):
            try:
                _reset(device)
                with torch.no_grad():
                    if what == "encode":
                        _sync(device)
                        t = time.perf_counter()
                        z = vae.encode(video).latent_dist.mode()
                        _sync(device)
                    else:
                        z = torch.randn(1, 16, (frames - 1) // 4 + 1, H // vf, W // vf, device=device)
                        _reset(device)
                        t = time.perf_counter()
                        vae.decode(z, return_dict=False)
                        _sync(device)
                out[f"{what}_{key}"] = {"s": time.perf_counter() - t, **_mem(device)}
            except torch.OutOfMemoryError:
                out[f"{what}_{key}"] = {"error": "OOM"}
    return out


RUNNERS = {"train": run_train, "render": run_render, "attention": run_attention, "vae": run_vae}


def run_row(row: dict, device_name: str, steps: int, warmup: int) -> dict:
    import torch

    device = torch.device(device_name)
    try:
        fn = RUNNERS[row["kind"]]
        result = fn(row, device, steps, warmup) if row["kind"] == "train" else fn(row, device, steps)
        return {"status": "ok", **result}
    except torch.OutOfMemoryError as exc:
        return {"status": "OOM", "error": str(exc).splitlines()[0][:300], **_mem(device)}
    except Exception as exc:  # noqa: BLE001 — one row's failure is that row's result
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-3000:]}


# ---------------------------------------------------------------- the parent: schedule, isolate, report


PREDICTIONS = ROOT / "bench" / "results" / "gpu_check_predictions.json"


def pred_key(row: dict) -> str:
    return f"{row['model']}|{row['kind']}|{row.get('mode')}" + (f"|{row['frames']}" if row.get("frames") else "")


def predict(row: dict, predictions: dict) -> dict | None:
    """The memory model's prediction for a row, from the predictions file (computed beforehand on a
    CPU with --write-predictions, so the GPU's time is spent measuring)."""
    rows = predictions.get("rows", {})
    pred = rows.get(pred_key(row))
    if pred is not None and pred_key(row) + "|cfg2" in rows:
        pred = {**pred, "cfg2": rows[pred_key(row) + "|cfg2"]}
    return pred


def write_predictions(path: Path, tiny: bool) -> None:
    """Run the memory model for every train/render row (and the capped rows' choices); CPU only."""
    from loraedit import plan

    out = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "choose": {}}  # keep what is there: add the missing rows
    for row in rows_for(tiny):
        if row["kind"] not in ("train", "render"):
            continue
        if row["kind"] == "render" and "batched" in row.get("variants", ()):
            cfg, vf, frames, (W, H) = row_spec(row)
            key = pred_key(row) + "|cfg2"
            if key not in out["rows"]:
                out["rows"][key] = plan.predict(cfg, row["mode"], ((frames - 1) // 4 + 1, H // vf, W // vf), kind="render", cfg_batch=2)
                print(row["name"], "batched CFG", out["rows"][key], flush=True)
        if pred_key(row) in out["rows"] and row.get("mode") != "auto":
            continue
        cfg, vf, frames, (W, H) = row_spec(row)
        latent = ((frames - 1) // 4 + 1, H // vf, W // vf)
        if row.get("mode") == "auto":
            chosen = plan.choose(cfg, latent, row["target_gib"])
            out["choose"][f"{row['target_gib']:g}"] = chosen["chosen"]
            row = {**row, "mode": chosen["chosen"]}
        kind = "train" if row["kind"] == "train" else "render"
        r = plan.predict(cfg, row["mode"], latent, kind=kind)
        out["rows"][pred_key(row)] = r
        print(row["name"], row["mode"], {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def fmt(row: dict, res: dict, pred: dict | None) -> str:
    st = res.get("status")
    name = row["name"] + (f" [{res.get('mode')}]" if row.get("mode") == "auto" and res.get("mode") else "")
    if st != "ok":
        got = f" (before it: {res['s_per_step']:.3f} s/step uncompiled)" if "s_per_step" in res else ""
        return f"{name:44} {st}: {res.get('error', '')[:100]}{got}"
    p = "" if not pred or "error" in pred else f"   predicted peak {pred.get('peak_gib', float('nan')):6.1f} GiB"
    if pred and pred.get("cfg2"):
        p += f" (batched CFG {pred['cfg2'].get('peak_gib', float('nan')):.1f})"
    if row["kind"] in ("train", "render"):
        peak = res.get("peak_gib", res.get("host_peak_gib", float("nan")))
        mfu = f"  MFU {res['mfu'] * 100:4.1f}%" if "mfu" in res else ""
        extra = ""
        if "compile_error" in res:
            extra = f"  (uncompiled; --compile failed: {res['compile_error'][:120]})"
        if "compile_s" in res:
            extra = (f"  (uncompiled {res['uncompiled_s_per_step']:.3f} s/step, compile {res['compile_s']:.0f} s, "
                     f"{res['speedup']:.2f}x, {res['compiled_blocks']} blocks)")
        if "variants" in res:
            extra = "  " + "  ".join(
                f"{k}: {v['s_per_step']:.3f} s/step {v.get('peak_gib', v.get('host_peak_gib', 0)):.1f} GiB"
                + (f" tail ran {v['tail_runs_per_head_run']:.0%}" if k == "cache" else "") if "s_per_step" in v else f"{k}: {v.get('status')}"
                for k, v in res["variants"].items())
        return f"{name:44} {res['s_per_step']:8.3f} s/step  peak {peak:6.1f} GiB{mfu}{p}{extra}"
    if row["kind"] == "attention":
        return f"{name:44} " + "  ".join(f"{b}: {v['block_fwd_bwd_s'] * 1000:.1f} ms" if "block_fwd_bwd_s" in v else f"{b}: n/a"
                                         for b, v in res["backends"].items())
    if row["kind"] == "vae":
        parts = []
        for k in ("encode_untiled", "decode_untiled", "encode_tiled", "decode_tiled"):
            v = res.get(k, {})
            parts.append(f"{k} {v['s']:.1f}s/{v.get('peak_gib', v.get('host_peak_gib', 0)):.1f}GiB" if "s" in v else f"{k} {v.get('error', '-')}")
        return f"{name:44} " + "  ".join(parts)
    return f"{name:44} {res}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results (the log goes beside it, .log)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (the test)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip the rows that would not finish in this many seconds")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up step)")
    ap.add_argument("--rows", default=None, help="comma-separated name starts: run only the rows whose names start with one")
    ap.add_argument("--in-process", action="store_true", help="run the rows in this process (faster on the CPU; no crash isolation)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--predictions", default=str(PREDICTIONS), help="the memory model's predictions to print beside the figures")
    ap.add_argument("--write-predictions", action="store_true", help="compute the predictions file (CPU, minutes) and exit")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row (JSON) in a child
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.row is not None:  # child
        os.environ["GPU_CHECK_PARTIAL"] = a.result + ".partial"
        res = run_row(json.loads(a.row), a.device, a.steps, 1)
        Path(a.result).write_text(json.dumps(res))
        return

    if a.write_predictions:
        write_predictions(Path(a.predictions), a.tiny)
        return
    predictions = {}
    if Path(a.predictions).is_file() and not a.tiny:
        predictions = json.loads(Path(a.predictions).read_text())
    t_start = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    logf = open(log_path, "w")

    def say(line: str) -> None:
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    import torch

    device = a.device or ("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    info = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "torch": torch.__version__,
            "cuda_total_gib": torch.cuda.get_device_properties(0).total_memory / GiB if device.startswith("cuda") else None,
            "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        pass
    report = {"info": info, "rows": []}

    def save():
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, out)

    save()
    say(f"gpu_check · {info} · budget {a.budget_s:.0f} s")
    rows = rows_for(a.tiny)
    if a.rows:
        keys = [k.strip() for k in a.rows.split(",")]
        rows = [r for r in rows if any(r["name"].startswith(k) for k in keys)]
    measured: dict[str, float] = {}
    for row in rows:
        elapsed = time.perf_counter() - t_start
        left = a.budget_s - elapsed
        est = 2 if a.tiny else row["est"]
        if left < est:
            say(f"{row['name']:44} skipped: {left:.0f} s of budget left, the row needs ~{est} s")
            report["rows"].append({**row, "status": "skipped"})
            save()
            continue
        if row.get("mode") == "auto":
            cfg = model_spec(row["model"])[0]
            target = row["target_gib"] if not a.tiny else 1e9
            row = {**row, "mode": choose_mode(cfg, target, measured, predictions)}
        pred = predict(row, predictions)
        t = time.perf_counter()
        if a.in_process:
            res = run_row(row, device, a.steps, 1)
        else:
            res_path = out.with_suffix(f".row{len(report['rows'])}.json")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--row", json.dumps(row),
                   "--result", str(res_path), "--device", device, "--steps", str(a.steps)]
            try:
                # a hung row must not eat the others' time: at most 3x its estimate
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left if a.tiny else max(30.0, min(left, 3 * est + 30)))
                res = json.loads(res_path.read_text()) if res_path.is_file() else {
                    "status": "crash", "error": f"exit {proc.returncode}: {(proc.stderr or '')[-400:]}"}
                if proc.stderr.strip():
                    logf.write(f"--- stderr of {row['name']}:\n{proc.stderr[-4000:]}\n")
            except subprocess.TimeoutExpired:
                partial = Path(str(res_path) + ".partial")
                res = {**(json.loads(partial.read_text()) if partial.is_file() else {}), "status": "timeout", "error": f"over {left:.0f} s"}
            res_path.unlink(missing_ok=True)
            Path(str(res_path) + ".partial").unlink(missing_ok=True)
        res["row_s"] = time.perf_counter() - t
        if res.get("status") == "ok" and row["kind"] == "train" and not row.get("cap_gib") and row["model"] in ("tiny", "wan2.1-i2v-14b-480p"):
            measured[row["mode"]] = res.get("peak_gib", res.get("host_peak_gib"))
        report["rows"].append({**row, "prediction": pred, **res})
        save()
        say(fmt(row, res, pred))
        if res.get("traceback"):
            logf.write(res["traceback"] + "\n")
    report["total_s"] = time.perf_counter() - t_start
    save()
    say(f"done in {report['total_s']:.0f} s → {out} (log {log_path})")


if __name__ == "__main__":
    main()
