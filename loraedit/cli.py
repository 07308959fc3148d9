"""The `loraedit` command: argument parsing, job files, and the order of the stages.

    loraedit edit      prepare → encode → train → render, in one go (each step resumes)
    loraedit prepare   frames, edited first frame, edit regions → RUN/prepare
    loraedit train     encode (cached) and train the LoRA of a prepared run
    loraedit render    render a trained run again (other seed, sampling settings or first frame)

Settings, lowest to highest precedence: built-in defaults, the run's job.json (for a run that
exists), the --config TOML file, flags on the command line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from loraedit import __version__, masks, method
from loraedit.errors import InputError
from loraedit.files import read_json, sha256_file, write_json
from loraedit.models import DEFAULT_LORA_TARGETS
from loraedit.video import fit_edited, read_image

log = logging.getLogger("loraedit")

PATH_KEYS = ("model", "video", "first_frame", "mask", "masks", "sam2_checkpoint")
# settings that change what the LoRA learns; a different value with an existing run is refused
TRAINING_KEYS = ("model", "video", "first_frame", "frames", "size", "start", "stride", "mode", "prompt", "steps",
                 "ref_steps", "rank", "alpha", "lora_targets", "lr", "weight_decay", "grad_clip", "timesteps",
                 "train_shift", "ref_video_every", "seed", "memory")
OPTIONAL_COMMANDS = ("loraedit.maskcli", "loraedit.demo", "loraedit.batch", "loraedit.evaluate")


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--model", help="Wan I2V model folder in diffusers layout (or a hub id, where there is network)")
    g.add_argument("--video", help="source video")
    g.add_argument("--first-frame", dest="first_frame", help="the edited first frame (PNG/JPEG)")
    g.add_argument("--ref", action="append", metavar="K=PATH", help="edited later frame K (0 < K < frames) as an appearance reference; repeatable")
    g.add_argument("--prompt", default="", help="what the edited video shows (optional)")
    g.add_argument("--negative-prompt", dest="negative_prompt", default=method.WAN_NEGATIVE_PROMPT, help="default: Wan's")
    g.add_argument("--frames", type=int, default=49, help="frames to edit, 4k+1 (default 49)")
    g.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (default 832x480 or 480x832 by aspect)")
    g.add_argument("--start", type=int, default=0, help="first source frame to use (default 0)")
    g.add_argument("--stride", type=int, help="use every N-th frame (default: spread evenly over the clip)")
    g.add_argument("--mode", choices=("mask-aware", "naive"), default="mask-aware",
                   help="mask-aware (default) or naive: the paper's baseline with the stock first-frame mask")
    masks.add_mask_arguments(p)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=100, help="stage-1 steps on the video (default 100)")
    g.add_argument("--ref-steps", dest="ref_steps", type=int, default=100, help="stage-2 steps on the references (default 100; only with --ref)")
    g.add_argument("--ref-video-every", dest="ref_video_every", type=int, default=10, help="stage 2: every N-th step trains on the video (default 10)")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    g.add_argument("--lora-targets", dest="lora_targets", default=DEFAULT_LORA_TARGETS,
                   help="regex of the layers to adapt (default: every linear layer of each block but the image k/v)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.01)
    g.add_argument("--grad-clip", dest="grad_clip", type=float, default=1.0)
    g.add_argument("--timesteps", choices=("uniform", "shifted", "logit-normal"), default="uniform", help="training noise levels (default uniform, as the paper)")
    g.add_argument("--train-shift", dest="train_shift", type=float, default=5.0, help="shift for --timesteps shifted")
    g.add_argument("--memory", choices=("auto", "fp32", "bf16", "fp8"), default="auto",
                   help="base weights: fp32 (CPU default), bf16 (GPU default), fp8 (stored in float8, lowest memory)")
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", choices=("auto", "on", "off"), default="auto", help="auto: on for GPU")
    g.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=25, help="save a resumable checkpoint every N steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rendering")
    g.add_argument("--render-steps", dest="render_steps", type=int, default=30, help="sampling steps (default 30)")
    g.add_argument("--shift", type=float, default=5.0, help="sampling flow shift (default 5)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0; 1 disables)")
    g.add_argument("--composite", action="store_true", help="paste the source back outside the (feathered) edit region")
    g.add_argument("--feather", type=int, default=8, help="--composite: blend band in pixels (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraedit", description="Edit a whole video from an edited first frame.")
    parser.add_argument("--version", action="version", version=f"loraedit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name, help, inputs, train, render, func):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--out", required=True, help="the run folder")
        p.add_argument("--config", help="TOML job file; its keys are the flag names")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if inputs:
            add_input_arguments(p)
        if train:
            add_train_arguments(p)
        if render:
            add_render_arguments(p)
        p.set_defaults(func=func)
        return p

    stage("edit", "prepare, train and render in one go", True, True, True, cmd_edit)
    stage("prepare", "pick frames and build the edit regions", True, True, True, cmd_prepare)
    stage("train", "encode and train the LoRA of a prepared run", True, True, True, cmd_train)
    p = stage("render", "render a trained run again", True, True, True, cmd_render)
    p.add_argument("--name", help="output folder inside the run (default: render, then render-2, …)")
    for module in OPTIONAL_COMMANDS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


# ---------------------------------------------------------------- settings


def _explicit_keys(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The settings given on the command line (not defaults)."""
    def suppress(p):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    suppress(child)
            elif action.dest not in ("help", "version", "command"):
                action.default = argparse.SUPPRESS
    suppress(parser)
    return set(vars(parser.parse_args(argv))) - {"func", "command"}


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such job file; check --config")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); fix the file") from None
    out = {k.replace("-", "_"): v for k, v in data.items()}
    if isinstance(out.get("ref"), dict):
        out["ref"] = [f"{k}={v}" for k, v in out["ref"].items()]
    # relative paths in a job file are relative to the file, not to where loraedit is run
    def beside_file(path: str) -> str:
        return str(p.parent / path) if not Path(path).is_absolute() and (p.parent / path).exists() else path

    for key in PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = beside_file(out[key])
    if "ref" in out:
        out["ref"] = [f"{k}={beside_file(path)}" for k, _, path in (r.partition("=") for r in out["ref"])]
    return out


