"""The Python interface: run the stages on a run folder with typed settings.

    from loraedit import api
    from loraedit.settings import PrepareSettings, TrainSettings, RenderSettings

    run = "runs/jacket"
    api.prepare(run, PrepareSettings(model=MODEL, video="in.mp4", first_frame="edited.png", frames=49))
    api.train(run, TrainSettings(steps=100))                  # the model comes from the run's record
    out = api.render(run, RenderSettings(seed=3))           # → Path of the new render folder
    # or all three, resuming whatever was done already:
    api.edit(run, PrepareSettings(...), TrainSettings(...), RenderSettings(...))

The command line (loraedit/cli.py) and the batch runner and web UI call these same functions.
A bad setting or input raises loraedit.errors.InputError (a one-line message naming the fix).
Settings left at None that the run has recorded (the model, above) are taken from the run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from loraedit.errors import InputError
from loraedit.files import read_json, write_json
from loraedit.settings import PrepareSettings, RenderSettings, Settings, TrainSettings

log = logging.getLogger("loraedit")

STAGE_OF = {PrepareSettings: "prepare", TrainSettings: "train", RenderSettings: "render"}


def recorded_settings(run_dir: str | Path, cls: type[Settings]) -> dict:
    """The settings of stage `cls` that the run folder last recorded (job.json), or {}."""
    job = Path(run_dir) / "job.json"
    if not job.is_file():
        return {}
    data = read_json(job)
    stage = STAGE_OF[cls]
    if isinstance(data.get(stage), dict):
        return data[stage]
    if "prepare" not in data and "train" not in data:  # the flat job.json of earlier versions
        return data
    return {}


def _record_settings(run_dir: Path, s: Settings) -> None:
    job = run_dir / "job.json"
    data = read_json(job) if job.is_file() else {}
    if not any(k in data for k in STAGE_OF.values()):
        data = {}
    data[STAGE_OF[type(s)]] = s.to_dict()
    write_json(job, data)


def _with_run_model(run_dir: Path, s: Settings) -> Settings:
    """A setting the caller left at None (the model) is the run's."""
    if getattr(s, "model", None) is None:
        for cls in (TrainSettings, PrepareSettings):
            model = recorded_settings(run_dir, cls).get("model")
            if model:
                return s.replace(model=model)
    return s


def _loaded_libraries() -> None:
    from loraedit.cli import quiet_libraries

    quiet_libraries()


def _check_model(model: str) -> str:
    from loraedit.models import check_model

    return check_model(model)


# ---------------------------------------------------------------- the stages


def prepare(run_dir: str | Path, s: PrepareSettings) -> dict:
    """Frames, edited first frame, references and edit regions → RUN/prepare; returns the plan."""
    from loraedit import manifest
    from loraedit import prepare as stage

    run_dir = Path(run_dir)
    s.check_files()
    s = s.replace(model=_check_model(s.model))
    t0 = time.perf_counter()
    plan = stage.run(s, run_dir)
    _record_settings(run_dir, s)
    manifest.update(run_dir, "prepare", {"seconds": time.perf_counter() - t0, "plan": plan}, s.to_dict())
    log.info("prepared %d frames at %dx%d in %s", plan["frames"], plan["width"], plan["height"], run_dir / "prepare")
    return plan


def _prepared(run_dir: Path) -> dict:
    from loraedit import prepare as stage

    if not (run_dir / "prepare" / "plan.json").is_file():
        raise InputError(f"{run_dir}: is not a prepared run; run `loraedit prepare` (or `loraedit edit`) with --out {run_dir} first")
    return stage.load(run_dir)


def _encode_settings(model: str, train: TrainSettings, render: RenderSettings | None):
    """What the encode stage needs from the training and render settings."""
    from loraedit.encode import EncodeSettings

    return EncodeSettings(model=model, prompt=train.prompt, mode=train.mode,
                          negative_prompt=None if render is None else render.negative_prompt)


