"""The Python interface: run the stages on a run folder with typed settings.

    from loraedit import api
    from loraedit.settings import PrepareSettings, TrainSettings, RenderSettings

    run = "runs/jacket"
    api.prepare(run, PrepareSettings(model=MODEL, video="in.mp4", first_frame="edited.png", frames=49))
    api.train(run, TrainSettings(steps=100))                # the model comes from the run's record
    out = api.render(run, RenderSettings(seed=3))           # → Path of the new render folder
    # or all three, doing only what is not done yet:
    api.edit(run, PrepareSettings(...), TrainSettings(...), RenderSettings(...))

The command line (loraedit/cli.py), the batch runner and the web UI call these same functions.
A bad setting or input raises loraedit.errors.InputError (a one-line message naming the fix).
A setting left at None that the run has recorded (the model, above) is taken from the run.

Each stage checks its record (loraedit/runstate.py) first: equal inputs → reused; changed inputs
→ redone where nothing trained is lost, refused where the trained LoRA would no longer match
(pass restart=True, `--restart`, to discard it). One command works on a run folder at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

from loraedit import runstate
from loraedit.errors import InputError, StaleRunError
from loraedit.files import read_json, write_json
from loraedit.settings import PrepareSettings, RenderSettings, Settings, TrainSettings

log = logging.getLogger("loraedit")

STAGE_OF = {PrepareSettings: "prepare", TrainSettings: "train", RenderSettings: "render"}
LORA_FILE = Path("lora") / "pytorch_lora_weights.safetensors"


def _has_trained_lora(run_dir: Path) -> bool:
    """A trained LoRA in the run: lora/ (one transformer) or lora/high_noise, lora/low_noise (two experts)."""
    return (run_dir / LORA_FILE).is_file() or any((run_dir / "lora").glob("*/pytorch_lora_weights.safetensors"))


TRAINING_MARK = Path("train") / "training.json"  # present while a training has begun and not finished


def training_unfinished(run_dir: Path) -> str | None:
    """Why the run cannot be rendered yet (None: trained, or trained with 0 steps: the base model on
    purpose): never trained, or interrupted (checkpoints and no finished LoRA)."""
    rec = run_dir / "train" / "record.json"
    if not rec.is_file():
        return "is not trained yet"
    if (run_dir / TRAINING_MARK).is_file():  # written before training starts, removed when every expert is done
        return "its training was interrupted and is not finished"
    # runs trained before the mark existed: checkpoints left without a finished LoRA
    interrupted = [c for c in (run_dir / "train").glob("**/checkpoints")
                   if any(c.glob("step-*")) and not (c.parent / "done.json").is_file()]
    if interrupted:
        return "its training was interrupted and is not finished"
    if not _has_trained_lora(run_dir) and (read_json(rec).get("settings", {}).get("steps") or 0) > 0:
        return "its training was interrupted and is not finished"
    return None


# ---------------------------------------------------------------- the run's recorded settings (job.json)


def recorded_settings(run_dir: str | Path, cls: type[Settings]) -> dict:
    """The settings of stage `cls` that the run folder last used (job.json), or {}."""
    job = Path(run_dir) / "job.json"
    if not job.is_file():
        return {}
    data = read_json(job)
    return data.get(STAGE_OF[cls]) or {} if isinstance(data, dict) else {}


def _record_settings(run_dir: Path, s: Settings) -> None:
    job = run_dir / "job.json"
    data = read_json(job) if job.is_file() else {}
    data = {k: v for k, v in data.items() if k in STAGE_OF.values()}
    data[STAGE_OF[type(s)]] = s.to_dict()
    write_json(job, data)


def _with_run_model(run_dir: Path, s: Settings) -> Settings:
    """A model the caller left at None is the run's."""
    if getattr(s, "model", None) is None:
        for cls in (TrainSettings, PrepareSettings):
            model = recorded_settings(run_dir, cls).get("model")
            if model:
                return s.replace(model=model)
    if getattr(s, "model", None) is None:
        raise InputError("--model is required: a Wan I2V folder in diffusers layout")
    return s


