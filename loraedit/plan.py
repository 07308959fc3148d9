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
