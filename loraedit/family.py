"""What a model folder is: which Wan image-to-video family, its experts, boundary, latent geometry.

Three layouts are supported, all loaded through diffusers' WanImageToVideoPipeline:

    wan2.1-i2v       Wan2.1-I2V-14B-480P / -720P: one transformer, 36-channel input (x_t, 4-channel
                     keep mask, condition latents), CLIP image encoder, VAE 8x spatial, 16 channels.
    wan2.2-i2v-a14b  Wan2.2-I2V-A14B: two experts, `transformer` for timesteps ≥ boundary_ratio·1000
                     (high noise) and `transformer_2` below; the same 36-channel input; no CLIP.
    wan2.2-ti2v-5b   Wan2.2-TI2V-5B: model_index names WanPipeline with expand_timesteps; no mask
                     channels (kept tokens take the condition latents and timestep 0); Wan2.2 VAE,
                     16x spatial, 48 channels; no CLIP.

Every factor is read from the folder's configs (never assumed), so a folder that is none of these
is refused in one line before any weights load.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from loraedit.errors import InputError

WAN21 = "wan2.1-i2v"
A14B = "wan2.2-i2v-a14b"
TI2V = "wan2.2-ti2v-5b"

HIGH, LOW = "transformer", "transformer_2"  # the experts' subfolders (high noise, low noise)
EXPERT_NAMES = {HIGH: "high_noise", LOW: "low_noise"}

SUPPORTED = ("Wan2.1-I2V-14B-480P/-720P, Wan2.2-I2V-A14B or Wan2.2-TI2V-5B, in diffusers layout "
             "(the '-Diffusers' download)")


@dataclass(frozen=True)
class ModelFamily:
    """The facts about a model folder that the method and the stages depend on."""

    name: str                          # WAN21, A14B or TI2V
    experts: tuple[str, ...]           # transformer subfolders, high noise first
    boundary_ratio: float | None       # A14B: expert switch at boundary_ratio · num_train_timesteps
    expand_timesteps: bool             # TI2V: per-token timesteps, kept tokens replaced by the condition
    has_clip: bool                     # Wan2.1: CLIP image embedding of the first frame
    latent_channels: int               # VAE z_dim (16 for Wan2.1/A14B, 48 for TI2V)
    spatial: int                       # pixels per latent pixel (8, or 16 for the Wan2.2 VAE)
    temporal: int                      # pixel frames per latent frame (after the first)
    patch: tuple[int, int, int]        # transformer patch (t, h, w)
    default_size: tuple[int, int]      # landscape (width, height); portrait swaps them
    fps: float = 16.0                  # the frame rate the model was trained at (TI2V-5B: 24)
    num_train_timesteps: int = 1000

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: one transformer token in pixels."""
        return self.spatial * max(self.patch[1], self.patch[2])

    @property
    def token_cell(self) -> int:
        """Pixels per side of one transformer token (the unit a TI2V keep decision can take)."""
        return self.spatial * self.patch[1]

    @property
    def two_experts(self) -> bool:
        return len(self.experts) == 2

    @property
    def boundary_timestep(self) -> float | None:
        return None if self.boundary_ratio is None else self.boundary_ratio * self.num_train_timesteps

    def expert_for_timestep(self, t: float) -> str:
        """diffusers' rule: the high-noise expert for t ≥ boundary, the low-noise one below."""
        b = self.boundary_timestep
        return HIGH if b is None or t >= b else LOW

    def sigma_range(self, expert: str) -> tuple[float, float]:
        """Training noise levels σ an expert sees: its own side of the boundary (σ = t / 1000)."""
        if self.boundary_ratio is None:
            return 0.0, 1.0
        return (self.boundary_ratio, 1.0) if expert == HIGH else (0.0, self.boundary_ratio)

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """Default working size for a source of width × height: landscape or portrait by its aspect."""
        w, h = self.default_size
        return (w, h) if width >= height else (h, w)

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal + 1


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError(f"{path}: missing or not valid JSON; the model download is incomplete, download it again") from None