def train(run_dir: str | Path, s: TrainSettings, restart: bool = False, progress: bool = True) -> dict:
    """Encode (cached) and train the LoRA of a prepared run; returns the training figures."""
    run_dir = Path(run_dir)
    s = _with_run_model(run_dir, s)
    s.check_files()
    from loraedit import encode, manifest
    from loraedit import train as stage
    from loraedit.models import resolve_device

    _loaded_libraries()
    s = s.replace(model=_check_model(s.model))
    prepared = _prepared(run_dir)
    device = resolve_device(s.device)
    render = RenderSettings.from_values(recorded_settings(run_dir, RenderSettings)) if recorded_settings(run_dir, RenderSettings) else None
    t0 = time.perf_counter()
    cache = encode.run(_encode_settings(s.model, s, render), run_dir / "cache" / "encoded.safetensors", prepared, device)
    manifest.update(run_dir, "encode", {"seconds": time.perf_counter() - t0}, s.to_dict())
    figures = stage.run(s, run_dir, cache, device, progress=progress)
    _record_settings(run_dir, s)
    manifest.update(run_dir, "train", figures, s.to_dict())
    return figures


def render(run_dir: str | Path, s: RenderSettings, name: str | None = None, progress: bool = True) -> Path:
    """Render the trained run with `s` into a new folder of the run (render, render-2, …, or `name`)."""
    run_dir = Path(run_dir)
    s = _with_run_model(run_dir, s)
    s.check_files()
    from safetensors.torch import load_file

    from loraedit import encode, manifest
    from loraedit import render as stage
    from loraedit.files import sha256_file
    from loraedit.models import resolve_device
    from loraedit.video import fit_edited, read_image

    _loaded_libraries()
    s = s.replace(model=_check_model(s.model))
    prepared = _prepared(run_dir)
    device = resolve_device(s.device)
    trained = TrainSettings.from_values(recorded_settings(run_dir, TrainSettings))
    cache_file = run_dir / "cache" / "encoded.safetensors"
    reuse = None
    if s.first_frame:
        # another edited first frame: same frames and regions, new condition and image embedding
        plan = prepared["plan"]
        prepared["first"] = fit_edited(read_image(s.first_frame), plan["width"], plan["height"],
                                       plan["source_width"], plan["source_height"], s.first_frame)
        prepared["plan"] = dict(plan, first_frame_sha256=sha256_file(s.first_frame))
        if cache_file.is_file():
            reuse = load_file(str(cache_file))
        cache_file = run_dir / "cache" / f"encoded-{prepared['plan']['first_frame_sha256'][:12]}.safetensors"
    cache = encode.run(_encode_settings(s.model, trained, s), cache_file, prepared, device, reuse=reuse)
    out_dir = stage.output_dir(run_dir, name)
    source_video = recorded_settings(run_dir, PrepareSettings).get("video")
    figures = stage.run(s, run_dir, prepared, cache, device, out_dir, progress=progress, source_video=source_video,
                        prompt=trained.prompt)
    _record_settings(run_dir, s.replace(first_frame=None))
    manifest.update(run_dir, out_dir.name, figures, s.to_dict())
    log.info("wrote %s", out_dir / "edited.mp4")
    return out_dir


def edit(run_dir: str | Path, prep: PrepareSettings, tr: TrainSettings, rend: RenderSettings,
         restart: bool = False, progress: bool = True) -> Path:
    """prepare → train → render; a rerun does only what is not done yet. Returns the render folder."""
    from loraedit import render as stage

    run_dir = Path(run_dir)
    if tr.model is None:
        tr = tr.replace(model=prep.model)
    if rend.model is None:
        rend = rend.replace(model=prep.model)
    prepare(run_dir, prep)
    train(run_dir, tr, restart=restart, progress=progress)
    # a rerun of an interrupted edit finishes render/; a rerun of a finished one with the same
    # settings has nothing left to do; with other render settings it renders beside the first
    prepared = _prepared(run_dir)
    want = stage.render_settings(rend, run_dir, prepared, tr.prompt)
    for done in sorted(run_dir.glob("render*/settings.json")):
        if read_json(done) == want:
            log.info("already rendered with these settings: %s", done.parent / "edited.mp4")
            return done.parent
    first = run_dir / "render"
    return render(run_dir, rend, name=None if (first / "settings.json").is_file() else "render", progress=progress)


__all__ = ["prepare", "train", "render", "edit", "recorded_settings", "PrepareSettings", "TrainSettings", "RenderSettings"]
