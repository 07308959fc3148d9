"""Optional SAM2 segmentation of the edit region (`--segmenter sam2`, extra `loraedit[sam2]`).

The region is first followed by optical flow (loraedit.region); SAM2's image predictor then
segments each frame from that frame's box, which gives object-exact outlines where flow gives a
coarse region. The package and its weights are not shipped: both missing cases are a clear
InputError. Not exercised by the test suite beyond those errors (no weights offline).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from loraedit.errors import InputError

_CONFIGS = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


def _config_for(checkpoint: Path) -> str:
    name = checkpoint.stem  # e.g. sam2.1_hiera_large
    version = "sam2.1" if name.startswith("sam2.1") else "sam2"
    for long, short in _CONFIGS.items():
        if name.endswith(long):
            return f"configs/{version}/{version}_hiera_{short}.yaml"
    raise InputError(f"{checkpoint}: cannot tell the SAM2 model size from the file name; pass --sam2-config (e.g. configs/sam2.1/sam2.1_hiera_l.yaml)")


def check_available(checkpoint: str | None) -> Path:
    if importlib.util.find_spec("sam2") is None:
        raise InputError("--segmenter sam2: the sam2 package is not installed; install it with `pip install 'loraedit[sam2]'` "
                         "(or `pip install sam2`), or use --segmenter flow")
    if not checkpoint:
        raise InputError("--segmenter sam2: needs --sam2-checkpoint PATH (SAM2 weights, e.g. sam2.1_hiera_large.pt)")
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"{path}: no such SAM2 checkpoint (from --sam2-checkpoint); check the path")
    return path


def segment(frames: np.ndarray, region0: np.ndarray, opts) -> np.ndarray:
    """(F, H, W, 3) frames, (H, W) region in frame 0 → (F, H, W) bool, SAM2 masks from flow-tracked boxes."""
    checkpoint = check_available(opts.sam2_checkpoint)
    from loraedit.region import track_region

    coarse = track_region(frames, region0, rigid=bool(opts.boxes))
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = build_sam2(opts.sam2_config or _config_for(checkpoint), str(checkpoint), device=device)
    except Exception as exc:  # a wrong file or config: say which
        raise InputError(f"{checkpoint}: SAM2 could not load it ({exc.__class__.__name__}: {exc}); check --sam2-checkpoint and --sam2-config") from None
    predictor = SAM2ImagePredictor(model)
    out = np.zeros(coarse.shape, bool)
    with torch.inference_mode():
        for t, (frame, reg) in enumerate(zip(frames, coarse)):
            if not reg.any():
                continue
            predictor.set_image(frame)
            n, _, stats, _ = cv2.connectedComponentsWithStats(reg.astype(np.uint8), connectivity=8)
            for x, y, w, h, _a in stats[1:n]:
                masks, scores, _ = predictor.predict(box=np.array([x, y, x + w, y + h], np.float32), multimask_output=False)
                out[t] |= masks[0] > 0.5
    return out
