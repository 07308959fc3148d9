"""Memory model: predicted peak memory and step time of each memory mode, without a GPU or weights.

The real configs of the supported base models are here too, so a plan (and the GPU check) needs
nothing downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MODE = re.compile(r"(fp32|bf16|fp8)(?:-(offload|swap(\d+)))?")


@dataclass(frozen=True)
class MemoryMode:
    """How the denoiser is held in memory (see loraedit.memory for the mechanisms)."""

    weights: str = "bf16"  # storage of the frozen base weights: fp32 | bf16 | fp8
    checkpointing: bool = True
    offload: bool = False  # checkpointed block inputs in host memory
    swap: int = 0  # the last `swap` blocks' frozen weights in host memory, streamed in per use

    @property
    def name(self) -> str:
        if self.swap:
            return f"{self.weights}-swap{self.swap}"
        return f"{self.weights}-offload" if self.offload else self.weights

    @property
    def compute_dtype(self):
        import torch

        return torch.float32 if self.weights == "fp32" else torch.bfloat16

    @property
    def storage_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[self.weights]


def parse_mode(name: str, checkpointing: bool | None = None) -> MemoryMode:
    """'bf16', 'fp8-offload', 'bf16-swap20' … → MemoryMode (ValueError for anything else)."""
    m = _MODE.fullmatch(name)
    if m is None or (m.group(3) is not None and int(m.group(3)) < 1):
        raise ValueError(f"unknown memory mode {name!r}: use auto, fp32, bf16, fp8, bf16-offload, fp8-offload, bf16-swapN or fp8-swapN "
                         "(N = blocks whose weights stay in host memory)")
    weights, extra, n = m.groups()
    swap = int(n) if n else 0
    offload = extra is not None  # swap implies offload: it is only worth it when memory is that short
    ckpt = True if offload else (weights != "fp32" if checkpointing is None else checkpointing)
    return MemoryMode(weights, ckpt, offload, swap)

WAN21_I2V_14B = dict(
    patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
)
# each of the two experts of Wan2.2-I2V-A14B: the 14B shape without the CLIP image branch
WAN22_I2V_A14B_EXPERT = {**WAN21_I2V_14B, "image_dim": None, "added_kv_proj_dim": None}
WAN22_TI2V_5B = dict(
    patch_size=[1, 2, 2], num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
# the Wan2.2 VAE (TI2V-5B): 16x spatial, 48 channels; the Wan2.1 VAE is AutoencoderKLWan's default config
WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)

# name → (transformer config, VAE spatial factor, default frames, default WxH)
KNOWN_MODELS = {
    "wan2.1-i2v-14b-480p": (WAN21_I2V_14B, 8, 49, (832, 480)),
    "wan2.1-i2v-14b-720p": (WAN21_I2V_14B, 8, 49, (1280, 720)),
    "wan2.2-i2v-a14b": (WAN22_I2V_A14B_EXPERT, 8, 49, (832, 480)),
    "wan2.2-ti2v-5b": (WAN22_TI2V_5B, 16, 121, (1280, 704)),
}


# ---------------------------------------------------------------- the simulation


class _LiveMemory:
    """A dispatch mode that counts the bytes of every live storage, on the device and on the host.

    Each op's outputs are looked at once per storage (views share one); a weak reference frees the
    bytes when the storage dies, so what autograd saves for backward stays counted exactly as long
    as autograd holds it. Peaks are of live tensors (what torch.cuda.max_memory_allocated reports).
    """

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = {"device": 0, "host": 0}
                self.peak = {"device": 0, "host": 0}
                self.seen = {}

            def track(self, t):
                import weakref

                import torch

                from loraedit import memory as mem

                if not isinstance(t, torch.Tensor):
                    return
                st = t.untyped_storage()
                key = id(st)
                if key in self.seen:
                    return
                where = "host" if mem._host_allocation else "device"
                n = st.nbytes()
                self.seen[key] = (where, n)
                self.live[where] += n
                self.peak[where] = max(self.peak[where], self.live[where])
                weakref.finalize(st, self.free, key)

            def free(self, key):
                where, n = self.seen.pop(key)
                self.live[where] -= n

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch.utils._pytree as pytree

                out = func(*args, **(kwargs or {}))
                for t in pytree.tree_leaves(out):
                    self.track(t)
                return out

            def reset_peak(self):
                self.peak = dict(self.live)

        return Mode()


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    import torch

    if attn_mask is not None:
        raise ValueError("the memory model simulates attention without a mask only")
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]


def simulate(config: dict, mode_name: str, latent: tuple[int, int, int], image_tokens: int = 257, kind: str = "train",
             rank: int = 16, cfg_batch: int = 1, count_flops: bool = True) -> dict:
    """One real training step (kind='train', after a first one so AdamW's state exists) or one
    sampling step with CFG (kind='render') of `config` in `mode_name`, on meta tensors.

    latent: (T, h, w) latent frames and size. Returns GiB: weights (device), peak (device), host
    (peak host-resident tensors: swapped weights, offloaded block inputs), and the step's FLOPs.
    """
    from unittest import mock

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from loraedit import memory as mem
    from loraedit import method, models, train

    GiB = 2**30
    mode = mem.parse_mode(mode_name)
    dev = torch.device("meta")
    T, h, w = latent
    lat = config["out_channels"]
    # meta tensors (shapes, dtypes, no data); attention as the flash kernel a GPU runs for bf16 (saves
    # q, k, v, out and the log-sum-exp, never the L×L weights that SDPA's meta fallback would build)
    with torch.device("meta"), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_sdpa), \
            _LiveMemory() as live:
        model = mem.random_transformer(config, mode, dev, seed=None)
        model._memory_mode = mode
        weights = live.live["device"]
        x0 = torch.randn(1, lat, T, h, w)
        cond = torch.randn(1, config["in_channels"] - lat, T, h, w) if config["in_channels"] > lat else None
        text = torch.randn(1, 512, config["text_dim"])
        image = torch.randn(1, image_tokens, config["image_dim"]) if config.get("image_dim") else None
        tokens = T * (h // config["patch_size"][1]) * (w // config["patch_size"][2])
        flops = FlopCounterMode(display=False)
        if kind == "train":
            models.add_lora(model, rank, rank)
            models.setup_training(model, dev)
            model.train()
            params = models.lora_parameters(model)
            # AdamW as train.make_optimizer, unfused (no fused kernel for meta tensors; same state)
            opt = torch.optim.AdamW(params.values(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, foreach=False)

            def step():
                sigma = torch.rand(1)
                noise = torch.randn(x0.shape)
                if cond is not None:
                    loss = method.velocity_loss(model, x0, cond, text, image, sigma, noise)
                else:  # TI2V: no condition channels, per-token timesteps
                    x_t = sigma * noise + (1 - sigma) * x0
                    pred = model(hidden_states=x_t.to(mode.compute_dtype), timestep=(sigma * 1000).expand(1, tokens),
                                 encoder_hidden_states=text.to(mode.compute_dtype), return_dict=False)[0]
                    loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0, foreach=False)
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()
            live.reset_peak()
            step()
            peak = dict(live.peak)
            if count_flops:
                with flops:  # a separate step: the counter's module hooks keep activations alive
                    step()
        else:
            model.eval()
            b = cfg_batch

            def sample_step():
                for _ in range(2 // b):  # CFG: two calls, or one call on a batch of two
                    xb = torch.cat([x0] * b)
                    if cond is not None:
                        method.predict_velocity(model, xb, torch.cat([cond] * b), torch.full((b,), 500.0), torch.cat([text] * b),
                                                None if image is None else torch.cat([image] * b), is_timestep=True)
                    else:
                        model(hidden_states=xb.to(mode.compute_dtype), timestep=torch.full((b, tokens), 500.0),
                              encoder_hidden_states=torch.cat([text] * b).to(mode.compute_dtype), return_dict=False)

            with torch.no_grad():
                live.reset_peak()
                sample_step()
                peak = dict(live.peak)
                if count_flops:
                    with flops:
                        sample_step()
        steps = (2 if kind == "train" else 1) + count_flops  # steps run, per-step figures below
        runner = getattr(model, "_block_runner", None)
        moved = runner.bytes_moved if runner is not None else 0
        stashed = runner.bytes_stashed if runner is not None else 0
        out = {"mode": mode.name, "kind": kind, "tokens": tokens, "weights_gib": weights / GiB, "peak_gib": peak["device"] / GiB,
               "host_gib": peak["host"] / GiB, "tflop": flops.get_total_flops() / 1e12,
               "moved_gib": moved / GiB / steps, "offloaded_gib": stashed / GiB / steps}
    return out


def predict(config: dict, mode_name: str, latent: tuple[int, int, int], kind: str = "train", rank: int = 16, cfg_batch: int = 1,
            count_flops: bool = True) -> dict:
    """`simulate` for the full depth, from two or three shallow copies of the model.

    Every quantity is linear in the number of blocks n and of swapped blocks s (each block adds
    its weights, LoRA, AdamW state and saved input; each swapped block moves its weights from the
    device to the host), so the full model's figures are solved exactly from simulations with
    2-4 blocks: seconds instead of minutes, and checked against the full simulation in the tests.
    """
    from loraedit import memory as mem

    mode = mem.parse_mode(mode_name)
    n = config["num_layers"]
    keys = ("weights_gib", "peak_gib", "host_gib", "tflop", "moved_gib", "offloaded_gib")

    def sim(layers: int, swap: int) -> dict:
        m = mode.name if not mode.swap else f"{mode.weights}-swap{swap}"
        return simulate({**config, "num_layers": layers}, m, latent, kind=kind, rank=rank, cfg_batch=cfg_batch, count_flops=count_flops)

    if n <= 4:  # shallow already: simulate it whole
        return {**sim(n, min(mode.swap, n)), "mode": mode.name}
    if not mode.swap:
        a, b = sim(2, 0), sim(3, 0)
        out = {k: a[k] + (b[k] - a[k]) * (n - 2) for k in keys}
    else:
        s = min(mode.swap, n)
        a, b, c = sim(3, 2), sim(4, 2), sim(4, 3)  # a→b: one more resident block; b→c: one of them swapped
        out = {k: a[k] + (b[k] - a[k]) * (n - 3) + (c[k] - b[k]) * (s - 2) for k in keys}
    return {**out, "mode": mode.name, "kind": kind, "tokens": a["tokens"]}


def cache_dir():
    """Where predictions are kept: $LORAEDIT_CACHE_DIR, else $XDG_CACHE_HOME/loraedit, else ~/.cache/loraedit (+ /plan)."""
    import os
    from pathlib import Path

    root = os.environ.get("LORAEDIT_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loraedit")
    return Path(root) / "plan"


def _code_version() -> str:
    """The memory model's own code and the libraries it simulates: a change of any makes older predictions stale."""
    import hashlib
    from pathlib import Path

    import diffusers
    import peft
    import torch

    h = hashlib.sha256(f"{torch.__version__}|{diffusers.__version__}|{peft.__version__}".encode())
    for f in ("plan.py", "memory.py", "method.py"):
        h.update((Path(__file__).parent / f).read_bytes())
    return h.hexdigest()[:16]


def cached_predict(config: dict, mode_name: str, latent: tuple[int, int, int], kind: str = "train", rank: int = 16,
                   cfg_batch: int = 1, count_flops: bool = False) -> dict:
    """`predict`, kept on disk keyed by the config, mode, latent size, kind, rank, batch and the code's
    version: a second run (or `loraedit plan` after an edit) is instant. A cache that cannot be read
    or written is ignored."""
    import hashlib
    import json

    from loraedit.files import read_json, write_json

    args = {"config": {k: v for k, v in sorted(config.items()) if not k.startswith("_")}, "mode": mode_name, "latent": list(latent),
            "kind": kind, "rank": rank, "cfg_batch": cfg_batch, "flops": count_flops, "code": _code_version()}
    key = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = cache_dir() / f"{key}.json"
    try:
        return read_json(path)["result"]
    except Exception:  # noqa: BLE001 — absent or unreadable: compute
        pass
    result = predict(config, mode_name, latent, kind=kind, rank=rank, cfg_batch=cfg_batch, count_flops=count_flops)
    try:
        write_json(path, {"args": args, "result": result})
    except OSError:
        pass
    return result


# fastest first: bf16 weights (exact) before fp8 storage (rounds the base weights), swap last
SPEED_ORDER = ("bf16", "bf16-offload", "fp8", "fp8-offload")


def choose(config: dict, latent: tuple[int, int, int], budget_gib: float, rank: int = 16) -> dict:
    """The fastest mode whose predicted training peak is within `budget_gib`.

    Returns {"chosen": name or None, "modes": {name: prediction}}; block swap is sized to the
    fewest swapped blocks that fit (solved from the same linear model as `predict`).
    """
    modes = {}
    for name in SPEED_ORDER:
        modes[name] = cached_predict(config, name, latent, rank=rank, count_flops=False)
        if modes[name]["peak_gib"] <= budget_gib:
            return {"chosen": name, "modes": modes}
    n = config["num_layers"]
    for weights in ("bf16", "fp8"):
        full = cached_predict(config, f"{weights}-swap{n}", latent, rank=rank, count_flops=False)
        fewer = cached_predict(config, f"{weights}-swap{max(2, n - 1)}", latent, rank=rank, count_flops=False) if n > 3 else full
        per_block = fewer["peak_gib"] - full["peak_gib"]  # device memory of one more resident block
        if full["peak_gib"] > budget_gib:
            modes[full["mode"]] = full
            continue
        keep = int((budget_gib - full["peak_gib"]) / per_block) if per_block > 0 else 0
        name = f"{weights}-swap{max(1, n - keep)}"
        modes[name] = cached_predict(config, name, latent, rank=rank, count_flops=False)
        return {"chosen": name, "modes": modes}
    return {"chosen": None, "modes": modes}


# ---------------------------------------------------------------- the plan: every mode for a model, size and card

# dense bf16 TFLOPS of common cards, and the share of it a checkpointed Wan step reaches (assumed
# until measured on the card: gpu_check's MFU row replaces it)
GPU_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "A6000": 155.0, "5090": 209.0}
ASSUMED_MFU = 0.45
HOST_LINK_GBS = 20.0  # practical pinned host↔device copy rate (PCIe 4.0 x16 ≈ 25 GB/s peak)
# beyond the live tensors predicted: CUDA context, cuBLAS/attention workspaces (1 GiB) and the caching
# allocator's fragmentation (5%)
MARGIN_GIB, MARGIN_SHARE = 1.0, 0.05