def resolve_settings(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = _explicit_keys(build_parser(), argv)
    settings = dict(vars(args))
    run_dir = Path(args.out) if getattr(args, "out", None) else None
    job = run_dir / "job.json" if run_dir else None
    if job is not None and job.is_file():
        for k, v in read_json(job).items():
            if k in settings and k not in explicit:
                settings[k] = v
    if getattr(args, "config", None):
        for k, v in _load_toml(args.config).items():
            if k not in settings:
                raise InputError(f"{args.config}: unknown setting '{k}'; see `loraedit {args.command} --help` for the names")
            if k not in explicit:
                settings[k] = v
    for key in PATH_KEYS:
        if isinstance(settings.get(key), str) and Path(settings[key]).exists():
            settings[key] = os.path.abspath(settings[key])
    if settings.get("ref"):
        settings["ref"] = [f"{k}={os.path.abspath(p) if Path(p).exists() else p}" for k, _, p in (r.partition("=") for r in settings["ref"])]
    return argparse.Namespace(**settings)


def job_settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "out", "config", "quiet", "name")}


def _check_numbers(args) -> None:
    for key, low in (("steps", 0), ("ref_steps", 0), ("rank", 1), ("render_steps", 1), ("checkpoint_every", 1), ("frames", 1)):
        if getattr(args, key, low) < low:
            raise InputError(f"--{key.replace('_', '-')} must be at least {low}")
    if getattr(args, "lr", 1) <= 0:
        raise InputError("--lr must be positive")


# ---------------------------------------------------------------- the commands


def _require_model(args) -> None:
    from loraedit.models import check_model

    if not args.model:
        raise InputError("--model is required: a Wan I2V folder in diffusers layout")
    args.model = check_model(args.model)