def _check_model(model: str) -> str:
    from loraedit.models import check_model

    return check_model(model)


def _loaded_libraries() -> None:
    """diffusers and transformers imported and quieted before a stage loads a pipeline (quieting
    them earlier does nothing: they are imported lazily, and their loading bars ignored -q)."""
    import diffusers.utils.logging  # noqa: F401
    import transformers.utils.logging  # noqa: F401

    from loraedit.cli import quiet_libraries

    quiet_libraries()


def _ready(run_dir: Path, s):
    """Settings of a stage on a run: the run's model filled in, input files and model folder checked
    (one line each), the libraries quieted, the device resolved."""
    from loraedit.models import check_attention, resolve_device

    s = _with_run_model(run_dir, s)
    if isinstance(s, TrainSettings):
        s.check_files(run_dir)  # captions the run already made need no captioner
    else:
        s.check_files()
    s = s.replace(model=_check_model(s.model))
    device = resolve_device(s.device)
    check_attention(s.attention, device)  # an attention kernel this machine lacks: one line before any model loads
    _loaded_libraries()
    return s, device


def _no_model(settings: dict) -> dict:
    """Settings for a record: the model is recorded by identity (its contents), not by path."""
    return {k: v for k, v in settings.items() if k != "model"}


def _discard_training(run_dir: Path, why: str) -> None:
    """--restart: remove the trained LoRA and its checkpoints (renders stay, each with its record)."""
    from loraedit import manifest

    gone = [p for p in (run_dir / "train", run_dir / "lora") if p.exists()]
    if not gone:
        return
    for p in gone:
        shutil.rmtree(p)
    manifest.discard(run_dir, "train", why)
    log.info("--restart: discarded %s (%s)", ", ".join(str(p) for p in gone), why)


# ---------------------------------------------------------------- prepare


def _prepare_inputs(s: PrepareSettings) -> dict:
    files = {"video": s.video, "first_frame": s.first_frame, "mask": s.mask, "masks": s.masks}
    files.update({f"ref {k}": p for k, p in s.ref.items()})
    return runstate.file_hashes(files)


def _training_uses_first_frame(model: str, refs: bool, ref_steps: int) -> bool:
    """Stage 2 conditions the references on the edited first frame's CLIP embedding (Wan2.1 only)."""
    if not refs or ref_steps <= 0:
        return False
    from loraedit import family

    return not Path(model).is_dir() or family.detect(model).has_clip


def _trained_from(hashes: dict, model: str, ref_steps: int) -> dict:
    """The parts of a prepared run that training learns from."""
    out = {k: hashes[k] for k in ("frames", "region", "refs", "geometry")}
    if _training_uses_first_frame(model, bool(hashes["refs"]), ref_steps):
        out["first_frame"] = hashes["first_frame"]
    return out


# the run's folders that prepare and train replace or discard (renders are never overwritten)
REPLACED_PARTS = ("prepare", ".prepare-new", ".prepare-old", "train", "lora", "cache")


def _refuse_inputs_the_run_replaces(run_dir: Path, s: PrepareSettings) -> None:
    """An input inside a folder this run replaces (say prepare/source/000.png, edited in place as
    the frame to start from) would be overwritten by the new prepare: refused while it is intact."""
    files = {"--first-frame ": s.first_frame, "--mask ": s.mask, "--masks ": s.masks}
    files.update({f"--ref {k}=": p for k, p in s.ref.items()})
    run = run_dir.resolve()
    for flag, path in files.items():
        if path is None:
            continue
        where = Path(path).resolve()
        for part in REPLACED_PARTS:
            if where == run / part or (run / part) in where.parents:
                cp = "cp -r" if where.is_dir() else "cp"
                raise InputError(f"{flag}{path}: is inside the run's {part}/ folder, which this command rewrites; "
                                 f"copy it out first (e.g. {cp} {path} {run_dir.parent / Path(path).name}) and pass the copy")


