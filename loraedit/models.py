"""Loading the Wan I2V components through diffusers, attaching the LoRA (peft), saving it.

Everything about model folders, dtypes and LoRA formats lives here, so the stages above deal
only in tensors.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraedit import family
from loraedit.errors import InputError
from loraedit.files import atomic_output

# every linear layer of each block except the image key/value projections (add_k_proj/add_v_proj)
from loraedit.settings import DEFAULT_LORA_TARGETS  # noqa: E402,F401  (declared with the --lora-targets flag)
ADAPTER = "edit"
log = logging.getLogger("loraedit")

# diffusers module path → original Wan (and ComfyUI) module path, inside blocks.N
_WAN_NAMES = [
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"), ("attn2.to_out.0", "cross_attn.o"), ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu (slow) or check the driver")
    return torch.device(name)


def memory_mode(requested: str, device: torch.device, model: str | None = None, latent: tuple[int, int, int] | None = None,
                kind: str = "train", free_gib: float | None = None) -> str:
    """The memory mode to run in, decided before any weights load.

    CPU: 'auto' → fp32, other modes as asked. GPU: 'auto' → the fastest mode the memory model
    (loraedit.plan) predicts fits in the card's free memory for this model and latent size; an
    explicit mode that is predicted not to fit is refused in one line naming the mode that would.
    Without the model's config or the latent size, 'auto' falls back to the card's total size.
    """
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    if model is None or latent is None or not (Path(model) / "transformer" / "config.json").is_file():
        if requested != "auto":
            return requested
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        return "bf16" if total >= 48 else "fp8"
    free = torch.cuda.mem_get_info(device)[0] / 2**30 if free_gib is None else free_gib
    try:
        return fitting_mode(requested, transformer_config(model), tuple(latent), kind, free)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 — a failure of the prediction must not stop the run
        log.warning("memory model failed (%s: %s); choosing by the card's size", type(exc).__name__, exc)
        if requested != "auto":
            return requested
        return "bf16" if free >= 48 else "fp8-offload"


def plan_lines(model: str, frames: int, width: int, height: int, free_gib: float, gpu_name: str | None = None) -> list[str]:
    """The memory plan's short table for this clip: each mode's predicted training and render peak,
    whether it fits in `free_gib`, and the mode --memory auto takes (predictions are cached on disk,
    so a second run prints it at once)."""
    from loraedit import plan

    p = plan.plan(plan.spec_for(model, f"{width}x{height}", frames), free_gib, gpu_name)
    lines = [f"memory plan: {p['frames']} frames {p['size']} ({p['tokens']} tokens), {free_gib:.1f} GiB free on "
             f"{gpu_name or 'the GPU'} → {p['budget_gib']:.1f} GiB for tensors"]
    for m in p["modes"]:
        lines.append(f"  {m['name']:14} train {m['train_peak_gib']:6.1f} GiB  render {m['render_peak_gib']:6.1f} GiB  "
                     + ("fits" if m["fits"] else "does not fit"))
    lines.append(f"  --memory auto takes {p['chosen'] or 'none (use a smaller --size or fewer --frames)'}")
    return lines


def log_plan(model: str, prepared_plan: dict, device: torch.device) -> None:
    """On a GPU, log the memory plan's short table (at the start of train and edit); never fails a run."""
    if device.type != "cuda":
        return
    try:
        free = torch.cuda.mem_get_info(device)[0] / 2**30
        for line in plan_lines(model, prepared_plan["frames"], prepared_plan["width"], prepared_plan["height"], free,
                               torch.cuda.get_device_name(device)):
            log.info(line)
    except Exception as exc:  # noqa: BLE001 — the table is information, not a step of the run
        log.warning("memory plan not shown (%s: %s)", type(exc).__name__, exc)


