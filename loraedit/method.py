"""The method, as pure functions over tensors (no files, no CLI, no model loading).

Conventions (see DESIGN.md §2):
  B batch, F pixel frames (F = 4k+1), T = (F-1)/4 + 1 latent frames, H×W pixels, h×w = H/s × W/s
  with s the VAE's spatial factor (`spatial`: 8 for Wan2.1/A14B, 16 for the Wan2.2 VAE) and 4 the
  temporal one (`temporal`); the stages pass the model folder's factors (loraedit.family), the
  defaults are the Wan2.1 VAE's. C latent channels (16, or 48 for the Wan2.2 VAE).
  Pixel video: (B, 3, F, H, W) in [-1, 1].  Latents: (B, C, T, h, w), normalised with the VAE's
  latents_mean/std.  Keep mask: 1 = keep what the condition video shows, 0 = generate.
  Condition of a mask-channel model (Wan2.1, Wan2.2-A14B; what the transformer gets after x_t):
  cat([M_cond (4), y (C)]) → (B, 4+C, T, h, w).  Condition of Wan2.2-TI2V (expand_timesteps, no mask
  channels): cat([keep (1), y (C)]) → (B, 1+C, T, h, w) at latent resolution (see the TI2V section).
  Flow matching: x_t = σ·ε + (1-σ)·x0, v = ε - x0, transformer timestep = σ·1000.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

TEMPORAL = 4  # Wan VAEs' pixel frames per latent frame (after the first): the default of `temporal`
SPATIAL = 8  # Wan2.1 VAE's pixels per latent pixel: the default of `spatial`; Wan2.2's is 16

# Wan's default negative prompt (from the Wan2.1 repository's shared config)
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


# ---------------------------------------------------------------- masks and condition videos


def latent_keep_mask(edit: torch.Tensor, spatial: int = SPATIAL) -> torch.Tensor:
    """(F, H, W) bool edit region (True = edit) → (F, H/spatial, W/spatial) float keep mask.

    Rule for a latent pixel partly inside the region: it is *generated* (0) if any of its
    spatial×spatial pixels is in the region. The region can only grow by this, never shrink, so an
    edit is never silently cut off at its border (and the paper finds looser masks no worse).
    """
    Fr, H, W = edit.shape
    touched = F.max_pool2d(edit.float().view(Fr, 1, H, W), kernel_size=spatial, stride=spatial)
    return 1.0 - touched.view(Fr, H // spatial, W // spatial)


def pixel_keep_mask(keep_latent: torch.Tensor, spatial: int = SPATIAL) -> torch.Tensor:
    """(F, h, w) latent keep mask → (F, H, W), each latent pixel's value on its spatial×spatial pixels."""
    return keep_latent.repeat_interleave(spatial, dim=-2).repeat_interleave(spatial, dim=-1)


def pack_keep_mask(keep: torch.Tensor, temporal: int = TEMPORAL) -> torch.Tensor:
    """(B, 1, F, h, w) per-pixel-frame keep mask → M_cond (B, 4, T, h, w) (4 = `temporal`).

    Frame 0 is repeated 4 times so that every latent frame holds 4 pixel frames; latent frame j
    then carries pixel frames 4(j-1)+1 … 4j in channels 0…3 (frame 0 in all 4 channels of j=0).
    """
    B, _, Fr, h, w = keep.shape
    if (Fr - 1) % temporal:
        raise ValueError(f"frame count {Fr} is not {temporal}k+1")
    first = keep[:, :, :1].repeat_interleave(temporal, dim=2)
    frames = torch.cat([first, keep[:, :, 1:]], dim=2)  # (B, 1, 4T, h, w)
    return frames.view(B, -1, temporal, h, w).transpose(1, 2)


