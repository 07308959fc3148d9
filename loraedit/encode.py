"""Stage 2 of 4 — encode: every VAE / text / image encoding the run needs, done once.

Writes cache/encoded.safetensors; the training loop and the sampler read only this, so no
training step runs the VAE or an encoder, and the encoders are freed before training loads
the transformer. Keys (B = 1; C latent channels and h×w from the model's VAE, loraedit.family):
    x0             (1, C, T, h, w)    normalised latents of the source video (stage-1 target)
    cond_train     (1, 4+C, T, h, w)  [M_cond, y] of the training condition (mask-channel models);
                   (1, 1+C, T, h, w)  [keep, latents kept tokens take] for Wan2.2-TI2V
    cond_render    the same with frame 0 = the edited first frame
    hue.IofN.x0, .cond, .image  colour copy I of x0, cond_train, image_train (the hue turned by I/N
                   of a circle, method.colour_copy_angles; only with colour_copies = N-1)
    ref.K.x0       (1, C, 1, h, w)    edited later frame K (stage-2 target)
    ref.K.cond     source frame K: keep outside the region, generate inside
    text, negative_text (1, 512, D)   UMT5 embeddings, padded to 512 tokens: the training prompt
                                      ([p*] + the source's caption) and the negative one
    text_edit      (1, 512, D)        the render prompt ([p*] + the edited video's caption), also
                                      stage 2's (its reference frames show the edit); see caption.py
    image_train, image_render (1, N, C)  CLIP hidden_states[-2] of source / edited frame 0 (Wan2.1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from loraedit import method
from loraedit.files import atomic_output
from loraedit.models import load_encoders, model_family, release_memory, tile_if_needed


def to_video_tensor(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 → (F, 3, H, W) float in [-1, 1] (diffusers' VideoProcessor arithmetic)."""
    return torch.from_numpy(np.array(frames, copy=True)).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) in [-1, 1] → normalised latents (1, C, T, h, w) (distribution mode)."""
    device = next(vae.parameters()).device
    z = vae.encode(video.permute(1, 0, 2, 3)[None].to(device, vae.dtype)).latent_dist.mode().float()
    return method.normalize_latents(z, torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std))


def condition_videos(source: torch.Tensor, first: torch.Tensor, region: torch.Tensor, mode: str, spatial: int = method.SPATIAL):
    """(training condition video, render condition video, keep mask (F, h, w)) for `mode`."""
    if mode == "naive":
        train_video, keep = method.stock_plan(source[0], source.shape[0], spatial)
        render_video, _ = method.stock_plan(first, source.shape[0], spatial)
    else:
        train_video, keep = method.edit_plan(source, region, spatial=spatial)
        render_video = method.with_first_frame(train_video, first)
    return train_video, render_video, keep


@dataclass(frozen=True)
class EncodeSettings:
    """What the encodings depend on besides the prepared frames (from the train and render settings)."""

    model: str
    prompt: str = ""  # the source's caption (training)
    mode: str = "mask-aware"
    negative_prompt: str | None = None  # None: Wan's
    edit_prompt: str | None = None  # the edited video's caption (render, stage 2); None: prompt
    trigger: str = ""  # put before both
    colour_copies: int = 0  # stage 1's hue-turned copies of the video (TrainSettings.colour_copies)

    @property
    def texts(self) -> tuple[str, str]:
        """(training text, render text)."""
        from loraedit.caption import prompts

        return prompts(self.prompt, self.edit_prompt, self.trigger)

    @property
    def negative(self) -> str:
        return method.WAN_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt


def cache_inputs(args: EncodeSettings) -> dict:
    """The settings the encodings depend on (with the prepared frames' hashes they name the cache file)."""
    train_text, render_text = args.texts
    inputs = {"model": str(args.model), "prompt": train_text, "edit_prompt": render_text, "negative_prompt": args.negative, "mode": args.mode}
    if args.colour_copies:  # only then: caches made before the setting keep their names
        inputs["colour_copies"] = args.colour_copies
    return inputs


def cache_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def token_conditions(vae, fam, source: torch.Tensor, first: torch.Tensor, region: torch.Tensor, mode: str,
                     refs: dict, have: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Wan2.2-TI2V entries: conditions as (keep, latents kept tokens take), no mask channels.

    The kept tokens take clean latents, not those of a region-blanked video: in TI2V they are the
    output itself (the sampler copies them), so grey bleeding across the region's border through
    the VAE would show. Training keeps the source's own latents (x0); the render keeps the same
    with latent frame 0 = the edited first frame's (the Wan VAE encodes frame 0 alone, so this is
    exactly what encoding the edited video's first frame gives). Naive mode keeps frame 0 only.
    """
    out = {}
    x0 = have["x0"] if "x0" in have else encode_video(vae, source).cpu()
    out["x0"] = x0
    T, h, w = x0.shape[2:]
    if mode == "naive":
        keep = method.ti2v_stock_keep(source.shape[0], h, w, fam.temporal)
    else:
        keep = method.token_keep_mask(region, fam.spatial, fam.temporal, fam.patch)
        keep[0] = 1.0  # frame 0 is kept whole, as in the paper's condition
    if "cond_train" not in have:
        out["cond_train"] = method.ti2v_condition(x0, keep)
    first_latents = encode_video(vae, first[None]).cpu()  # (1, C, 1, h, w)
    out["cond_render"] = method.ti2v_condition(torch.cat([first_latents, x0[:, :, 1:]], dim=2), keep)
    for k, ref in refs.items():
        if f"ref.{k}.x0" in have:
            continue
        ref_keep = method.token_keep_mask(region[k : k + 1], fam.spatial, fam.temporal, fam.patch)
        out[f"ref.{k}.x0"] = encode_video(vae, to_video_tensor(ref[None])).cpu()
        out[f"ref.{k}.cond"] = method.ti2v_condition(encode_video(vae, source[k : k + 1]).cpu(), ref_keep)
    return out


def cached(path: Path, key: str) -> bool:
    return path.is_file() and cache_metadata(path).get("key") == key


# what does not depend on the edited first frame (or the prompt), so a re-render with another
# first frame can take it from the run's main cache
FIRST_FRAME_FREE = ("x0", "cond_train", "image_train")


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8, the inverse of to_video_tensor."""
    return ((frame.permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def run(args: EncodeSettings, path: Path, prepared: dict, device: torch.device, reuse: dict[str, torch.Tensor] | None = None,
        key: str = "", base: str = "", weights: str | None = None) -> dict[str, torch.Tensor]:
    """Encode everything for `prepared` into `path`, or read it back if it is already there.

    path is named by the hash of everything encoded into it (the caller's `key`), so a file that
    exists holds exactly these encodings. reuse: an existing cache of the same frames, regions and
    references (`base` names that); its first-frame-free entries are copied rather than encoded
    again (a re-render with another edited first frame).
    """
    if cached(path, key):
        return load_file(str(path))
    out = {k: v for k, v in (reuse or {}).items() if k in FIRST_FRAME_FREE or k.startswith(("ref.", "hue."))}
    fam = model_family(args.model)
    pipe = load_encoders(args.model, device)
    with torch.no_grad():
        train_text, render_text = args.texts
        text, negative = pipe.encode_prompt(train_text, args.negative, do_classifier_free_guidance=True,
                                            max_sequence_length=512, device=device)
        out["text"], out["negative_text"] = text.float().cpu(), negative.float().cpu()
        if render_text == train_text:
            out["text_edit"] = out["text"].clone()  # safetensors stores no shared tensors
        else:
            edit, _ = pipe.encode_prompt(render_text, do_classifier_free_guidance=False, max_sequence_length=512, device=device)
            out["text_edit"] = edit.float().cpu()
        angles = method.colour_copy_angles(args.colour_copies)
        if pipe.image_encoder is not None:
            if "image_train" not in out:
                out["image_train"] = pipe.encode_image(Image.fromarray(prepared["source"][0]), device).float().cpu()
            out["image_render"] = pipe.encode_image(Image.fromarray(prepared["first"]), device).float().cpu()
            first_source = to_video_tensor(prepared["source"][:1])
            for name, angle in angles.items():
                if f"{name}.image" not in out:
                    turned = to_uint8(method.rotate_hue(first_source, angle)[0])
                    out[f"{name}.image"] = pipe.encode_image(Image.fromarray(turned), device).float().cpu()
        # the VAE encodes alone: UMT5 and CLIP (11.8 GB in bf16 for Wan2.1) are freed first
        vae = pipe.vae
        del pipe
        release_memory()
        source = to_video_tensor(prepared["source"])
        first = to_video_tensor(prepared["first"][None])[0]
        tile_if_needed(vae, source.shape[-1], source.shape[-2], device)
        region = torch.from_numpy(prepared["region"])
        # --mode auto: what prepare decided from the edit (plan.json records it and why)
        mode = prepared["plan"].get("mode", "mask-aware") if args.mode == "auto" else args.mode
        if fam.expand_timesteps:
            out.update(token_conditions(vae, fam, source, first, region, mode, prepared["refs"], out))
            for name, angle in angles.items():
                if f"{name}.x0" not in out:
                    out[f"{name}.x0"] = encode_video(vae, method.rotate_hue(source, angle)).cpu()
                    # the training condition keeps the source's own latents: the copy's, where the copy is trained
                    out[f"{name}.cond"] = method.ti2v_condition(out[f"{name}.x0"], out["cond_train"][0, 0])
        else:
            train_video, render_video, keep = condition_videos(source, first, region, mode, fam.spatial)
            if "x0" not in out:
                out["x0"] = encode_video(vae, source).cpu()
            if "cond_train" not in out:
                out["cond_train"] = method.condition_tensor(encode_video(vae, train_video), keep, fam.temporal).cpu()
            out["cond_render"] = method.condition_tensor(encode_video(vae, render_video), keep, fam.temporal).cpu()
            for name, angle in angles.items():
                if f"{name}.x0" not in out:
                    out[f"{name}.x0"] = encode_video(vae, method.rotate_hue(source, angle)).cpu()
                    out[f"{name}.cond"] = method.condition_tensor(encode_video(vae, method.rotate_hue(train_video, angle)), keep,
                                                                  fam.temporal).cpu()
            for k, ref in prepared["refs"].items():
                if f"ref.{k}.x0" in out:
                    continue
                cond, ref_keep = method.edit_plan(source[k : k + 1], region[k : k + 1], keep_first=False, spatial=fam.spatial)
                out[f"ref.{k}.x0"] = encode_video(vae, to_video_tensor(ref[None])).cpu()
                out[f"ref.{k}.cond"] = method.condition_tensor(encode_video(vae, cond), ref_keep, fam.temporal).cpu()
    del vae
    release_memory()
    with atomic_output(path) as tmp:
        # weights: the model's weight fingerprint (runstate.model_identity), so weights replaced in place
        # at the same path are never read back from a cache made with the old ones
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp),
                  metadata={"key": key, "base": base, **({"weights": weights} if weights else {})})
    return out