def fitting_mode(requested: str, config: dict, latent: tuple[int, int, int], kind: str, free_gib: float) -> str:
    """'auto' → the fastest mode predicted to fit in `free_gib`; an explicit mode → itself if it fits."""
    from loraedit import plan

    budget = plan.budget_for(free_gib)
    size = f"this clip ({latent[0]} latent frames of {latent[2]}x{latent[1]})"
    if requested != "auto":
        peak = plan.cached_predict(config, requested, latent, kind=kind, count_flops=False)["peak_gib"]
        if peak <= budget:
            return requested
    chosen = plan.choose(config, latent, budget)["chosen"]
    if requested == "auto" and chosen:
        log.info("memory mode %s: the fastest predicted to fit in %.1f GiB free (`loraedit plan` shows all)", chosen, free_gib)
        return chosen
    if requested == "auto":
        raise InputError(f"--memory auto: no memory mode is predicted to fit in the {free_gib:.1f} GiB free on this GPU for {size}; "
                         "use a smaller --size or fewer --frames (`loraedit plan` shows every mode's memory)")
    raise InputError(f"--memory {requested}: predicted peak {peak:.1f} GiB does not fit in the {free_gib:.1f} GiB free on this GPU; "
                     + (f"use --memory {chosen} (or auto)" if chosen else "use a smaller --size or fewer --frames")
                     + " — `loraedit plan` shows every mode")


def hub_problem(repo_id: str, filename: str) -> str | None:
    """Why the hub id `repo_id` cannot be used now (None: it is in the local Hugging Face cache, or
    the hub has it and can be reached to download it). Asked before any work, so a mistyped folder
    ("models/toy" looks like a hub id) or a machine without network is one line, not a traceback
    after the frames were prepared, or minutes of retries."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "no such folder here, and it is not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
    try:
        model_info(repo_id, timeout=10)
    except GatedRepoError:
        return None  # downloading it asks for the login the user has (or says so itself)
    except RepositoryNotFoundError:
        return "no such folder here, and no such model on the Hugging Face hub"
    except Exception:  # noqa: BLE001 - httpx/requests connection errors, timeouts: no network
        return "no such folder here, and the Hugging Face hub cannot be reached to download it"
    return None


def check_model(path: str) -> str:
    """A local diffusers folder of a supported Wan image-to-video model (loraedit.family), or a hub
    id that is downloaded or can be (diffusers fetches it); anything else is refused in one line
    before weights load."""
    p = Path(path)
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
            problem = hub_problem(path, "model_index.json")
            if problem:
                raise InputError(f"--model {path}: {problem}; pass the folder of the Wan weights in diffusers layout "
                                 f"(e.g. `huggingface-cli download Wan-AI/Wan2.1-I2V-14B-480P-Diffusers --local-dir DIR`)")
            return path  # a hub id: diffusers fetches it
        raise InputError(f"{path}: no such model folder; pass {family.SUPPORTED}")
    if not (p / "model_index.json").is_file():
        raise InputError(f"{path}: not a diffusers model folder (no model_index.json); download the '-Diffusers' variant of the Wan I2V model")
    family.detect(p)
    return str(p)


def model_family(model: str) -> family.ModelFamily:
    """The family of `model` (a local folder or a hub id): loraedit.family.family_of."""
    return family.family_of(model)


def lora_folders(run_dir: str | Path, fam: family.ModelFamily) -> dict[str, Path]:
    """Where each expert's LoRA lives in a run: lora/ for a one-transformer model; lora/high_noise
    and lora/low_noise for a two-expert one (each loadable on its own with load_lora_weights)."""
    root = Path(run_dir) / "lora"
    if not fam.two_experts:
        return {family.HIGH: root}
    return {e: root / family.EXPERT_NAMES[e] for e in fam.experts}


def trained_lora_files(run_dir: str | Path) -> list[Path]:
    """The run's trained LoRA files in diffusers format: lora/, or one per expert below it."""
    return sorted((Path(run_dir) / "lora").glob("**/pytorch_lora_weights.safetensors"))


def lora_digest(run_dir: str | Path) -> str | None:
    """sha256 of the run's trained LoRA (one file), or of each expert's ('high_noise:…+low_noise:…');
    None when there is none."""
    from loraedit.files import sha256_file

    files = trained_lora_files(run_dir)
    if not files:
        return None
    if len(files) == 1 and files[0].parent == Path(run_dir) / "lora":
        return sha256_file(files[0])
    return "+".join(f"{f.parent.name}:{sha256_file(f)}" for f in files)


def wan_lora_name(fam: family.ModelFamily, expert: str) -> str:
    """The Wan / ComfyUI file's name: wan_lora.safetensors, or wan_lora_high_noise / _low_noise."""
    return f"wan_lora_{family.EXPERT_NAMES[expert]}.safetensors" if fam.two_experts else "wan_lora.safetensors"


