"""The `loraedit` command: flags → typed stage settings → loraedit.api.

    loraedit edit      prepare → encode → train → render, in one go (each step resumes)
    loraedit prepare   frames, edited first frame, edit regions → RUN/prepare
    loraedit train     encode (cached) and train the LoRA of a prepared run
    loraedit render    render a trained run again (other seed, sampling settings or first frame)

Each command takes exactly the flags of the stages it runs (loraedit/settings.py declares them);
a flag of another command is an error naming the command that takes it.

Settings, lowest to highest precedence: built-in defaults, the run's job.json (for a run that
exists; per stage), the --config TOML file, flags on the command line. job.json holds what the run
was made with: the prepare and train settings of its last prepare/train/edit, and the render
settings of its last `edit` (a `loraedit render` is a one-off with its own record, never inherited,
so `edit` after `render --seed 3` renders with the trained seed). A command says in one line which
settings it took from job.json that differ from the defaults. Every value is read and checked
here, before torch or a model is imported, so a mistake costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from loraedit import __version__, settings as S
from loraedit.errors import InputError

log = logging.getLogger("loraedit")

OPTIONAL_COMMANDS = ("loraedit.maskcli", "loraedit.demo", "loraedit.batch", "loraedit.evaluate", "loraedit.uicli", "loraedit.plan")
# a full disk or a folder without permission: the user's to fix, reported in one line
USER_FIXABLE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
# what an interrupted command leaves, and how to go on
INTERRUPTED = {
    "edit": "run the same command again to go on (training resumes from its last checkpoint)",
    "train": "run the same command again to resume from the last checkpoint",
    "prepare": "run the same command again",
    "render": "the unfinished render is not marked complete (it has no settings.json); run the command again to render it",
}
STAGE_COMMANDS = {
    "edit": "prepare, train and render in one go",
    "prepare": "pick frames and build the edit regions",
    "train": "encode and train the LoRA of a prepared run",
    "render": "render a trained run again (another seed, sampling settings or first frame)",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `loraedit: error:` line (InputError), not a usage dump."""

    def error(self, message):
        raise InputError(f"{self.prog.removeprefix('loraedit ')}: {message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="loraedit", description="Edit a whole video from an edited first frame.")
    parser.add_argument("--version", action="version", version=f"loraedit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--out", required=True, help="the run folder")
        p.add_argument("--config", help="TOML job file; its keys are the flag names (keys of other commands are ignored)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if name in ("edit", "train", "prepare"):
            p.add_argument("--restart", action="store_true",
                           help="discard the run's trained LoRA and checkpoints and train again (needed when a training input changed)")
        if name == "render":
            p.add_argument("--name", help="output folder inside the run (default: render, then render-2, …)")
        S.add_arguments(p, S.command_fields(name).values())
        p.set_defaults(func=run_command)
    for module in OPTIONAL_COMMANDS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


# ---------------------------------------------------------------- settings


def _load_toml(path: str) -> tuple[dict, Path]:
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
    known = S.all_fields()
    out = {}
    spelt: dict[str, str] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise InputError(f"{path}: unknown setting '{key}'; the keys are the flag names of `loraedit edit --help`")
        if name in spelt:  # render-steps and render_steps: one setting, and which one wins is a guess
            raise InputError(f"{path}: '{spelt[name]}' and '{key}' are the same setting; keep one")
        spelt[name] = key
        out[name] = _beside(value, known[name], p.parent)
        S.read_value(known[name], out[name], str(p))  # checked here, also when a flag on the command line overrides it
    return out, p


def _beside(value, f, folder: Path):
    """Relative paths in a job file are relative to the file, not to where loraedit is run."""
    parse = f.metadata["parse"]

    def fix(v, hub_id_possible: bool = False):
        if not isinstance(v, str) or not v.strip() or Path(v).expanduser().is_absolute():
            return v
        if hub_id_possible and not (folder / v).exists():
            return v  # --model may name a downloaded hub model (org/name) rather than a folder
        return str(folder / v)

    if parse is S.model_path:
        return fix(value, hub_id_possible=True)
    if parse is S.path:
        return fix(value)
    if parse is S.refs:
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            return [f"{k}{sep}{fix(v)}" for k, sep, v in (i.partition("=") for i in items)]
    return value


def _unknown_flags(command: str, extras: list[str]) -> None:
    for item in extras:
        if not item.startswith("--"):
            raise InputError(f"{command}: unexpected argument {item!r}; flags take the form --name VALUE")
        flag = item.split("=", 1)[0]
        name = flag[2:].replace("-", "_")
        takers = [c for c in S.commands_taking(name) if S.flag_name(S.command_fields(c)[name]) == flag]
        if takers:
            raise InputError(f"{command}: {flag} is not a setting of `loraedit {command}`; it belongs to "
                             + " and ".join(f"`loraedit {c}`" for c in takers))
        raise InputError(f"{command}: unknown flag {flag}; see `loraedit {command} --help`")


@dataclass
class Invocation:
    """A parsed stage command: where, what, and each stage's settings."""

    command: str
    out: Path
    quiet: bool = False
    restart: bool = False
    name: str | None = None
    stages: dict[type, S.Settings] = field(default_factory=dict)
    inherited: dict[str, object] = field(default_factory=dict)  # flag → value taken from the run's job.json

    def get(self, cls):
        return self.stages.get(cls)


def resolve(argv: list[str]) -> Invocation | argparse.Namespace:
    """Parse and check a command line; for a stage command, every setting read and validated."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command not in STAGE_COMMANDS:
        if extras:
            _unknown_flags(args.command, extras)  # one line naming the command (and the one that takes the flag)
        return args
    if extras:
        _unknown_flags(args.command, extras)
    inv = Invocation(command=args.command, out=Path(args.out).expanduser().absolute(), quiet=args.quiet,
                     restart=getattr(args, "restart", False), name=check_render_name(getattr(args, "name", None)))
    flags = {k: v for k, v in vars(args).items() if k in S.command_fields(args.command)}
    toml, toml_path = _load_toml(args.config) if args.config else ({}, None)
    from loraedit.api import recorded_settings

    for cls in S.COMMANDS[args.command]:
        names = {f.name for f in fields(cls)}
        values, sources = {}, {}
        for k, v in recorded_settings(inv.out, cls).items():
            if k in names and S.all_fields()[k].metadata["inherit"]:
                values[k] = v
                sources[k] = str(inv.out / "job.json")
        for k, v in toml.items():
            if k in names:
                values[k], sources[k] = v, str(toml_path)
        for k, v in flags.items():
            if k in names:
                values[k] = v
                sources.pop(k, None)
        if cls is S.PrepareSettings and "frames" not in values:
            from loraedit.family import own_working_size

            own = own_working_size(values.get("model"))
            if own is not None:  # the bundled toy model: its own 17 frames by default, as its own size (prepare.select)
                values["frames"] = own[1]
        if args.command == "edit" and cls is S.RenderSettings:
            values.pop("first_frame", None)  # edit renders the first frame it prepared
            # one --seed in edit: the render samples with the seed the LoRA is trained with
            values["seed"] = inv.stages[S.TrainSettings].seed
            sources.pop("seed", None)
        inv.stages[cls] = cls.from_values(values, sources)
        job = str(inv.out / "job.json")
        own = {f.name: f for f in fields(cls)}
        for k, where in sources.items():
            f = own[k]
            default = f.default if f.default is not MISSING else f.default_factory()
            value = getattr(inv.stages[cls], k)
            if where == job and value != default:
                inv.inherited.setdefault(S.flag_name(f), value)
    inv.out = check_out(args.out)
    return inv


def describe_inherited(inherited: dict[str, object]) -> str:
    """'--model /m, --steps 2, --ref 8=a.png' for the one line naming what a command took from the run."""
    def shown(v):
        if isinstance(v, dict):
            return " ".join(f"{k}={x}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return " ".join(str(x) for x in v)
        text = str(v)
        return text if text and not any(c.isspace() for c in text) else repr(text)

    return ", ".join(f"{flag} {shown(v)}" for flag, v in inherited.items())


RUN_PARTS = ("prepare", "train", "lora", "cache")  # the run's own folders: never a render's name


def check_render_name(name: str | None, flag: str = "--name") -> str | None:
    """--name: one folder inside the run (a path could write the render anywhere, or into lora/)."""
    if name is None:
        return None
    if not name.strip() or name != Path(name).name or name.startswith(".") or "\\" in name or name in RUN_PARTS:
        raise InputError(f"{flag} {name!r}: must be the name of a folder inside the run, not a path, a hidden name or one of "
                         f"{', '.join(RUN_PARTS)}; e.g. {flag} blue")
    return name


def check_out(out: str, what: str = "run folder", flag: str = "--out") -> Path:
    """--out (or another folder flag): a folder (existing or to be made) that this user can write. A folder that does not
    exist yet is made to see that it can be, and removed again: the command makes it when it starts
    work, so a refused command leaves nothing behind."""
    from loraedit.files import missing_folders, remove_empty_folders

    p = Path(out).expanduser()
    if p.is_file():
        raise InputError(f"{flag} {out}: is an existing file, not a {what}; pass a folder path")
    made = missing_folders(p)
    try:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{flag} {out}: cannot create the {what} ({exc.strerror}); pass a folder you can write") from None
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {out}: the {what} is not writable; pass a folder you can write")
    finally:
        remove_empty_folders(made)
    return p.resolve()


def run_command(inv: Invocation) -> int:
    from loraedit import api

    S_ = inv.stages
    if inv.inherited:
        log.info("%s: from the run's job.json (a flag changes one): %s", inv.command, describe_inherited(inv.inherited))
    if inv.command == "prepare":
        api.prepare(inv.out, S_[S.PrepareSettings], restart=inv.restart)
    elif inv.command == "train":
        api.train(inv.out, S_[S.TrainSettings], restart=inv.restart, progress=not inv.quiet)
    elif inv.command == "render":
        api.render(inv.out, S_[S.RenderSettings], name=inv.name, progress=not inv.quiet)
    else:
        api.edit(inv.out, S_[S.PrepareSettings], S_[S.TrainSettings], S_[S.RenderSettings], restart=inv.restart,
                 progress=not inv.quiet)
    return 0


def quiet_libraries() -> None:
    """The libraries' own chatter (deprecations, optional backends) is not the user's business."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*non-writable tensors.*")
    for name in ("diffusers", "transformers"):
        if name not in sys.modules:
            continue  # not imported (yet): nothing to quiet, and importing it here costs seconds
        lib_logging = importlib.import_module(f"{name}.utils.logging")
        lib_logging.set_verbosity_error()
        lib_logging.disable_progress_bar()  # loading bars; our own stages show progress with an ETA


def stop_on_sigint() -> None:
    """Make SIGINT stop a run cleanly (KeyboardInterrupt: checkpoint kept, "run again to resume") even when the
    process inherited it ignored: a shell starts a script's background jobs (`loraedit ui &`, nohup) with SIGINT
    ignored, every child inherits that, and the web UI's Stop button, which sends SIGINT, then did nothing for
    the queue's 60 s grace before the job was terminated without its message."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    stop_on_sigint()
    logging.basicConfig(format="loraedit: %(message)s", level=logging.WARNING, stream=sys.stderr)
    log.setLevel(logging.INFO)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    inv = None
    from loraedit import runstate

    runstate.last_command = runstate.last_error = None
    try:
        inv = resolve(argv)
        return inv.func(inv) if isinstance(inv, argparse.Namespace) else run_command(inv)
    except InputError as exc:
        print(f"loraedit: error: {exc}", file=sys.stderr)
        runstate.last_error = exc
        return 2
    except KeyboardInterrupt:
        command = runstate.last_command or getattr(inv, "command", None)  # edit: the stage it was in
        print(f"loraedit: interrupted; {INTERRUPTED.get(command, 'nothing half-written is kept')}", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in USER_FIXABLE_ERRNOS:
            raise
        # the disk filled up, or a folder is not writable: the user's to fix, so one line
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"loraedit: error: {exc.strerror}{where}; free space or fix the permissions, then run the same command again",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