def edit_plan(video: torch.Tensor, edit: torch.Tensor, keep_first: bool = True, spatial: int = SPATIAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-aware condition (DESIGN §3): keep everything outside the edit region, generate inside.

    video: (F, 3, H, W) in [-1, 1]; edit: (F, H, W) bool (True = edit region).
    keep_first: frame 0 is kept whole (the video sample); False for a single reference frame.
    spatial: the keep mask's cell in pixels (the VAE's spatial factor; for TI2V one token).
    Returns (condition video (F, 3, H, W), keep mask (F, H/spatial, W/spatial)); the condition
    video is zero (mid-grey) exactly where the keep mask says generate, snapped to the grid.
    """
    keep = latent_keep_mask(edit, spatial)
    if keep_first:
        keep[0] = 1.0
    cond = video * pixel_keep_mask(keep, spatial).unsqueeze(1).to(video.dtype)
    return cond, keep


def stock_plan(first_frame: torch.Tensor, frames: int, spatial: int = SPATIAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock I2V condition (also the paper's naive baseline): keep frame 0, generate the rest.

    first_frame: (3, H, W) in [-1, 1] → (condition video (F, 3, H, W), keep mask (F, h, w)).
    """
    _, H, W = first_frame.shape
    cond = torch.zeros(frames, 3, H, W, dtype=first_frame.dtype)
    cond[0] = first_frame
    keep = torch.zeros(frames, H // spatial, W // spatial)
    keep[0] = 1.0
    return cond, keep


def with_first_frame(cond: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    """The render-time condition: the training condition video with frame 0 replaced by the edit."""
    out = cond.clone()
    out[0] = first_frame
    return out


def condition_tensor(y: torch.Tensor, keep: torch.Tensor, temporal: int = TEMPORAL) -> torch.Tensor:
    """y (B, C, T, h, w) normalised condition latents, keep (F, h, w) → (B, 4+C, T, h, w)."""
    m = pack_keep_mask(keep[None, None].expand(y.shape[0], 1, *keep.shape), temporal).to(y)
    return torch.cat([m, y], dim=1)


def normalize_latents(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (B, C, T, h, w) → model space: (z - mean) / std."""
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
    """x0, noise (B, C, T, h, w), sigma (B,) → (x_t, target velocity v = ε - x0)."""
    s = sigma.view(-1, 1, 1, 1, 1).to(x0)
    return s * noise + (1 - s) * x0, noise - x0


def predict_velocity(transformer, x_t, condition, sigma_or_t, text, image=None, is_timestep=False):
    """One transformer call. `sigma_or_t`: σ (B,) or a scalar, unless is_timestep (then t = σ·1000).

    A mask-channel condition (4+C channels) is concatenated after x_t (36-channel input); a TI2V
    condition (1+C channels, see `is_token_condition`) replaces the kept tokens' latents and gives
    them timestep 0, per token, as diffusers' expand_timesteps path does.
    """
    dtype = transformer.dtype
    t = sigma_or_t if is_timestep else sigma_or_t * 1000.0
    t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    if is_token_condition(condition, x_t):
        hidden = ti2v_model_input(x_t, condition)
        patch = tuple(transformer.config.patch_size)
        timestep = ti2v_timesteps(condition[:, :1], t, patch)
    else:
        hidden = torch.cat([x_t, condition], dim=1)
        timestep = t
    return transformer(
        hidden_states=hidden.to(dtype),
        timestep=timestep,
        encoder_hidden_states=text.to(dtype),
        encoder_hidden_states_image=None if image is None else image.to(dtype),
        return_dict=False,
    )[0]


def velocity_loss(transformer, x0, condition, text, image, sigma, noise) -> torch.Tensor:
    """The training objective: MSE between predicted and true velocity over the whole latent video.

    With a TI2V condition the MSE is over the generated tokens only: a kept token's input is its
    clean condition latent at timestep 0, its output is discarded by the sampler, and its target
    ε - x0 cannot be predicted from what the model sees there (our choice; the paper's models all
    have mask channels).
    """
    x_t, v = noisy_latents(x0, noise, sigma)
    pred = predict_velocity(transformer, x_t, condition, sigma, text, image)
    if not is_token_condition(condition, x0):
        return F.mse_loss(pred.float(), v.float())
    generate = 1.0 - condition[:, :1].float()  # (B, 1, T, h, w)
    err = (pred.float() - v.float()).pow(2) * generate
    return err.sum() / (generate.sum() * pred.shape[1]).clamp_min(1.0)


# ---------------------------------------------------------------- sampling

HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"  # diffusers' names of a two-expert model's denoisers


def expert_at(t: torch.Tensor | float, boundary: float | None) -> str:
    """diffusers' rule: the high-noise expert for t ≥ boundary (timestep units), the low-noise one below."""
    return HIGH_NOISE if boundary is None or float(t) >= boundary else LOW_NOISE


def _cache_context(model, name: str):
    """diffusers' cache_context(name) when a render cache is on (loraedit.models.enable_render_cache), so
    each kind of call (cond, uncond, or both batched) keeps its own cache; else nothing."""
    import contextlib

    return model.cache_context(name) if getattr(model, "_render_cache", None) else contextlib.nullcontext()


def guided_velocity(model, x, condition, t, text, negative_text, image, scale: float, batch_cfg: bool) -> torch.Tensor:
    """Classifier-free guidance v_u + scale·(v_c - v_u) at one step, x (B, C, T, h, w) → (B, C, T, h, w).

    batch_cfg: the conditional and the unconditional call as one call on a batch of two (one pass over
    the weights instead of two, the same numbers up to kernel rounding); needs both texts the same length.
    """
    if batch_cfg and text.shape == negative_text.shape:
        B = x.shape[0]
        both = torch.cat([text, negative_text.to(text)])
        img = None if image is None else torch.cat([image, image])
        with _cache_context(model, "cond+uncond"):
            v2 = predict_velocity(model, torch.cat([x, x]), torch.cat([condition, condition]), t, both, img, is_timestep=True)
        v, v_uncond = v2[:B], v2[B:]
    else:
        with _cache_context(model, "cond"):
            v = predict_velocity(model, x, condition, t, text, image, is_timestep=True)
        with _cache_context(model, "uncond"):
            v_uncond = predict_velocity(model, x, condition, t, negative_text, image, is_timestep=True)
    return v_uncond + scale * (v - v_uncond)


@torch.no_grad()
def sample_latents(transformer, scheduler, noise, condition, text, negative_text, image, steps: int,
                   guidance: float, on_step=None, boundary: float | None = None, guidance_2: float | None = None,
                   batch_cfg: bool = False) -> torch.Tensor:
    """Denoise `noise` (B, C, T, h, w) to clean latents with classifier-free guidance.

    The same loop as diffusers' WanImageToVideoPipeline (so without a LoRA and with the stock
    condition it gives the same output), written out so the condition can be any mask.
    transformer: the denoiser; for a two-expert model (`boundary` = boundary_ratio · 1000) a
    function expert name → denoiser, called once each time the expert changes (timesteps only
    decrease, so the high-noise expert is asked for first and the low-noise one once after it;
    the caller frees the first when it loads the second). guidance_2: the low-noise expert's
    scale (None = `guidance`, as diffusers); guidance is on for both when `guidance` > 1.
    batch_cfg: the two guidance calls as one batch of two (`guided_velocity`).
    """
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    name, model = None, None
    for i, t in enumerate(scheduler.timesteps):
        if boundary is None:
            model = transformer
        elif expert_at(t, boundary) != name:
            name, model = expert_at(t, boundary), None  # drop our reference so the caller can free the old expert
            model = transformer(name)
        scale = guidance if name != LOW_NOISE or guidance_2 is None else guidance_2
        if guidance > 1.0:
            v = guided_velocity(model, x, condition, t, text, negative_text, image, scale, batch_cfg)
        else:
            with _cache_context(model, "cond"):
                v = predict_velocity(model, x, condition, t, text, image, is_timestep=True)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    if is_token_condition(condition, x):
        x = ti2v_model_input(x, condition)  # the kept tokens are the condition's, as in diffusers
    return x


# ---------------------------------------------------------------- Wan2.2-TI2V (expand_timesteps): no mask channels
#
# TI2V-5B keeps its first frame by replacing that frame's latents with the condition's and giving
# its tokens timestep 0. LoRA-Edit's keep/generate instruction maps onto the same mechanism per
# token: keep tokens take the condition latents and timestep 0, generate tokens are denoised.
# A keep decision therefore has the granularity of one token: patch (2×2) latent pixels.


def is_token_condition(condition: torch.Tensor, latents: torch.Tensor) -> bool:
    """True for a TI2V condition (B, 1+C, T, h, w): a keep channel and C condition-latent channels
    (a mask-channel condition has 4+C channels: the packed keep mask and the condition latents)."""
    return condition.shape[1] == latents.shape[1] + 1


def token_keep_mask(edit: torch.Tensor, spatial: int, temporal: int, patch: tuple[int, int, int]) -> torch.Tensor:
    """(F, H, W) bool edit region → (T, h, w) keep mask per latent pixel, constant over each token.

    A token (patch[1]×patch[2] latent pixels, i.e. spatial·patch pixels a side) is generated if any
    of its pixels is in the region in any pixel frame its latent frame holds (frame 0 alone in
    latent frame 0, frames 4(j-1)+1 … 4j in latent frame j): the region only grows.
    """
    Fr, H, W = edit.shape
    cell = latent_keep_mask(edit, spatial * patch[1])  # (F, H/(s·p), W/(s·p))
    keep = cell.repeat_interleave(patch[1], dim=-2).repeat_interleave(patch[2], dim=-1)  # (F, h, w)
    h, w = keep.shape[-2:]
    rest = keep[1:].reshape(-1, temporal, h, w).amin(dim=1)  # kept in every frame of the latent frame
    return torch.cat([keep[:1], rest], dim=0)


def ti2v_condition(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """y (B, C, T, h, w) the latents kept tokens take, keep (T, h, w) → condition (B, 1+C, T, h, w)."""
    return torch.cat([keep[None, None].expand(y.shape[0], 1, *keep.shape).to(y), y], dim=1)


def ti2v_model_input(x_t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """x_t (B, C, T, h, w) → the transformer's input: the condition latents on kept tokens, x_t elsewhere
    (diffusers: (1 - first_frame_mask) · condition + first_frame_mask · latents)."""
    keep, y = condition[:, :1].to(x_t), condition[:, 1:].to(x_t)
    return keep * y + (1 - keep) * x_t


def ti2v_timesteps(keep: torch.Tensor, t: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """keep (B, 1, T, h, w), t (B,) → per-token timesteps (B, T·h/p·w/p): 0 on kept tokens, t elsewhere,
    in the transformer's token order (diffusers: (first_frame_mask[:, ::2, ::2] * t).flatten())."""
    generate = (1 - keep[:, 0, :: patch[0], :: patch[1], :: patch[2]]).to(torch.float32)
    return (generate * t.to(torch.float32).view(-1, 1, 1, 1)).flatten(1)


def ti2v_stock_keep(frames: int, h: int, w: int, temporal: int = TEMPORAL) -> torch.Tensor:
    """The stock first-frame condition's keep mask (T, h, w): latent frame 0 kept, the rest generated."""
    keep = torch.zeros((frames - 1) // temporal + 1, h, w)
    keep[0] = 1.0
    return keep


def rotate_hue(video: torch.Tensor, angle: float) -> torch.Tensor:
    """(F, 3, H, W) in [-1, 1] → the same with every colour turned by `angle` (radians) about the grey axis.

    Stage 1's colour copies: a rotation about (1, 1, 1) keeps grey grey (0, the condition's
    "generate" value, stays 0) and a colour's brightness and saturation, and changes its hue.
    """
    u = torch.full((3,), 3 ** -0.5, dtype=torch.float64)
    cross = torch.tensor([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]], dtype=torch.float64)
    rot = math.cos(angle) * torch.eye(3, dtype=torch.float64) + math.sin(angle) * cross + (1 - math.cos(angle)) * torch.outer(u, u)
    return torch.einsum("ij,fjhw->fihw", rot.to(video.dtype), video).clamp(-1.0, 1.0)


def colour_copy_angles(copies: int) -> dict[str, float]:
    """The hue turns of stage 1's `copies` colour copies, evenly around the circle (the source at 0),
    by name: "hue.IofN" turns by I/N of a circle (its name differs for every angle, so a cache never
    hands one copy for another)."""
    return {f"hue.{i}of{copies + 1}": 2 * math.pi * i / (copies + 1) for i in range(1, copies + 1)}


def latent_index(frame: int, temporal: int = TEMPORAL) -> int:
    """The latent frame that holds pixel frame `frame`: 0 holds frame 0 alone, j ≥ 1 frames 4j-3 … 4j."""
    return (frame + temporal - 1) // temporal


def reference_pair(first_x0: torch.Tensor, first_cond: torch.Tensor, ref_x0: torch.Tensor,
                   ref_cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's paired sample: the edited first frame, then one reference, as a two-latent-frame clip.

    first_x0 (B, C, 1, h, w), first_cond (B, K+C, 1, h, w): latent frame 0 of the render condition
    (the edited first frame, kept whole); ref_x0, ref_cond: the reference still's. → (B, C, 2, h, w),
    (B, K+C, 2, h, w). Trained under `rope_time_positions(.., [0, latent_index(k)])`, so the two
    frames are as far apart in time as in the clip; there is no frame between them, so no motion is
    taught, only how the region looks k frames after the edited first frame.
    """
    return torch.cat([first_x0, ref_x0], dim=2), torch.cat([first_cond, ref_cond], dim=2)


@contextlib.contextmanager
def rope_time_positions(transformer, positions: list[int]):
    """Inside: latent frame i of the transformer's input takes rotary time position positions[i].

    Rotary embeddings are relative: a one-frame sample is the same at every time position (so a
    reference still cannot be "placed" in time alone), but two frames at positions 0 and j attend
    to each other as frames 0 and j of a clip do. diffusers' rotary module numbers frames 0, 1, …
    and takes no positions: it is asked for max(positions) + 1 frames (a meta tensor: it reads only
    the shape) and each input frame's tokens are picked from that (tokens are frame-major).
    """
    if list(positions) == list(range(len(positions))):
        yield
        return
    rope = transformer.rope
    forward = rope.forward
    p_t = rope.patch_size[0]

    def placed(hidden_states: torch.Tensor):
        b, c, f, h, w = hidden_states.shape
        if f != len(positions) * p_t:
            raise ValueError(f"rope_time_positions: {len(positions)} positions for {f // p_t} latent frames")
        n = max(positions) + 1
        cos, sin = forward(torch.empty(b, c, n * p_t, h, w, device="meta"))
        per = cos.shape[1] // n  # tokens per latent frame
        index = torch.cat([torch.arange(q * per, (q + 1) * per) for q in positions]).to(cos.device)
        return cos[:, index], sin[:, index]

    rope.forward = placed
    try:
        yield
    finally:
        del rope.forward  # the class's forward again


def latent_frames(frames: int, temporal: int = TEMPORAL) -> int:
    return (frames - 1) // temporal + 1


def is_valid_frame_count(frames: int) -> bool:
    return frames >= 1 and (frames - 1) % TEMPORAL == 0


def nearest_valid_frame_count(frames: int) -> int:
    return max(1, math.floor((frames - 1) / TEMPORAL) * TEMPORAL + 1)