def cmd_prepare(args) -> int:
    from loraedit import manifest, prepare

    _check_numbers(args)
    _require_model(args)
    run_dir = Path(args.out)
    job = run_dir / "job.json"
    if job.is_file():
        old = read_json(job)
        changed = [k for k in TRAINING_KEYS if k in old and old[k] != getattr(args, k, None)]
        if changed and (run_dir / "train").exists():
            raise InputError(f"{run_dir}: was trained with other settings ({', '.join(changed)}); use a new --out folder")
    t0 = time.perf_counter()
    plan = prepare.run(args, run_dir)
    write_json(job, job_settings(args))
    manifest.update(run_dir, "prepare", {"seconds": time.perf_counter() - t0, "plan": plan}, job_settings(args))
    log.info("prepared %d frames at %dx%d in %s", plan["frames"], plan["width"], plan["height"], run_dir / "prepare")
    return 0


def _prepared(args) -> tuple[Path, dict]:
    from loraedit import prepare

    run_dir = Path(args.out)
    if not (run_dir / "prepare" / "plan.json").is_file():
        raise InputError(f"{run_dir}: is not a prepared run; run `loraedit prepare` (or `loraedit edit`) with --out {run_dir} first")
    return run_dir, prepare.load(run_dir)


def cmd_train(args) -> int:
    from loraedit import encode, manifest, train
    from loraedit.models import resolve_device

    _check_numbers(args)
    _require_model(args)
    run_dir, prepared = _prepared(args)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    cache = encode.run(args, run_dir / "cache" / "encoded.safetensors", prepared, device)
    manifest.update(run_dir, "encode", {"seconds": time.perf_counter() - t0}, job_settings(args))
    figures = train.run(args, run_dir, cache, device, progress=not args.quiet)
    write_json(run_dir / "job.json", job_settings(args))
    manifest.update(run_dir, "train", figures, job_settings(args))
    return 0


def cmd_render(args, out_name: str | None = None) -> int:
    from loraedit import encode, manifest, render
    from loraedit.models import resolve_device

    _check_numbers(args)
    _require_model(args)
    run_dir, prepared = _prepared(args)
    device = resolve_device(args.device)
    saved = read_json(run_dir / "job.json")
    cache_file = run_dir / "cache" / "encoded.safetensors"
    reuse = None
    if args.first_frame and saved.get("first_frame") != args.first_frame:
        # another edited first frame: same frames and regions, new condition and image embedding
        plan = prepared["plan"]
        prepared["first"] = fit_edited(read_image(args.first_frame), plan["width"], plan["height"],
                                               plan["source_width"], plan["source_height"], args.first_frame)
        prepared["plan"] = dict(plan, first_frame_sha256=sha256_file(args.first_frame))
        if cache_file.is_file():
            reuse = load_file(str(cache_file))
        cache_file = run_dir / "cache" / f"encoded-{prepared['plan']['first_frame_sha256'][:12]}.safetensors"
    cache = encode.run(args, cache_file, prepared, device, reuse=reuse)
    out_dir = render.output_dir(run_dir, out_name or getattr(args, "name", None))
    figures = render.run(args, run_dir, prepared, cache, device, out_dir, progress=not args.quiet)
    manifest.update(run_dir, out_dir.name, figures, job_settings(args))
    log.info("wrote %s", out_dir / "edited.mp4")
    return 0


def cmd_edit(args) -> int:
    from loraedit import render

    cmd_prepare(args)
    cmd_train(args)
    # a rerun of an interrupted edit finishes render/; a rerun of a finished one with the same
    # settings has nothing left to do; with other render settings it renders beside the first
    run_dir, prepared = _prepared(args)
    for done in sorted(run_dir.glob("render*/settings.json")):
        if read_json(done) == render.render_settings(args, run_dir, prepared):
            log.info("already rendered with these settings: %s", done.parent / "edited.mp4")
            return 0
    first = run_dir / "render"
    return cmd_render(args, out_name=None if (first / "settings.json").is_file() else "render")


def _quiet_libraries() -> None:
    """The libraries' own chatter (deprecations, optional backends) is not the user's business."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*non-writable tensors.*")
    for name in ("diffusers", "transformers"):
        try:
            lib_logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        lib_logging.set_verbosity_error()
        lib_logging.disable_progress_bar()  # loading bars; our own stages show progress with an ETA


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="loraedit: %(message)s", level=logging.WARNING, stream=sys.stderr)
    log.setLevel(logging.INFO)
    _quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = resolve_settings(argv)
        return args.func(args)
    except InputError as exc:
        print(f"loraedit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraedit: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
