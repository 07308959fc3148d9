"""Training-step cost: our full step vs. a bare forward+backward of the same transformer.

    python bench/bench_train.py                      # CPU, tiny transformer (what CI machines can run)
    python bench/bench_train.py --wan14b --frames 49 --size 832x480 --memory bf16 fp8
                                                     # GPU: the real Wan2.1-I2V-14B shape, random weights

Prints, per memory mode: seconds per step of `train.training_step` (sampling σ and noise, the
velocity loss, backward, clipping, AdamW), of a bare forward+backward on the same input, their
ratio (the overhead of our loop; target ≤ 1.10), and peak GPU memory. Random weights cost the same
as real ones, so no checkpoint is needed. This is a benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraedit import method, train  # noqa: E402
from loraedit.models import DEFAULT_LORA_TARGETS, add_lora, lora_parameters  # noqa: E402
from loraedit.tiny import tiny_transformer_config  # noqa: E402

from loraedit.plan import WAN21_I2V_14B  # noqa: E402


def build(config: dict, device: torch.device, memory: str, checkpointing: bool | None):
    """The transformer built directly in its memory mode's dtype and place (never fp32 first), with a LoRA."""
    from loraedit import memory as mem
    from loraedit.models import setup_training

    mode = mem.parse_mode(memory)
    model = mem.random_transformer(config, mode, device)
    model._memory_mode = mode
    add_lora(model, 16, 16, DEFAULT_LORA_TARGETS)
    setup_training(model, device, checkpointing)
    model.train()
    return model


def timed(fn, device, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def measure(config: dict, device: torch.device, mode: str, checkpointing: bool, latent_shape, warmup: int, repeat: int):
    """(our step s, bare forward+backward s, peak GB) for one memory mode; the model dies with the call."""
    T, h, w = latent_shape
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build(config, device, mode, checkpointing)
    if device.type == "cuda":  # after the build: the peak of training, not of building
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, T, h, w, generator=g).to(device)
    cond = torch.randn(1, 20, T, h, w, generator=g).to(device)
    text = torch.randn(1, 512, config["text_dim"], generator=g).to(device)
    image = torch.randn(1, 257, config["image_dim"], generator=g).to(device) if config.get("image_dim") else None
    mem_mode = model._memory_mode
    params = lora_parameters(model)
    opt = train.make_optimizer(params.values(), 1e-4, 0.01)
    step_no = iter(range(10**9))

    def our_step():
        s = next(step_no)
        sg = train.step_generator(0, s)
        sigma = method.sample_sigma(1, "uniform", sg)
        noise = torch.randn(x0.shape, generator=sg).to(device)
        train.training_step(model, opt, x0, cond, text, image, sigma.to(device), noise, 1.0)

    sigma = torch.tensor([0.5], device=device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    x_t = (0.5 * noise + 0.5 * x0)
    dtype = mem_mode.compute_dtype
    inp = torch.cat([x_t, cond], 1).to(dtype)

    def bare():
        out = model(hidden_states=inp, timestep=sigma * 1000, encoder_hidden_states=text.to(dtype),
                    encoder_hidden_states_image=None if image is None else image.to(dtype), return_dict=False)[0]
        out.float().square().mean().backward()
        for p in params.values():  # the fp32 masters hold the gradients
            p.grad = None

    # interleaved, so drifts of the machine (clocks, other load) fall on both alike
    ours_t, base_t = [], []
    for _ in range(repeat):
        ours_t += timed(our_step, device, warmup, 1)
        base_t += timed(bare, device, warmup, 1)
    ours, base = statistics.median(ours_t), statistics.median(base_t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return ours, base, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wan14b", action="store_true", help="the real Wan2.1-I2V-14B transformer shape")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", default="128x128")
    ap.add_argument("--memory", nargs="+", default=None, help="memory modes to measure (fp32 bf16 fp8 bf16-offload fp8-swap20 …)")
    ap.add_argument("--checkpointing", choices=("on", "off", "auto"), default="auto")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = a.memory or (["bf16", "fp8"] if device.type == "cuda" else ["fp32"])
    config = WAN21_I2V_14B if a.wan14b else tiny_transformer_config(num_layers=4, num_attention_heads=4, attention_head_dim=32, ffn_dim=256)
    W, H = (int(v) for v in a.size.split("x"))
    T, h, w = method.latent_frames(a.frames), H // 8, W // 8
    checkpointing = {"on": True, "off": False}.get(a.checkpointing, True if device.type == "cuda" else None)
    print(f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'} · transformer "
          f"{'Wan2.1-I2V-14B shape' if a.wan14b else 'small'} · {a.frames} frames {W}x{H} → latents 16x{T}x{h}x{w} "
          f"({T * h * w // 4} tokens) · gradient checkpointing {dict([(True, 'on'), (False, 'off')]).get(checkpointing, 'as the mode says')}")
    print("ratio: our step / a bare forward+backward of the same mode (the overhead of our loop; target <= 1.10)")
    print(f"{'mode':14} {'train step s':>13} {'bare fwd+bwd s':>15} {'ratio':>6} {'peak GiB':>9}")
    for mode in modes:
        ours, base, peak = measure(config, device, mode, checkpointing, (T, h, w), a.warmup, a.repeat)
        print(f"{mode:14} {ours:13.3f} {base:15.3f} {ours / base:6.3f} {peak:9.1f}", flush=True)
    if device.type == "cpu":
        print("(no GPU here: run with --wan14b on a GPU for the real model's s/step and memory)")


if __name__ == "__main__":
    main()
