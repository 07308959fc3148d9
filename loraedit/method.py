"""The method, as pure functions over tensors (no files, no CLI, no model loading).

Conventions (see DESIGN.md §2):
  B batch, F pixel frames (F = 4k+1), T = (F-1)/4 + 1 latent frames, H×W pixels, h×w = H/8 × W/8.
  Pixel video: (B, 3, F, H, W) in [-1, 1].  Latents: (B, 16, T, h, w), normalised with the VAE's
  latents_mean/std.  Keep mask: 1 = keep what the condition video shows, 0 = generate.
  Condition (what the transformer gets after x_t): cat([M_cond (4), y (16)]) → (B, 20, T, h, w).
  Flow matching: x_t = σ·ε + (1-σ)·x0, v = ε - x0, transformer timestep = σ·1000.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TEMPORAL = 4  # pixel frames per latent frame (after the first)
SPATIAL = 8  # pixels per latent pixel

# Wan's default negative prompt (from the Wan2.1 repository's shared config)
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


# ---------------------------------------------------------------- masks and condition videos


def latent_keep_mask(edit: torch.Tensor) -> torch.Tensor:
    """(F, H, W) bool edit region (True = edit) → (F, h, w) float keep mask at latent resolution.

    Rule for a latent pixel partly inside the region: it is *generated* (0) if any of its 8×8
    pixels is in the region. The region can only grow by this, never shrink, so an edit is never
    silently cut off at its border (and the paper finds looser masks no worse).
    """
    Fr, H, W = edit.shape
    touched = F.max_pool2d(edit.float().view(Fr, 1, H, W), kernel_size=SPATIAL, stride=SPATIAL)
    return 1.0 - touched.view(Fr, H // SPATIAL, W // SPATIAL)


def pixel_keep_mask(keep_latent: torch.Tensor) -> torch.Tensor:
    """(F, h, w) latent keep mask → (F, H, W), each latent pixel's value on its 8×8 pixels."""
    return keep_latent.repeat_interleave(SPATIAL, dim=-2).repeat_interleave(SPATIAL, dim=-1)


def pack_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, 1, F, h, w) per-pixel-frame keep mask → M_cond (B, 4, T, h, w).

    Frame 0 is repeated 4 times so that every latent frame holds 4 pixel frames; latent frame j
    then carries pixel frames 4(j-1)+1 … 4j in channels 0…3 (frame 0 in all 4 channels of j=0).
    """
    B, _, Fr, h, w = keep.shape
    if (Fr - 1) % TEMPORAL:
        raise ValueError(f"frame count {Fr} is not 4k+1")
    first = keep[:, :, :1].repeat_interleave(TEMPORAL, dim=2)
    frames = torch.cat([first, keep[:, :, 1:]], dim=2)  # (B, 1, 4T, h, w)
    return frames.view(B, -1, TEMPORAL, h, w).transpose(1, 2)


def edit_plan(video: torch.Tensor, edit: torch.Tensor, keep_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-aware condition (DESIGN §3): keep everything outside the edit region, generate inside.

    video: (F, 3, H, W) in [-1, 1]; edit: (F, H, W) bool (True = edit region).
    keep_first: frame 0 is kept whole (the video sample); False for a single reference frame.
    Returns (condition video (F, 3, H, W), keep mask (F, h, w)); the condition video is zero
    (mid-grey) exactly where the keep mask says generate, snapped to the 8×8 latent grid.
    """
    keep = latent_keep_mask(edit)
    if keep_first:
        keep[0] = 1.0
    cond = video * pixel_keep_mask(keep).unsqueeze(1).to(video.dtype)
    return cond, keep