def load_encoders(model: str, device: torch.device):
    """The pipeline without its transformer(s): tokenizer, UMT5, CLIP (Wan2.1), VAE, scheduler."""
    from diffusers import WanImageToVideoPipeline

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = WanImageToVideoPipeline.from_pretrained(model, transformer=None, transformer_2=None, torch_dtype=dtype)
    pipe.vae.to(torch.float32)  # the Wan VAE is numerically fragile in half precision
    pipe.to(device)
    onednn_conv3d(pipe.vae)
    return pipe


def load_vae(model: str, device: torch.device):
    from diffusers import AutoencoderKLWan

    return onednn_conv3d(AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).to(device).eval())


def _conv3d_forward(conv: torch.nn.Conv3d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if (input.device.type == "cpu" and input.dtype == torch.float32 and not torch.is_grad_enabled()
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)):
        try:
            return torch.mkldnn_convolution(input, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups)
        except RuntimeError:  # a CPU or build oneDNN does not serve: PyTorch's own choice, as without this
            pass
    return torch.nn.Conv3d._conv_forward(conv, input, weight, bias)


def onednn_conv3d(vae):
    """Run the VAE's 3-D convolutions through oneDNN on the CPU at any batch size (inference only).

    What PyTorch gets wrong here: for one video it picks its im2col fallback (slow_conv3d) whenever
    N·C·T·H ≤ 20480, a rule written for 4-D images, and every chunk of the Wan VAE's causal encode and
    decode of a small clip falls under it. A 17×128×128 decode of the toy model takes 5.4 s that way
    and 1.6 s through oneDNN, an encode 2.2 s and 0.75 s (1 thread; the same pixels to 5e-7). Real
    sizes already pass the rule; nothing changes on a GPU or while training. Returns the VAE."""
    if torch.backends.mkldnn.is_available():
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv3d):
                m._conv_forward = functools.partial(_conv3d_forward, m)
    return vae


# peak of an untiled Wan VAE decode at 832x480 (fp32, 49 frames; measured on an H200 by bench/gpu_check.py:
# encode 7.1 GiB, decode 9.3 GiB); it scales with the pixels of a frame (the VAE runs causally, a few frames at a time)
VAE_UNTILED_GIB_832x480 = 9.3


def tile_if_needed(vae, width: int, height: int, device: torch.device) -> bool:
    """Tile the VAE (diffusers' enable_tiling) when its untiled peak would not fit in free GPU memory."""
    if device.type != "cuda":
        return False
    need = VAE_UNTILED_GIB_832x480 * width * height / (832 * 480) * (2 if vae.config.z_dim > 16 else 1)
    free = torch.cuda.mem_get_info(device)[0] / 2**30
    if need > free - 1.0:
        vae.enable_tiling()
        return True
    vae.disable_tiling()
    return False


