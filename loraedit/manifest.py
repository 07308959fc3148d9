"""manifest.json: the record of a run — settings, seed, input hashes, versions, timings, memory."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from loraedit.files import read_json, sha256_path, write_json

PACKAGES = ("loraedit", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "av",
            "opencv-python-headless", "numpy", "pillow")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or ""
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def input_hashes(settings: dict) -> dict[str, str]:
    """sha256 of every input file; for the model only its small config files (weights are tens of GB)."""
    out = {}
    for key in ("video", "first_frame", "mask", "masks", "config"):
        p = settings.get(key)
        if p and Path(p).exists():
            out[key] = sha256_path(p)
    for k, path in (settings.get("ref") or {}).items():
        if Path(path).is_file():
            out[f"ref {k}"] = sha256_path(path)
    model = Path(str(settings.get("model", "")))
    if model.is_dir():
        for cfg in sorted(model.glob("*/*config.json")) + [model / "model_index.json"]:
            if cfg.is_file():
                out[f"model/{cfg.relative_to(model)}"] = sha256_path(cfg)
    return out


def update(run_dir: Path, stage: str, figures: dict, settings: dict, inputs: dict | None = None) -> None:
    """Record what `stage` (or one render) was made with; other stages' records stay as they are.

    inputs: the content hashes the stage was made from (default: those of the files `settings` names).
    """
    path = run_dir / "manifest.json"
    m = read_json(path) if path.is_file() else {}
    for old in ("settings", "seed", "inputs"):  # the top-level record of earlier versions: only the last command's
        m.pop(old, None)
    m["versions"] = versions()
    m.setdefault("stages", {})[stage] = dict(figures, settings=settings, inputs=input_hashes(settings) if inputs is None else inputs,
                                             finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(path, m)


def discard(run_dir: Path, stage: str, why: str) -> None:
    """--restart: the stage's record moves to `discarded` (renders made from it still point to it)."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return
    m = read_json(path)
    rec = m.get("stages", {}).pop(stage, None)
    if rec is not None:
        m.setdefault("discarded", []).append(dict(rec, stage=stage, discarded=time.strftime("%Y-%m-%dT%H:%M:%S%z"), why=why))
        write_json(path, m)