def stock_plan(first_frame: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock I2V condition (also the paper's naive baseline): keep frame 0, generate the rest.

    first_frame: (3, H, W) in [-1, 1] → (condition video (F, 3, H, W), keep mask (F, h, w)).
    """
    _, H, W = first_frame.shape
    cond = torch.zeros(frames, 3, H, W, dtype=first_frame.dtype)
    cond[0] = first_frame
    keep = torch.zeros(frames, H // SPATIAL, W // SPATIAL)
    keep[0] = 1.0
    return cond, keep


def with_first_frame(cond: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    """The render-time condition: the training condition video with frame 0 replaced by the edit."""
    out = cond.clone()
    out[0] = first_frame
    return out


def condition_tensor(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """y (B, 16, T, h, w) normalised condition latents, keep (F, h, w) → (B, 20, T, h, w)."""
    m = pack_keep_mask(keep[None, None].expand(y.shape[0], 1, *keep.shape)).to(y)
    return torch.cat([m, y], dim=1)


def normalize_latents(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (B, 16, T, h, w) → model space: (z - mean) / std."""
    return (z - mean.view(1, -1, 1, 1, 1).to(z)) / std.view(1, -1, 1, 1, 1).to(z)


def denormalize_latents(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return z * std.view(1, -1, 1, 1, 1).to(z) + mean.view(1, -1, 1, 1, 1).to(z)


# ---------------------------------------------------------------- training


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = sσ / (1 + (s-1)σ): spends more steps at high noise for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigma(n: int, mode: str, generator: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """Training noise levels σ ∈ (0, 1): 'uniform' (the paper), 'shifted', or 'logit-normal'."""
    if mode == "uniform":
        s = torch.rand(n, generator=generator)
    elif mode == "shifted":
        s = shift_sigma(torch.rand(n, generator=generator), shift)
    elif mode == "logit-normal":
        s = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}")
    return s.clamp(1e-4, 1 - 1e-4)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0, noise (B, 16, T, h, w), sigma (B,) → (x_t, target velocity v = ε - x0)."""
    s = sigma.view(-1, 1, 1, 1, 1).to(x0)
    return s * noise + (1 - s) * x0, noise - x0


def predict_velocity(transformer, x_t, condition, sigma_or_t, text, image=None, is_timestep=False):
    """One transformer call on the 36-channel input. `sigma_or_t`: σ (B,) unless is_timestep."""
    dtype = transformer.dtype
    t = sigma_or_t if is_timestep else sigma_or_t * 1000.0
    return transformer(
        hidden_states=torch.cat([x_t, condition], dim=1).to(dtype),
        timestep=t.expand(x_t.shape[0]) if t.ndim == 0 else t,
        encoder_hidden_states=text.to(dtype),
        encoder_hidden_states_image=None if image is None else image.to(dtype),
        return_dict=False,
    )[0]


def velocity_loss(transformer, x0, condition, text, image, sigma, noise) -> torch.Tensor:
    """The training objective: MSE between predicted and true velocity over the whole latent video."""
    x_t, v = noisy_latents(x0, noise, sigma)
    pred = predict_velocity(transformer, x_t, condition, sigma, text, image)
    return F.mse_loss(pred.float(), v.float())


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def sample_latents(transformer, scheduler, noise, condition, text, negative_text, image, steps: int,
                   guidance: float, on_step=None) -> torch.Tensor:
    """Denoise `noise` (B, 16, T, h, w) to clean latents with classifier-free guidance.

    The same loop as diffusers' WanImageToVideoPipeline (so without a LoRA and with the stock
    condition it gives the same output), written out so the condition can be any mask.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        v = predict_velocity(transformer, x, condition, t, text, image, is_timestep=True)
        if guidance > 1.0:
            v_uncond = predict_velocity(transformer, x, condition, t, negative_text, image, is_timestep=True)
            v = v_uncond + guidance * (v - v_uncond)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    return x


def latent_frames(frames: int) -> int:
    return (frames - 1) // TEMPORAL + 1


def is_valid_frame_count(frames: int) -> bool:
    return frames >= 1 and (frames - 1) % TEMPORAL == 0


def nearest_valid_frame_count(frames: int) -> int:
    return max(1, math.floor((frames - 1) / TEMPORAL) * TEMPORAL + 1)