def load_scheduler(model: str, shift: float):
    """The model's own scheduler class and config, with the flow shift set to `shift`."""
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    cfg_path = Path(model) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {"_class_name": "UniPCMultistepScheduler"}
    cls = {"UniPCMultistepScheduler": UniPCMultistepScheduler, "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler}.get(cfg["_class_name"])
    if cls is None:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"])
    scheduler = cls.from_pretrained(model, subfolder="scheduler") if cfg_path.is_file() else cls(prediction_type="flow_prediction", use_flow_sigmas=True)
    key = "flow_shift" if "flow_shift" in scheduler.config else "shift"
    return cls.from_config(scheduler.config, **{key: shift})


def transformer_config(model: str, subfolder: str = "transformer") -> dict:
    return json.loads((Path(model) / subfolder / "config.json").read_text())


def load_transformer(model: str, device: torch.device, memory: str, subfolder: str = "transformer"):
    """The denoiser, frozen, in the storage of the memory mode (see loraedit.memory).

    memory: a mode name ('fp32', 'bf16', 'fp8', 'bf16-offload', 'fp8-swap20' …). The weights are
    read tensor by tensor from the safetensors files straight into their final dtype and place
    (fp8 storage included, swapped blocks into host memory): the full bf16 model is never built.
    A hub id (no local folder) goes through diffusers' from_pretrained.
    """
    from loraedit import memory as mem

    mode = mem.parse_mode(memory)
    folder = Path(model) / subfolder
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        transformer = mem.build_transformer(transformer_config(model, subfolder), mode, device, mem.safetensors_tensors(folder))
    else:
        from diffusers import WanTransformer3DModel

        transformer = WanTransformer3DModel.from_pretrained(model, subfolder=subfolder, torch_dtype=mode.compute_dtype)
        transformer.requires_grad_(False)
        if mode.weights == "fp8":
            transformer.enable_layerwise_casting(storage_dtype=mem.FP8, compute_dtype=mode.compute_dtype)
        transformer.to(device)
    transformer._memory_mode = mode
    return transformer


def compute_dtype_of(transformer) -> torch.dtype:
    mode = getattr(transformer, "_memory_mode", None)
    if mode is not None:
        return mode.compute_dtype
    w = transformer.blocks[0].attn1.to_q
    w = getattr(w, "base_layer", w).weight
    return torch.float32 if w.dtype == torch.float32 else torch.bfloat16


def add_lora(transformer, rank: int, alpha: float, targets: str = DEFAULT_LORA_TARGETS, seed: int = 0):
    """Attach a fresh LoRA (peft) to `transformer`, initialised from `seed` whatever the memory mode.

    The LoRA computes in the model's compute dtype (bf16 on a bf16 or fp8 model: no fp32 copies of
    the adapted layers' inputs); AdamW updates fp32 masters (`lora_parameters`).
    """
    from peft import LoraConfig

    from loraedit import memory as mem

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    transformer.add_adapter(config, adapter_name=ADAPTER)
    device = transformer.patch_embedding.weight.device
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(device, torch.float32)  # swapped blocks: the LoRA itself stays on the device
            p.requires_grad_(True)
    mem.reinit_lora(transformer, seed)
    mem.lora_to_compute_dtype(transformer, compute_dtype_of(transformer))
    return config


def setup_training(transformer, device: torch.device, checkpointing: bool | None = None):
    """Gradient checkpointing, activation offload and block swap as the memory mode asks (after add_lora)."""
    from loraedit import memory as mem

    mode = getattr(transformer, "_memory_mode", None) or mem.MemoryMode(weights="fp32", checkpointing=False)
    if checkpointing is not None and not (mode.offload or mode.swap):
        mode = mem.MemoryMode(mode.weights, checkpointing, mode.offload, mode.swap)
    return mem.install(transformer, mode, device)


def lora_parameters(transformer) -> dict[str, torch.nn.Parameter]:
    """The LoRA weights AdamW updates: the fp32 masters when the LoRA computes in a lower dtype."""
    masters = getattr(transformer, "_lora_masters", None)
    if masters is not None:
        return masters.masters
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """diffusers-style keys ('blocks.0.attn1.to_q.lora_A.weight'), no adapter name."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    masters = getattr(transformer, "_lora_masters", None)
    if masters is not None:  # the fp32 masters, not their rounded compute copies
        by_key = {n.replace(f".{ADAPTER}.", "."): m for n, m in masters.masters.items()}
        sd = {k: by_key.get(k, v) for k, v in sd.items()}
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def to_wan_format(sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers LoRA keys → original Wan / ComfyUI keys ('diffusion_model.blocks.0.self_attn.q.lora_A.weight')."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(lora_[AB])\.weight", key)
        if m is None:
            raise ValueError(f"unexpected LoRA key {key}")
        block, module, ab = m.groups()
        wan = dict(_WAN_NAMES).get(module)
        if wan is None:
            raise ValueError(f"no Wan name for {module}")
        base = f"diffusion_model.blocks.{block}.{wan}"
        out[f"{base}.{ab}.weight"] = value
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(transformer, folder: str | Path, rank: int, alpha: float, targets: str, wan_name: str = "wan_lora.safetensors") -> dict[str, Path]:
    """Write the LoRA twice: diffusers format with adapter metadata, and Wan/ComfyUI format (`wan_name`)."""
    from diffusers import WanImageToVideoPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = lora_state_dict(transformer)
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "init_lora_weights": True}
    diffusers_file = folder / "pytorch_lora_weights.safetensors"
    with atomic_output(diffusers_file) as tmp:
        # save_lora_weights writes into a directory under a fixed name: give it a scratch one
        scratch = tmp.parent / (tmp.name + ".d")
        WanImageToVideoPipeline.save_lora_weights(
            scratch, transformer_lora_layers=sd, transformer_lora_adapter_metadata=metadata, safe_serialization=True
        )
        (scratch / "pytorch_lora_weights.safetensors").replace(tmp)
        scratch.rmdir()
    wan_file = folder / wan_name
    with atomic_output(wan_file) as tmp:
        save_file(to_wan_format(sd, alpha), str(tmp), metadata={"format": "wan", "rank": str(rank), "alpha": str(alpha)})
    return {"diffusers": diffusers_file, "wan": wan_file}


def load_trained_lora(transformer, lora_file: str | Path, fuse: bool | None = None):
    """Put our saved diffusers-format LoRA on a bare transformer for sampling.

    The LoRA is created by peft from the file's own settings in the model's compute dtype (never
    in the fp8 storage dtype: peft would otherwise round it to float8, and the CPU has no float8
    matmul) and filled with the saved fp32 values. With bf16/fp32 weights it is then fused into the
    weights (diffusers' fuse_lora): sampling costs nothing extra per step. With fp8 storage it stays
    a separate bf16 LoRA: fusing would round the LoRA's small change of each weight (typically well
    under 1% of it) to float8's 3-bit mantissa steps (6%), which erases most of what was trained.
    """
    from diffusers import WanImageToVideoPipeline
    from peft import LoraConfig

    sd, metadata = WanImageToVideoPipeline.lora_state_dict(str(lora_file), return_lora_metadata=True)
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    meta = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    config = LoraConfig(r=int(meta["r"]), lora_alpha=float(meta["lora_alpha"]), target_modules=meta["target_modules"], init_lora_weights=True)
    transformer.add_adapter(config, adapter_name=ADAPTER)
    device, dtype = transformer.patch_embedding.weight.device, compute_dtype_of(transformer)
    params = {n.replace(f".{ADAPTER}.", "."): p for n, p in transformer.named_parameters() if "lora_" in n}
    if set(params) != set(sd):
        missing = sorted(set(sd) ^ set(params))
        raise InputError(f"{lora_file}: the LoRA does not match this model ({len(missing)} tensors differ, e.g. {missing[0]}); "
                         "render with the --model it was trained on")
    with torch.no_grad():
        for k, p in params.items():
            p.data = sd[k].to(device, dtype)
            p.requires_grad_(False)
    mode = getattr(transformer, "_memory_mode", None)
    if fuse is None:
        fuse = mode is None or (mode.weights != "fp8" and not mode.swap)
    if fuse:
        transformer.fuse_lora(adapter_names=[ADAPTER])
        transformer.unload_lora()
    return transformer


# ---------------------------------------------------------------- speed: attention backend, regional compile

# --attention name → diffusers' attention dispatcher backend (diffusers.models.attention_dispatch).
# auto = PyTorch's SDPA, which picks its kernel itself: on an H200 at 20,280 tokens one Wan2.1-14B block
# forward+backward took 114 ms with it, 117 with cuDNN, 156 with PyTorch's FlashAttention-2, 287 with the
# memory-efficient kernel (bench/gpu_check.py); FlashAttention-3 was not installed there.
ATTENTION_BACKENDS = {
    "auto": "native", "sdpa": "native", "math": "_native_math",
    "flash": "_native_flash", "cudnn": "_native_cudnn", "efficient": "_native_efficient",  # PyTorch's own kernels (CUDA)
    "flash-attn": "flash", "flash3": "_flash_3", "sage": "sage", "xformers": "xformers",  # separately installed packages
}
_CUDA_ONLY = {"flash", "cudnn", "efficient", "flash-attn", "flash3", "sage", "xformers"}


def check_attention(name: str, device: torch.device) -> str:
    """The diffusers backend of --attention `name`, refused in one line where this machine cannot run it
    (called before any weights load)."""
    backend = ATTENTION_BACKENDS[name]
    if name in _CUDA_ONLY and device.type != "cuda":
        raise InputError(f"--attention {name}: needs a CUDA GPU (this run is on {device.type}); use --attention auto")
    if name == "flash" and not torch.backends.cuda.is_flash_attention_available():
        raise InputError("--attention flash: this PyTorch build has no FlashAttention kernel; use --attention auto")
    if name == "flash" and torch.cuda.get_device_capability(device)[0] < 8:
        raise InputError("--attention flash: FlashAttention needs an Ampere or newer GPU; use --attention auto")
    if name == "cudnn" and not torch.backends.cudnn.is_available():
        raise InputError("--attention cudnn: this PyTorch build has no cuDNN; use --attention auto")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except RuntimeError as exc:
        raise InputError(f"--attention {name}: {str(exc).splitlines()[0]} Or use --attention auto") from None
    return backend


# internal knob, for tests: the torch.compile backend of --compile (inductor on a GPU; tests use aot_eager,
# which traces exactly as inductor does but skips code generation, so a CPU test stays fast)
COMPILE_BACKEND_ENV = "LORAEDIT_COMPILE_BACKEND"


def speed_up(transformer, device: torch.device, attention: str = "auto", compile_: bool = False) -> list[int]:
    """Set the attention backend and, with compile_, compile the repeated blocks (regional compilation,
    diffusers' `compile_repeated_blocks` rule: every module whose class is in `_repeated_blocks`).

    Call after the LoRA is added (or fused) and checkpointing / swap are set up. Blocks whose weights
    block swap streams in are left uncompiled: their forward hooks repoint parameters at another tensor
    on every call, which would recompile or break the graph each time. Returns the compiled blocks.
    """
    import os

    backend = check_attention(attention, device)
    if backend != "native":
        transformer.set_attention_backend(backend)
    else:  # diffusers also makes a set backend the process's default: undo an earlier model's choice
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    if not compile_:
        return []
    mode = getattr(transformer, "_memory_mode", None)
    if mode is not None and mode.weights == "fp8":
        log.warning("--compile: not with fp8 storage (diffusers' layerwise casting cannot be traced); running uncompiled")
        return []
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    runner = getattr(transformer, "_block_runner", None)
    swapped = runner.swapped if runner is not None else set()
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    compiled = []
    for i, block in enumerate(transformer.blocks):
        if type(block).__name__ in names and i not in swapped:
            block.compile(backend=backend, fullgraph=False)
            compiled.append(i)
    log.info("compiled %d of %d blocks (%s); the first step includes the compilation", len(compiled), len(transformer.blocks), backend)
    return compiled


def enable_render_cache(transformer, kind: str = "first-block", threshold: float = 0.05, stats: dict | None = None) -> None:
    """diffusers' first-block cache on the denoiser for sampling (off: nothing).

    At each call the first block runs; when its output's residual changed by less than `threshold`
    (relative mean absolute change) since the last full call, the other blocks are skipped and their
    last residual is reused. The sampler names each call (`cache_context`: cond, uncond, or both as one
    batch), so the conditional and unconditional predictions never share a cache.
    """
    if kind == "off":
        return
    from diffusers.hooks import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    transformer._render_cache = kind
    if stats is not None:  # calls of the denoiser, and those that ran every block (the last block's work ran)
        stats.setdefault("calls", 0)
        stats.setdefault("full", 0)
        transformer.blocks[0].ffn.register_forward_hook(lambda *_: stats.__setitem__("calls", stats["calls"] + 1))
        transformer.blocks[-1].ffn.register_forward_hook(lambda *_: stats.__setitem__("full", stats["full"] + 1))


def cfg_fits_batched(model: str, subfolder: str, memory: str, latent: tuple[int, int, int], device: torch.device) -> bool:
    """Whether the two guidance calls can run as one batch of two: on a GPU when the memory model's
    render peak for a batch of two fits in the free memory (with plan.budget_for's margin); on the CPU
    always (host memory is not what limits a CPU render)."""
    if device.type != "cuda":
        return True
    from loraedit import plan

    try:
        need = plan.cached_predict(transformer_config(model, subfolder), memory, latent, kind="render", cfg_batch=2)["peak_gib"]
    except Exception as exc:  # noqa: BLE001 — without a prediction, the sequential calls are the safe choice
        log.warning("memory model failed for batched guidance (%s: %s); guidance runs as two calls", type(exc).__name__, exc)
        return False
    free = torch.cuda.mem_get_info(device)[0] / 2**30
    return need <= plan.budget_for(free)


def release_memory() -> None:
    """Return the memory of models the caller has just dropped (`del`) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by PyTorch, or on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