def _component(index: dict, name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[0] is not None


def is_720p(path: str | Path) -> bool:
    """Wan2.1's 480P and 720P folders have identical configs: the folder's name tells them apart
    (it is kept in a local download and in the hub cache's models--Wan-AI--…-720P-… folder)."""
    return re.search(r"720p", str(Path(path).expanduser().resolve()) if Path(path).exists() else str(path), re.I) is not None


def detect(path: str | Path) -> ModelFamily:
    """The family of the local diffusers folder `path`; InputError in one line if it is none."""
    p = Path(path)
    index = _read_json(p / "model_index.json")
    cls = index.get("_class_name", "")
    expand = bool(index.get("expand_timesteps"))
    two = _component(index, "transformer_2")
    if cls == "WanPipeline" and not expand:
        raise InputError(f"{path}: is a Wan text-to-video model (WanPipeline); loraedit edits with an image-to-video model: {SUPPORTED}")
    if cls not in ("WanImageToVideoPipeline", "WanPipeline"):
        raise InputError(f"{path}: is a {cls or 'unknown'} folder, not a Wan image-to-video model; pass {SUPPORTED}")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") + (("transformer_2",) if two else ()):
        if not (p / sub).is_dir():
            raise InputError(f"{path}: the '{sub}' folder is missing; the download is incomplete")
    vae = _read_json(p / "vae" / "config.json")
    tcfg = _read_json(p / "transformer" / "config.json")
    z = int(vae.get("z_dim", 16))
    spatial = int(vae.get("scale_factor_spatial") or 8)  # absent in early Wan2.1 folders: diffusers' default
    temporal = int(vae.get("scale_factor_temporal") or 4)
    patch = tuple(int(v) for v in tcfg.get("patch_size", (1, 2, 2)))
    in_ch = int(tcfg.get("in_channels", 0))
    has_clip = _component(index, "image_encoder") and tcfg.get("image_dim") is not None
    boundary = index.get("boundary_ratio")
    if expand:
        if two or in_ch != z:
            raise InputError(f"{path}: a WanPipeline with expand_timesteps but {'two experts' if two else f'{in_ch} input channels for {z} latent channels'}; "
                             f"this layout is not supported; pass {SUPPORTED}")
        return ModelFamily(TI2V, (HIGH,), None, True, False, z, spatial, temporal, patch, (1280, 704), fps=24.0)
    if in_ch != 2 * z + temporal:
        raise InputError(f"{path}: the transformer takes {in_ch} input channels, not the {2 * z + temporal} of a Wan I2V model "
                         f"(noisy latents, {temporal}-channel mask, condition); pass {SUPPORTED}")
    if two:
        if boundary is None:
            raise InputError(f"{path}: has two experts but no boundary_ratio in model_index.json; re-download the model")
        return ModelFamily(A14B, (HIGH, LOW), float(boundary), False, has_clip, z, spatial, temporal, patch, (832, 480))
    if not has_clip:
        raise InputError(f"{path}: a one-transformer Wan I2V folder without its CLIP image encoder; the download is incomplete")
    return ModelFamily(WAN21, (HIGH,), None, False, True, z, spatial, temporal, patch, (1280, 720) if is_720p(path) else (832, 480))


def own_working_size(folder) -> tuple[tuple[int, int], int] | None:
    """((W, H), frames) a model folder was trained at where it is not its family's: the bundled toy model's
    (loraedit.demo's settings, which `loraedit demo` and the toy's model card use); None for any other folder."""
    from loraedit import demo

    try:
        if not folder or Path(folder).resolve() != demo.TOY_MODEL.resolve():
            return None
    except OSError:
        return None
    W, H = (int(v) for v in demo.DEMO["size"].split("x"))
    return (W, H), int(demo.DEMO["frames"])


def auto_size(fam: ModelFamily, width: int, height: int, pixels: int | None = None) -> tuple[int, int]:
    """The working size for a width × height clip: the model's own bucket (832x480, 1280x720,
    1280x704, or portrait) for footage within 3% of its aspect; any other aspect keeps its shape
    at the bucket's pixel count, in whole transformer tokens (16 or 32 pixels). `pixels`: a model trained
    at its own size (own_working_size): the clip's aspect at that many pixels."""
    bucket = fam.size_for(width, height)
    aspect = width / height
    if pixels is None and abs(bucket[0] / bucket[1] / aspect - 1) <= 0.03:
        return bucket
    m, budget = fam.size_multiple, pixels or bucket[0] * bucket[1]
    h = max(m, round(math.sqrt(budget / aspect) / m) * m)
    return max(m, round(h * aspect / m) * m), h


def family_of(model: str) -> ModelFamily:
    """The family of `model`: a local folder's configs, or a hub id's (only its JSON files are
    fetched, where there is network; the hub cache's folder name keeps '…-720P-…')."""
    if Path(model).exists():
        return detect(model)
    from huggingface_hub import snapshot_download

    return detect(snapshot_download(model, allow_patterns=["*.json"]))


def working_size(fam: ModelFamily, size: tuple[int, int] | None, width: int, height: int,
                 pixels: int | None = None) -> tuple[int, int]:
    """The size frames are fitted to: `size` (checked against the model's token size) or the model's
    default for a source of width × height (auto_size; `pixels` for a model trained at its own size)."""
    if size is None:
        return auto_size(fam, width, height, pixels)
    w, h = size
    m = fam.size_multiple
    if w % m or h % m:
        raise InputError(f"--size {w}x{h}: {fam.name} needs width and height in multiples of {m} (one transformer token); "
                         f"e.g. {max(m, round(w / m) * m)}x{max(m, round(h / m) * m)}")
    return w, h


def describe(family: ModelFamily) -> str:
    """One line for the log: what was found."""
    parts = [family.name, f"VAE {family.spatial}x spatial / {family.temporal}x temporal, {family.latent_channels} channels"]
    if family.two_experts:
        parts.append(f"two experts, boundary t = {family.boundary_timestep:g}")
    if family.expand_timesteps:
        parts.append("first-frame condition by per-token timesteps")
    parts.append("default size {}x{}".format(*family.default_size))
    return "; ".join(parts)