def prepare(run_dir: str | Path, s: PrepareSettings, restart: bool = False, then_train: TrainSettings | None = None) -> dict:
    """Frames, edited first frame, references and edit regions → RUN/prepare; returns the plan.

    A prepared run whose LoRA is trained is replaced only where the LoRA's inputs stay the same
    (else InputError; restart=True discards the LoRA). then_train: the training settings that
    will follow (edit), checked against the trained LoRA before anything is replaced.
    """
    from loraedit import manifest
    from loraedit import prepare as stage

    run_dir = Path(run_dir)
    with runstate.run_lock(run_dir, "prepare"):
        s.check_files()
        _refuse_inputs_the_run_replaces(run_dir, s)
        s = s.replace(model=_check_model(s.model))
        record = {"settings": _no_model(s.result_dict()), "inputs": _prepare_inputs(s)}
        rec_file = run_dir / "prepare" / "record.json"
        if rec_file.is_file() and (run_dir / "prepare" / "plan.json").is_file():
            old = read_json(rec_file)
            if not runstate.differences({k: old.get(k) for k in record}, record):
                log.info("prepare: inputs and settings unchanged; reusing %s", run_dir / "prepare")
                _record_settings(run_dir, s)
                return read_json(run_dir / "prepare" / "plan.json")
        t0 = time.perf_counter()
        staging = run_dir / ".prepare-new"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            plan = stage.run(s, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a refused or interrupted prepare leaves nothing half-made
            raise
        hashes = runstate.prepared_hashes(stage.load(staging))
        trained = run_dir / "train" / "record.json"
        if trained.is_file() or _has_trained_lora(run_dir):
            old = read_json(trained) if trained.is_file() else {"inputs": {}}
            before = read_json(rec_file) if rec_file.is_file() else {}
            prepare_changes = runstate.describe_changes({k: before.get(k, {}) for k in ("settings", "inputs")}, record)
            if then_train is not None and trained.is_file() and not restart:
                _check_training(run_dir, old, _train_record(then_train.replace(model=s.model), hashes), staging, prepare_changes)
            new = _trained_from(hashes, s.model, old.get("settings", {}).get("ref_steps", 1))
            was = {k: v for k, v in old.get("inputs", {}).items() if k in new}
            changed = runstate.differences(was, new)
            if changed and not restart:
                shutil.rmtree(staging, ignore_errors=True)
                what = ", ".join(dict.fromkeys(part for x in (prepare_changes, runstate.describe_changes({"inputs": was}, {"inputs": new}))
                                               for part in x.split(", ") if part))
                raise InputError(f"{run_dir}: the LoRA there was trained on other prepared inputs ({what}); "
                                 "use a new --out, or --restart to discard the trained LoRA and train again")
            if changed:
                _discard_training(run_dir, f"prepared inputs changed: {runstate.describe_changes({'inputs': was}, {'inputs': new})}")
        old_dir = run_dir / ".prepare-old"
        shutil.rmtree(old_dir, ignore_errors=True)
        if (run_dir / "prepare").exists():
            (run_dir / "prepare").rename(old_dir)
        (staging / "prepare").rename(run_dir / "prepare")
        shutil.rmtree(old_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        record["made"] = hashes
        write_json(run_dir / "prepare" / "record.json", record)  # last: marks prepare/ complete
        _record_settings(run_dir, s)
        manifest.update(run_dir, "prepare", {"seconds": time.perf_counter() - t0, "plan": plan}, s.to_dict(),
                        inputs=dict(record["inputs"], made=hashes))
        log.info("prepared %d frames at %dx%d in %s", plan["frames"], plan["width"], plan["height"], run_dir / "prepare")
        return plan


def _require_prepared(run_dir: Path) -> None:
    if not (run_dir / "prepare" / "plan.json").is_file():
        raise InputError(f"{run_dir}: is not a prepared run; run `loraedit prepare` (or `loraedit edit`) with --out {run_dir} first")


def _prepared(run_dir: Path) -> dict:
    from loraedit import prepare as stage

    _require_prepared(run_dir)
    return stage.load(run_dir)


# ---------------------------------------------------------------- encode (part of train and render)


def _encode(run_dir: Path, es, prepared: dict, hashes: dict, device):
    """The encodings of `prepared` with `es`, from the cache file named by their inputs' hash, or made now."""
    from safetensors.torch import load_file

    from loraedit import encode

    key = _encoding_key(hashes, es)
    path = run_dir / "cache" / f"encoded-{key}.safetensors"
    reuse = None
    base = runstate.sha256_json([{k: hashes[k] for k in ("frames", "region", "refs", "geometry")}, es.model, es.mode])
    weights = runstate.model_identity(es.model).get("weights")

    def other_weights(p: Path) -> bool:  # made with weights since replaced at the same path (older caches do not say)
        return encode.cache_metadata(p).get("weights", weights) != weights

    if path.is_file() and other_weights(path):
        log.info("%s: encoded with other weights at %s; encoding again", path.name, es.model)
        path.unlink()
    if not path.is_file():
        # a cache of the same frames, regions and references (another first frame or prompt):
        # what does not depend on those is copied, not encoded again
        for other in sorted((run_dir / "cache").glob("encoded-*.safetensors")):
            if encode.cache_metadata(other).get("base") == base and not other_weights(other):
                reuse = load_file(str(other))
                break
    t0 = time.perf_counter()
    made = not path.is_file()
    cache = encode.run(es, path, prepared, device, reuse=reuse, key=key, base=base, weights=weights)
    return cache, key, (time.perf_counter() - t0) if made else None


def _encoding_key(hashes: dict, es) -> str:
    """The name of the cache file holding the encodings of these prepared contents with `es`."""
    from loraedit import encode

    return runstate.sha256_json([hashes, encode.cache_inputs(es)])[:16]


def _prompts(run_dir: Path, train: TrainSettings, prepared: dict, device="cpu") -> tuple[str, str | None]:
    """(source caption, edited caption): as given, or from Florence-2 with --caption auto (caption.py;
    kept in cache/captions.json, so only the first call per pair of first frames loads the captioner)."""
    from loraedit import caption

    return caption.resolve(run_dir, train.prompt, train.edit_prompt, train.caption, train.captioner, prepared, device)


def _encode_settings(model: str, train: TrainSettings, negative_prompt: str | None, prompts: tuple[str, str | None]):
    from loraedit.encode import EncodeSettings

    return EncodeSettings(model=model, prompt=prompts[0], edit_prompt=prompts[1], trigger=train.trigger, mode=train.mode,
                          negative_prompt=negative_prompt, colour_copies=train.colour_copies)


# ---------------------------------------------------------------- train


def _train_record(s: TrainSettings, hashes: dict) -> dict:
    inputs = _trained_from(hashes, s.model, s.ref_steps)
    inputs["model"] = runstate.model_identity(s.model)
    return {"settings": _no_model(s.result_dict()), "inputs": inputs}


def _check_training(run_dir: Path, old: dict, new: dict, staging: Path | None = None, because: str = "") -> None:
    """InputError if the trained (or partly trained) LoRA's record differs from `new`."""
    new = {k: v for k, v in new.items() if k != runstate.ENCODING}
    old = {k: old.get(k) for k in new}
    if isinstance(old.get("inputs"), dict) and isinstance(new.get("inputs"), dict) and "model" in new["inputs"]:
        new["inputs"] = dict(new["inputs"], model=runstate.model_as_recorded(new["inputs"]["model"], old["inputs"].get("model")))
    if isinstance(old.get("settings"), dict) and isinstance(new.get("settings"), dict):
        # a setting a record no longer holds (it was found not to change the LoRA) does not count; one it does
        # not hold yet (added since, e.g. --colour-copies) trained at its default, the behaviour before it existed
        defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
        old["settings"] = {k: old["settings"].get(k, defaults.get(k)) for k in new["settings"]}
    if runstate.differences(old, new):
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _refuse_changed_training(run_dir, old, new, because)


def _refuse_changed_training(run_dir: Path, old: dict, new: dict, because: str = "") -> None:
    what = ", ".join(dict.fromkeys(part for x in (because, runstate.describe_changes(old, new)) for part in x.split(", ") if part))
    state = "was trained" if _has_trained_lora(run_dir) else "is partly trained"
    hint = ""
    changed = runstate.differences(old, new)
    if changed == ["settings.seed"]:
        hint = "; to render with another seed, use `loraedit render --seed N`"
    raise StaleRunError(f"{run_dir}: the LoRA there {state} with other inputs ({what}); use a new --out, or --restart "
                     f"to discard the trained LoRA and train again{hint}")


def train(run_dir: str | Path, s: TrainSettings, restart: bool = False, progress: bool = True) -> dict:
    """Encode (cached) and train the LoRA of a prepared run; returns the training figures."""
    run_dir = Path(run_dir)
    with runstate.run_lock(run_dir, "train"):
        from loraedit import manifest
        from loraedit import train as stage
        from loraedit.models import log_plan

        _require_prepared(run_dir)  # said first: without a prepared run, a missing --model is not the problem
        s, device = _ready(run_dir, s)
        prepared = _prepared(run_dir)
        log_plan(s.model, prepared["plan"], device)  # what fits this clip on this GPU, before anything loads
        hashes = runstate.prepared_hashes(prepared)
        negative = recorded_settings(run_dir, RenderSettings).get("negative_prompt")
        es = _encode_settings(s.model, s, negative, _prompts(run_dir, s, prepared, device))
        record = _train_record(s, hashes)
        # the texts training conditions on, as resolved (--caption auto): the video's, and stage 2's
        record["texts"] = {"video": es.texts[0], "references": es.texts[1] if hashes["refs"] and s.ref_steps > 0 else None}
        record[runstate.ENCODING] = _encoding_key(hashes, es)  # the cache it trains from (not an input: never compared)
        rec_file = run_dir / "train" / "record.json"
        old = read_json(rec_file) if rec_file.is_file() else None
        leftovers = _has_trained_lora(run_dir) or (run_dir / "train" / "checkpoints").is_dir()
        if restart:
            _discard_training(run_dir, "--restart")
        elif old is not None:
            _check_training(run_dir, old, record)
        elif old is None and leftovers:
            raise InputError(f"{run_dir}: holds a LoRA or checkpoints without a record of how they were trained; "
                             "use a new --out, or --restart to discard them and train again")
        write_json(rec_file, record)  # before the first step: a resume is checked against it
        # before the first step too: `loraedit train --out RUN` after an interrupted edit resumes with these
        # settings (also when reused: a render takes --edit-prompt from here)
        _record_settings(run_dir, s)
        cache, key, seconds = _encode(run_dir, es, prepared, hashes, device)
        if seconds is not None:
            manifest.update(run_dir, "encode", {"seconds": seconds, "cache": f"cache/encoded-{key}.safetensors",
                                                "texts": list(es.texts)}, es.__dict__)
        write_json(run_dir / TRAINING_MARK, {"started": time.time(), "pid": os.getpid()})
        figures = stage.run(s, run_dir, cache, device, progress=progress)
        (run_dir / TRAINING_MARK).unlink()  # every expert is done: the run can be rendered
        if figures.get("reused"):
            return figures
        manifest.update(run_dir, "train", figures, s.to_dict(), inputs=dict(record["inputs"], texts=record["texts"]))
        return figures


# ---------------------------------------------------------------- render


def _render_plan(run_dir: Path, s: RenderSettings) -> tuple[dict, dict, object, dict]:
    """(prepared, hashes, encode settings, the render's record) for rendering `s` now."""
    from loraedit.video import read_edited_fitted

    prepared = _prepared(run_dir)
    train_rec_file = run_dir / "train" / "record.json"
    train_rec = read_json(train_rec_file) if train_rec_file.is_file() else None
    trained = TrainSettings.from_values(dict(recorded_settings(run_dir, TrainSettings), model=s.model))
    if train_rec is not None:
        have = runstate.model_identity(s.model)
        if train_rec["inputs"].get("model") != runstate.model_as_recorded(have, train_rec["inputs"].get("model")):
            was = recorded_settings(run_dir, TrainSettings).get("model")
            if was and Path(was).resolve() == Path(s.model).resolve():
                raise InputError(f"--model {s.model}: its weights or configs have changed since the run's LoRA was trained "
                                 "on it; put the model back as it was, or train a new run on it")
            raise InputError(f"--model {s.model}: the run's LoRA was trained on another model ({was}); "
                             "render with that model, or train a new run on this one")
    if s.first_frame:
        # another edited first frame: same frames and regions, new condition and image embedding
        plan = prepared["plan"]
        new_first = read_edited_fitted(s.first_frame, prepared["source"][0], plan["source_width"], plan["source_height"],
                                       plan.get("source_stored"))
        _warn_beyond_region(prepared, new_first, s.first_frame)
        prepared["first"] = new_first
    hashes = runstate.prepared_hashes(prepared)
    es = _encode_settings(s.model, trained, s.negative_prompt, _prompts(run_dir, trained, prepared))
    from loraedit.models import lora_digest

    record = _no_model(s.result_dict())
    record.update(first_frame=hashes["first_frame"], encoding=_encoding_key(hashes, es),
                  lora=lora_digest(run_dir), model=runstate.model_identity(s.model), prompt=es.texts[1])
    # what the video file gets beyond the frames: their rate, and the sound of the source it was prepared from
    record.update(fps=prepared["plan"]["fps"], sound=_source_sound(run_dir, prepared["plan"]))
    return prepared, hashes, es, record


def _source_sound(run_dir: Path, plan: dict) -> str | None:
    """The sha256 of the source video whose sound the render carries: None when the clip has none, the
    frames do not start at its start, or the file at the recorded path is gone or another file now
    (another clip's sound under these frames would be wrong)."""
    in_sync = plan.get("audio_in_sync", plan["indices"] == list(range(plan["frames"])))
    video = recorded_settings(run_dir, PrepareSettings).get("video")
    if not (plan.get("has_audio") and in_sync and video):
        return None
    prep_rec = run_dir / "prepare" / "record.json"
    was = read_json(prep_rec).get("inputs", {}).get("video") if prep_rec.is_file() else None
    if not Path(video).is_file() or (was is not None and runstate.file_hashes({"video": video}).get("video") != was):
        log.warning("render: %s is gone or has changed since it was prepared; the result gets no sound from it", video)
        return None
    return was


RENDER_KEYS_ADDED = ("fps", "sound")  # recorded since 2026-11-27: a render recorded before is compared without them


def _same_render(done: dict, record: dict) -> bool:
    """Whether a render's settings.json is this render (its model compared on what it recorded)."""
    record = {k: v for k, v in record.items() if k in done or k not in RENDER_KEYS_ADDED}
    return done == dict(record, model=runstate.model_as_recorded(record.get("model"), done.get("model")))


def _warn_beyond_region(prepared: dict, first, path: str) -> None:
    """Only the trained region is generated: an edit in another first frame outside it is lost."""
    from loraedit import region

    try:
        changed = region.find_edit_region(prepared["source"][0], first, where=path)
    except InputError:
        return
    outside = changed & ~prepared["region"][0]
    if outside.sum() > 0.05 * max(1, changed.sum()):
        log.warning("%s: %.0f%% of its edit lies outside the region the LoRA was trained on; only that region is "
                    "generated, so the rest of the edit is lost — prepare and train a new run with this first frame",
                    path, 100.0 * outside.sum() / changed.sum())


def render(run_dir: str | Path, s: RenderSettings, name: str | None = None, progress: bool = True) -> Path:
    """Render the trained run with `s` into a new folder of the run (render, render-2, …, or `name`)."""
    run_dir = Path(run_dir)
    with runstate.run_lock(run_dir, "render"):
        from loraedit import manifest
        from loraedit import render as stage

        _require_prepared(run_dir)
        unfinished = training_unfinished(run_dir)
        if unfinished:  # a render now would be the base model's video in the folder that holds the result
            raise InputError(f"{run_dir}: {unfinished}; run `loraedit train --out {run_dir}` (or the same `loraedit edit` "
                             "again) to finish it, then render")
        s, device = _ready(run_dir, s)
        prepared, hashes, es, record = _render_plan(run_dir, s)
        if name is None:  # a render with exactly these inputs is reused, as `edit` does, not made again
            for done in sorted(run_dir.glob("*/settings.json")):
                if _same_render(read_json(done), record):
                    log.info("already rendered with these settings: %s", done.parent / "edited.mp4")
                    return done.parent
        out_dir = stage.output_dir(run_dir, name)
        if (out_dir / "settings.json").is_file():
            if _same_render(read_json(out_dir / "settings.json"), record):
                log.info("already rendered with these settings: %s", out_dir / "edited.mp4")
                return out_dir
            raise InputError(f"{out_dir}: holds a render with other settings; choose another --name (renders are never overwritten)")
        # the caption is the trained run's (train's --edit-prompt), not a render setting: say which one it is
        log.info("render: with the run's edited-video caption %r (`loraedit edit --edit-prompt` renders another)", es.texts[1])
        cache, key, _ = _encode(run_dir, es, prepared, hashes, device)
        # the sound comes from the source file, only while it is the file the frames were taken from (_source_sound)
        source_video = recorded_settings(run_dir, PrepareSettings).get("video") if record["sound"] else None
        figures = stage.run(s, run_dir, prepared, cache, device, out_dir, progress=progress, source_video=source_video,
                            record=record)
        manifest.update(run_dir, out_dir.name, dict(figures, cache=f"cache/encoded-{key}.safetensors"), s.to_dict(),
                        inputs={k: record[k] for k in ("first_frame", "lora", "encoding", "model")})
        # not recorded in job.json: a render is a one-off (its settings.json records it); the run's
        # render settings, which later commands start from, are those `edit` renders with
        log.info("wrote %s", out_dir / "edited.mp4")
        return out_dir


def edit(run_dir: str | Path, prep: PrepareSettings, tr: TrainSettings, rend: RenderSettings,
         restart: bool = False, progress: bool = True) -> Path:
    """prepare → train → render; a rerun does only what is not done yet. Returns the render folder."""
    run_dir = Path(run_dir)
    with runstate.run_lock(run_dir, "edit"):
        if tr.model is None:
            tr = tr.replace(model=prep.model)
        if rend.model is None:
            rend = rend.replace(model=prep.model)
        prep.check_files()
        tr.check_files(run_dir)  # a missing captioner is said before the frames are prepared
        rend.check_files()  # and a setting the model does not take (--guidance-2)
        from loraedit.models import resolve_device

        resolve_device(tr.device), resolve_device(rend.device)  # --device cuda without a GPU: said before preparing
        prepare(run_dir, prep, restart=restart, then_train=tr)
        train(run_dir, tr, restart=restart, progress=progress)
        # a rerun of an interrupted edit finishes render/; a rerun of a finished one with the same
        # settings has nothing left to do; with other settings (or a new LoRA) it renders beside the others
        rend = rend.replace(model=_check_model(rend.model), first_frame=None)
        _record_settings(run_dir, rend)  # the run's render settings (before rendering: a rerun after Ctrl-C finds them)
        _, _, _, want = _render_plan(run_dir, rend)
        for done in sorted(run_dir.glob("render*/settings.json")):
            if read_json(done) == want:
                log.info("already rendered with these settings: %s", done.parent / "edited.mp4")
                return done.parent
        first = run_dir / "render"
        return render(run_dir, rend, name=None if (first / "settings.json").is_file() else "render", progress=progress)


__all__ = ["prepare", "train", "render", "edit", "recorded_settings", "PrepareSettings", "TrainSettings", "RenderSettings"]