def budget_for(gpu_gib: float) -> float:
    return gpu_gib * (1 - MARGIN_SHARE) - MARGIN_GIB


@dataclass
class Spec:
    """What a plan is for: a transformer config and the latent size of the clip."""

    name: str
    config: dict
    latent: tuple[int, int, int]
    frames: int
    size: tuple[int, int]
    experts: int = 1


def spec_for(model: str, size: str | None, frames: int | None) -> Spec:
    """A model folder (config files are enough, no weights) or a known name → Spec."""
    import json
    from pathlib import Path

    from loraedit.errors import InputError

    key = model.lower().removesuffix("-diffusers").split("/")[-1]
    if key in KNOWN_MODELS:
        config, spatial, default_frames, default_size = KNOWN_MODELS[key]
        experts = 2 if key == "wan2.2-i2v-a14b" else 1
        name = key
    else:
        from loraedit.family import detect, own_working_size

        p = Path(model)
        if not p.is_dir():
            raise InputError(f"--model {model}: no such folder; give a Wan model folder (its config files are enough) or one of "
                             f"{', '.join(KNOWN_MODELS)}")
        fam = detect(p)
        cfg_path = p / fam.experts[0] / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"{cfg_path}: missing; the plan needs the transformer's config.json (weights are not needed)")
        config = json.loads(cfg_path.read_text())
        spatial, default_size, experts, name = fam.spatial, fam.default_size, len(fam.experts), f"{fam.name} ({p.name})"
        default_frames = 121 if fam.expand_timesteps else 49
        own = own_working_size(p)
        if own is not None:  # a model trained at its own size (the bundled toy model): plan for that, not the family's
            default_size, default_frames = own
    if size:
        try:
            W, H = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise InputError(f"--size {size}: give WIDTHxHEIGHT, e.g. 832x480") from None
    else:
        W, H = default_size
    unit = spatial * config["patch_size"][1]
    if W % unit or H % unit or W <= 0 or H <= 0:
        raise InputError(f"--size {W}x{H}: width and height must be positive multiples of {unit} for this model")
    frames = default_frames if frames is None else frames
    if frames < 1 or (frames - 1) % 4 or frames > 1001:
        raise InputError(f"--frames {frames}: must be 4k+1 between 1 and 1001 (e.g. 49)")
    return Spec(name, config, ((frames - 1) // 4 + 1, H // spatial, W // spatial), frames, (W, H), experts)


def plan(spec: Spec, gpu_gib: float | None, gpu_name: str | None = None, rank: int = 16) -> dict:
    """Every memory mode's predicted training and render peak, host RAM and step time; what fits.

    gpu_gib: the card's free memory (None: list the modes without choosing).
    """
    budget = None if gpu_gib is None else budget_for(gpu_gib)
    n = spec.config["num_layers"]
    names = list(SPEED_ORDER)
    swap_name = f"bf16-swap{n}"
    if budget is not None:
        chosen = choose(spec.config, spec.latent, budget, rank=rank)
        if chosen["chosen"] and "swap" in chosen["chosen"]:
            swap_name = chosen["chosen"]
    names.append(swap_name)
    tflops = next((v for k, v in GPU_TFLOPS.items() if gpu_name and k in gpu_name), GPU_TFLOPS["H100"])
    modes, renders = [], {}
    flop = None
    for name in names:
        train = cached_predict(spec.config, name, spec.latent, rank=rank, count_flops=flop is None)
        flop = train["tflop"] if flop is None else flop
        m = parse_mode(name)
        base = m.weights if m.offload and not m.swap else name  # offload is a training matter: render as the base mode
        if base not in renders:
            renders[base] = cached_predict(spec.config, base, spec.latent, kind="render", rank=rank, count_flops=False)
        render = renders[base]
        compute_s = flop / (tflops * ASSUMED_MFU)
        # offload moves each block input out and back; swap moves the weights in forward and backward;
        # both on a side stream, overlapped with compute
        link_s = (train["moved_gib"] + 2 * train["offloaded_gib"]) * 2**30 / (HOST_LINK_GBS * 1e9)
        step_s = max(compute_s, link_s) * (1.04 if m.weights == "fp8" else 1.0)  # fp8: casts per layer
        host = train["host_gib"]
        modes.append({
            "name": name, "train_peak_gib": round(train["peak_gib"], 4), "render_peak_gib": round(render["peak_gib"], 4),
            "weights_gib": round(train["weights_gib"], 4), "host_ram_gib": round(host + HOST_BASE_GIB, 4),
            "step_s": round(step_s, 2), "tflop_per_step": round(flop, 1),
            "fits": None if budget is None else bool(train["peak_gib"] <= budget and render["peak_gib"] <= budget),
        })
    fitting = [m for m in modes if m["fits"]]
    return {"model": spec.name, "frames": spec.frames, "size": f"{spec.size[0]}x{spec.size[1]}", "tokens": train["tokens"],
            "latent": list(spec.latent), "experts": spec.experts, "gpu_memory_gib": gpu_gib, "gpu": gpu_name or "H100 (assumed for step time)",
            "budget_gib": None if budget is None else round(budget, 2), "modes": modes, "chosen": fitting[0]["name"] if fitting else None}


HOST_BASE_GIB = 4.0  # the process itself: Python, torch, CUDA libraries, the encoded cache


def _gib(v: float, width: int) -> str:
    """GiB with the decimals a small model needs (a toy model's peaks are hundredths of a GiB)."""
    return f"{v:{width}.1f}" if v >= 1 else f"{v:{width}.3f}"


def format_plan(p: dict) -> str:
    lines = [f"{p['model']} · {p['frames']} frames {p['size']} ({p['tokens']} tokens) · "
             + (f"GPU {p['gpu_memory_gib']:.1f} GiB free → {p['budget_gib']:.1f} GiB for tensors" if p["gpu_memory_gib"] else "no GPU memory given")
             + (f" · two experts, one on the GPU at a time" if p["experts"] == 2 else ""),
             f"{'mode':14} {'train peak':>10} {'render peak':>11} {'host RAM':>9} {'s/step*':>8}  fits",
             ]
    for m in p["modes"]:
        fits = "-" if m["fits"] is None else ("yes" if m["fits"] else "no")
        lines.append(f"{m['name']:14} {_gib(m['train_peak_gib'], 8)} G {_gib(m['render_peak_gib'], 9)} G {m['host_ram_gib']:7.1f} G "
                     f"{m['step_s']:8.2f}  {fits}")
    lines.append(f"* estimated on {p['gpu']} at {ASSUMED_MFU:.0%} of its bf16 peak; peaks are live tensors "
                 f"(torch.cuda.max_memory_allocated), predicted from one simulated step")
    if p["gpu_memory_gib"]:
        lines.append(f"chosen by --memory auto: {p['chosen'] or 'none fits: use a smaller --size or fewer --frames'}")
    return "\n".join(lines)


def register(subparsers) -> None:
    help = "predict the GPU memory and step time of every memory mode, and which fit your card (no GPU or weights needed)"
    p = subparsers.add_parser("plan", help=help, description=help)
    p.add_argument("--model", required=True, help=f"model folder (its config files are enough) or one of: {', '.join(KNOWN_MODELS)}")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frames, 4k+1 (default: the model's, 49 for Wan2.1/A14B)")
    p.add_argument("--gpu-memory", dest="gpu_memory", type=float, default=None,
                   help="GiB of GPU memory to plan for (default: this machine's GPU's free memory, if it has one)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    import json

    from loraedit.errors import InputError

    spec = spec_for(args.model, args.size, args.frames)
    if args.gpu_memory is not None and not 0 < args.gpu_memory <= 4096:  # also nan and inf
        raise InputError(f"--gpu-memory {args.gpu_memory}: give the card's memory in GiB, e.g. 24")
    if args.rank < 1:
        raise InputError(f"--rank {args.rank}: must be at least 1")
    gpu_gib, gpu_name = args.gpu_memory, None
    import torch

    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(0)
        if gpu_gib is None:
            gpu_gib = torch.cuda.mem_get_info()[0] / 2**30
    result = plan(spec, gpu_gib, gpu_name, rank=args.rank)
    print(json.dumps(result) if args.json else format_plan(result))
    edit_frames = _edit_default_frames(args.model)
    if not args.json and args.frames is None and result["frames"] != edit_frames:
        # e.g. TI2V-5B: planned at its own 121 frames, while `edit` without --frames takes 49 (and --memory auto
        # picks for those), so the advice above is not what that edit gets
        print(f"note: this plans the model's own {result['frames']} frames; `loraedit edit` takes {edit_frames} unless "
              f"given --frames: `loraedit plan ... --frames {edit_frames}` plans for that")
    return 0


def _edit_default_frames(model: str) -> int:
    """The frames `loraedit edit` takes with this model and no --frames (cli.resolve)."""
    import dataclasses

    from loraedit.family import own_working_size
    from loraedit.settings import PrepareSettings

    own = own_working_size(model)
    if own is not None:
        return own[1]
    return int(next(f.default for f in dataclasses.fields(PrepareSettings) if f.name == "frames"))
