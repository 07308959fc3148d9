"""`loraedit batch`: many edits, one after another here or in parallel on a Ray cluster.

    loraedit batch jobs/ --out ROOT                  # every jobs/*.toml, one after another
    loraedit batch shots.toml --out ROOT --ray auto  # [[job]] tables, on the running Ray cluster

A job is a `--config` TOML file (keys = flag names, paths relative to the file), or one `[[job]]`
table of a batch file whose other top-level keys are defaults for every job. A job's name (its
`name` key, else the file's stem) is its run folder ROOT/<name>. A list where a flag takes one
value lists variants: `mode = ["mask-aware", "naive"]` and `seed = [0, 1]` make four runs,
ROOT/<name>.mode-naive.seed-1 and so on; a list of `[ref]` tables lists reference variants, and
`[[job.variant]]` tables (each with a `name`) add hand-made ones.

Each job runs `loraedit edit` on its run folder, then `loraedit eval` on the result. With `--ray`
each job is one Ray task (`num_gpus` per job, CPUs only when its device is `cpu`) retried up to
`--max-retries` times when its worker dies; the retry resumes from the run's last checkpoint, so
its LoRA is the one an uninterrupted run gives. Ray does the scheduling; ROOT must be a path every
node sees. A job with bad input fails alone with its one-line error.

ROOT/.jobs/<name>.json is each job's state (written by the job itself, so every node can report),
ROOT/batch.json the whole batch, ROOT/index.html the page to open. Running the same command again
redoes only jobs that are not done with the same settings and inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import io
import itertools
import json
import logging
import math
import os
import re
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from loraedit.errors import InputError, StaleRunError
from loraedit.files import atomic_output, read_json, write_json

log = logging.getLogger("loraedit")

NOT_JOB_KEYS = ("out", "config", "quiet", "command", "func", "name", "restart")  # flags a job may not set
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
RESERVED = ("batch.json", "index.html")  # the batch folder's own files: not a job's run folder
# Ray workers share the node's cores with other jobs: no busy-waiting OpenMP threads
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Job:
    name: str
    settings: dict  # flag dest → value, as in a --config file after loading (paths absolute)
    origin: str  # the file (and table) it came from
    variant: dict = field(default_factory=dict)  # what this variant changes, for the page
    error: str | None = None  # a mistake found when reading the job (it then fails alone)


# ---------------------------------------------------------------- reading jobs


def _edit_actions() -> dict[str, argparse.Action]:
    """The `loraedit edit` flags by dest: what a job may set, and how each becomes argv."""
    from loraedit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["edit"]._actions if a.option_strings and a.dest not in NOT_JOB_KEYS
            and a.dest != "help"}


def _path_keys() -> dict[str, bool]:
    """Settings that are paths → whether a value that is not a file may be a hub id (models)."""
    from loraedit import settings as S

    return {name: f.metadata["parse"] is S.model_path for name, f in S.all_fields().items()
            if f.metadata["parse"] in (S.path, S.model_path)}


def _is_multi(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)


def _normalise(table: dict, path: Path) -> dict:
    """A TOML table → settings: dashes to underscores, [ref] tables to K=PATH, paths beside the file."""
    out = {}
    for k, v in table.items():
        k = k.replace("-", "_")
        out[k] = v
    if "ref" in out:
        out["ref"] = _refs(out["ref"], path)
    if isinstance(out.get("variant"), list):
        out["variant"] = [_normalise(v, path) if isinstance(v, dict) else v for v in out["variant"]]
    for key, hub_id in _path_keys().items():
        v = out.get(key)
        if isinstance(v, str):
            out[key] = _beside(v, path, hub_id=hub_id)
        elif isinstance(v, list):
            out[key] = [_beside(x, path, hub_id=hub_id) if isinstance(x, str) else x for x in v]
    return out


def _beside(value: str, path: Path, hub_id: bool = False) -> str:
    """A path in a job file is relative to that file (so a missing one is named in full in the job's
    error); a model that is not there may be a hub id and is kept as written."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    here = path.parent / p
    return value if hub_id and not here.exists() else str(here.resolve())


def _refs(value, path: Path):
    """`[ref]` → ['K=PATH', …]; a list of tables → a list of such lists (variants)."""
    def one(v):
        if isinstance(v, dict):
            return [f"{k}={_beside(str(p), path)}" for k, p in v.items()]
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return [f"{k}={_beside(p, path)}" for k, _, p in (x.partition("=") for x in v)]
        return v
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return [one(v) for v in value]
    return one(value)


def _slug(value) -> str:
    if isinstance(value, list):
        if all(isinstance(x, str) and "=" in x for x in value):  # references: their frame numbers
            return "+".join(x.partition("=")[0] for x in value) or "none"
        return "+".join(_slug(x) for x in value) or "none"
    text = str(value).lower() if isinstance(value, bool) else str(value)
    text = Path(text).stem if ("/" in text or "\\" in text) else text
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def expand(name: str, settings: dict, actions: dict[str, argparse.Action], origin: str) -> list[Job]:
    """One job with list values and [[variant]] tables → its runs (cartesian product)."""
    settings = dict(settings)
    hand_made = settings.pop("variant", None) or [{}]
    if not isinstance(hand_made, list) or not all(isinstance(v, dict) for v in hand_made):
        return [Job(name, settings, origin, error=f"{origin}: 'variant' must be [[variant]] tables, each with a name")]
    if hand_made != [{}]:
        unnamed = [i + 1 for i, v in enumerate(hand_made) if not str(v.get("name", "")).strip()]
        if unnamed:  # two unnamed variants would be one run folder; a name says what each one tries
            return [Job(name, settings, origin, error=f"{origin}: [[variant]] {unnamed[0]} of job '{name}' has no name; "
                                                      "give each one, e.g. name = \"more-steps\"")]
    varying = []
    for key, value in settings.items():
        action = actions.get(key)
        if action is None or not isinstance(value, list):
            continue
        if _is_multi(action):
            # a list of lists of values (or of [ref] tables, already turned into lists) = variants;
            # a list of numbers inside is one value (a box: [[x0, y0, x1, y1]])
            if value and all(isinstance(x, list) and not any(isinstance(y, (int, float)) for y in x) for x in value):
                varying.append(key)
        else:
            varying.append(key)
    jobs = []
    for combo in itertools.product(*[settings[k] for k in varying]):
        for hm in hand_made:
            s = dict(settings, **dict(zip(varying, combo)))
            extra = {k: v for k, v in hm.items() if k != "name"}
            s.update(extra)
            parts = [f"{k.replace('_', '-')}-{_slug(v)}" for k, v in zip(varying, combo) if len(settings[k]) > 1]
            if hm.get("name"):
                parts.append(str(hm["name"]))
            jobs.append(Job(".".join([name, *parts]), s, origin,
                            variant={**{k: v for k, v in zip(varying, combo) if len(settings[k]) > 1}, **extra}))
    return jobs


def _check(job: Job, actions: dict[str, argparse.Action]) -> None:
    """Names and keys a job must get right; a mistake fails this job alone."""
    if job.error:
        return
    if not NAME.match(job.name):
        job.error = f"{job.origin}: job name '{job.name}' is not a folder name; use letters, digits, '.', '-', '_'"
        return
    if job.name in RESERVED:
        job.error = f"{job.origin}: job name '{job.name}' is a file of the batch folder itself; choose another name"
        return
    for k, v in job.settings.items():
        if k not in actions:
            job.error = f"{job.origin}: unknown setting '{k}'; see `loraedit edit --help` for the names"
            return
        if isinstance(v, (dict, list)) and not _is_multi(actions[k]):
            job.error = f"{job.origin}: setting '{k}' = {v!r} must be one value"
            return


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); fix the file") from None


def _jobs_in_file(path: Path, actions, many_files: bool) -> list[Job]:
    try:
        data = _load_toml(path)
    except InputError as exc:
        if many_files:  # one broken file in a folder of jobs fails that job alone
            return [Job(path.stem, {}, str(path), error=str(exc))]
        raise
    tables = data.pop("job", None)
    if tables is None:  # the file is one job, in the --config format
        s = _normalise(data, path)
        return expand(str(s.pop("name", path.stem)), s, actions, str(path))
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InputError(f"{path}: 'job' must be [[job]] tables")
    defaults = _normalise(data, path)
    defaults.pop("name", None)
    jobs = []
    for i, t in enumerate(tables):
        s = dict(defaults, **_normalise(t, path))
        origin = f"{path} [[job]] {i + 1}"
        if "name" not in s:
            jobs.append(Job(f"job{i + 1}", s, origin, error=f"{origin}: has no name; add name = \"...\" (its run folder)"))
            continue
        jobs += expand(str(s.pop("name")), s, actions, origin)
    return jobs


def load_jobs(spec: str) -> list[Job]:
    """Every job of a folder of TOML files or of one TOML file, variants expanded, in order."""
    path = Path(spec)
    actions = _edit_actions()
    if path.is_dir():
        files = sorted(path.glob("*.toml"))
        if not files:
            raise InputError(f"{path}: holds no .toml job files; put one job per file there")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"{spec}: no such job file or folder")
    jobs = [j for f in files for j in _jobs_in_file(f, actions, many_files=len(files) > 1)]
    if not jobs:
        raise InputError(f"{spec}: has no jobs; add [[job]] tables or one job's settings")
    seen: dict[str, str] = {}
    for j in jobs:
        if j.name in seen:
            raise InputError(f"{j.origin}: job name '{j.name}' is used twice (also {seen[j.name]}); names are run folders, make them unique")
        seen[j.name] = j.origin
        _check(j, actions)
    return jobs


# ---------------------------------------------------------------- one job


def job_argv(job: Job, run_dir: Path, actions: dict[str, argparse.Action] | None = None) -> list[str]:
    """The `loraedit edit` command line of a job (its settings as flags, in a stable order)."""
    actions = actions or _edit_actions()
    argv = ["edit", "--out", str(run_dir), "-q"]
    for key in sorted(job.settings):
        action, value = actions[key], job.settings[key]
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if bool(value) != isinstance(action, argparse._StoreFalseAction):
                argv.append(flag)
        elif _is_multi(action):
            for v in value if isinstance(value, list) else [value]:
                argv += [flag, ",".join(str(x) for x in v) if isinstance(v, list) else str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def fingerprint(job: Job) -> str:
    """What a finished job's result depends on: its settings and the bytes of its input files (for
    the model its small config files and a fingerprint of its weights: they are tens of GB)."""
    from loraedit.files import sha256_path

    settings = dict(job.settings)
    files = [settings.get(k) for k, hub_id in _path_keys().items() if not hub_id]
    files += [r.partition("=")[2] for r in settings.get("ref") or [] if isinstance(r, str)]
    hashes = {str(f): sha256_path(f) for f in files if isinstance(f, str) and Path(f).exists()}
    model = Path(str(settings.get("model", "")))
    if model.is_dir():
        from loraedit.runstate import model_identity

        hashes.update({str(p): sha256_path(p) for p in sorted(model.glob("*/*config.json")) + [model / "model_index.json"]
                       if p.is_file()})
        hashes[f"{model} weights"] = model_identity(str(model))["weights"]  # weights replaced in place: not done
    blob = json.dumps({"settings": settings, "inputs": hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_name(name: str) -> str:
    """A job's name as a file name in ROOT/.jobs: itself, or for a name that is no folder name (the job
    fails for it) one that cannot reach outside the folder ('../x' would)."""
    return name if NAME.match(name) else "invalid-name-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def _state_file(root: Path, name: str) -> Path:
    return root / ".jobs" / f"{_file_name(name)}.json"


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def _peak_memory(run_dir: Path) -> float | None:
    m = run_dir / "manifest.json"
    if not m.is_file():
        return None
    peaks = [v.get("peak_memory_gb") for v in read_json(m).get("stages", {}).values() if isinstance(v, dict)]
    peaks = [p for p in peaks if isinstance(p, (int, float))]
    return max(peaks) if peaks else None


def _keep_aside(root: Path, run_dir: Path) -> Path:
    """Move a job's run folder to ROOT/.previous/NAME-K (K = 1, 2, …) and return where it went."""
    for k in itertools.count(1):
        dest = root / ".previous" / f"{run_dir.name}-{k}"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            run_dir.rename(dest)
            return dest


def run_job(job: Job, root: str, session: str, clip: str | None = None, on_start=None) -> dict:
    """Run one job to the end (edit, then eval) and return its record; never raises for the job's
    own failure, so a bad job fails alone. A killed process simply stops: the next attempt resumes.
    A job whose run folder holds a LoRA trained from other inputs (its edited frame, region or a training
    setting changed in the jobs file) trains again; the old run is moved to ROOT/.previous, never deleted.
    on_start(): called once the job's state file says it is running."""
    root_dir = Path(root)
    run_dir = root_dir / job.name
    state = _state_file(root_dir, job.name)
    old = read_json(state) if state.is_file() else {}
    attempt = old.get("attempt", 0) + 1 if old.get("session") == session else 1
    record = {"name": job.name, "status": "running", "session": session, "attempt": attempt, "pid": os.getpid(),
              "host": socket.gethostname(), "started": time.time(), "fingerprint": fingerprint(job),
              "origin": job.origin, "variant": job.variant}
    write_json(state, record)
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    log_file = root_dir / ".jobs" / f"{_file_name(job.name)}.log"
    if job.error:
        return _finish(state, record, t0, "failed", job.error)
    from loraedit import cli, runstate

    captured = io.StringIO()
    # the engine's log lines go where they always go, and into the job's log; its one-line error
    # (printed, not logged) is kept for the record
    logging.basicConfig(format="loraedit: %(message)s", level=logging.WARNING, stream=sys.stderr)
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logging.Formatter("loraedit: %(message)s"))
    log.addHandler(handler)
    error = None
    try:
        with contextlib.redirect_stderr(_Tee(captured, sys.stderr)):
            rc = cli.main(job_argv(job, run_dir))
            if rc == 2 and isinstance(runstate.last_error, StaleRunError):
                kept = _keep_aside(root_dir, run_dir)
                record["previous_run"] = str(kept)
                log.warning("%s: its inputs changed since its LoRA was trained; the old run is kept in %s and the job "
                            "trains again", job.name, kept)
                rc = cli.main(job_argv(job, run_dir))
    except Exception as exc:  # an engine failure: this job fails, the batch goes on
        rc = 1
        captured.write(traceback.format_exc())
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    finally:
        log.removeHandler(handler)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        f.write(f"--- attempt {attempt} on {record['host']} (pid {os.getpid()})\n{captured.getvalue()}")
    if rc == 130:  # Ctrl-C: `edit` has said how to go on; stop the batch, the rerun resumes this job
        raise JobInterrupted
    if rc != 0:
        lines = [ln for ln in captured.getvalue().splitlines() if ln.startswith("loraedit: error:")]
        error = error or (lines[-1].removeprefix("loraedit: error: ") if lines else f"loraedit edit exited with {rc}")
        return _finish(state, record, t0, "failed", error)
    record["peak_memory_gb"] = _peak_memory(run_dir)
    record["render"] = _render_of(run_dir, captured.getvalue())
    try:
        from loraedit.evaluate import score_run

        record["metrics"] = score_run(run_dir, clip_path=clip, render_name=record["render"])
    except InputError as exc:
        record["metrics_error"] = str(exc)
    except Exception as exc:  # scoring must not lose a finished edit
        record["metrics_error"] = f"{type(exc).__name__}: {exc}"
    return _finish(state, record, t0, "done", None)


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C inside a job, already reported by the job."""


def _render_of(run_dir: Path, log_text: str) -> str:
    """The render folder of this job's settings: the one `edit` just wrote or found already done
    (a job whose render settings changed renders beside the first, into render-2, …)."""
    named = [Path(m).parent.name for m in re.findall(r"(\S+)/edited\.mp4", log_text)
             if Path(m).parent.parent == run_dir and (Path(m).parent / "settings.json").is_file()]
    if named:
        return named[-1]
    done = sorted(run_dir.glob("render*/settings.json"), key=lambda p: p.stat().st_mtime)
    return done[-1].parent.name if done else "render"


def _finish(state: Path, record: dict, t0: float, status: str, error: str | None) -> dict:
    record.update(status=status, seconds=time.perf_counter() - t0, finished=time.time())
    if error:
        record["error"] = error
    write_json(state, record)
    return record


# ---------------------------------------------------------------- the whole batch


def _is_done(root: Path, job: Job) -> bool:
    state = _state_file(root, job.name)
    if not state.is_file():
        return False
    rec = read_json(state)
    return (rec.get("status") == "done" and rec.get("fingerprint") == fingerprint(job)
            and (root / job.name / rec.get("render", "render") / "settings.json").is_file())


def _records(root: Path, jobs: list[Job]) -> dict[str, dict]:
    out = {}
    for j in jobs:
        st = _state_file(root, j.name)
        out[j.name] = read_json(st) if st.is_file() else {"name": j.name, "status": "pending", "origin": j.origin,
                                                          "variant": j.variant}
    return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(records: dict[str, dict], session: str, todo: int, slots: int = 1) -> str:
    """'3/8 done, 2 running, 1 failed; ETA 12 min' for the jobs of this batch run, `slots` of them
    at a time (the most seen running at once)."""
    mine = [r for r in records.values() if r.get("session") == session]
    done = sum(r["status"] == "done" for r in records.values())
    failed = sum(r["status"] == "failed" for r in records.values())
    running = sum(r["status"] == "running" for r in mine)
    finished_here = [r["seconds"] for r in mine if r["status"] == "done" and "seconds" in r]
    left = todo - sum(r["status"] in ("done", "failed") for r in mine)
    if finished_here and left > 0:
        eta = f"ETA {_duration(left * (sum(finished_here) / len(finished_here)) / max(1, running, slots))}"
    else:
        eta = "ETA after the first job" if left > 0 else "finished"
    return f"{done}/{len(records)} done, {running} running, {failed} failed; {eta}"


def write_summary(root: Path, jobs: list[Job], records: dict[str, dict], started: float) -> None:
    """ROOT/batch.json and ROOT/index.html from the jobs' records."""
    rows = [dict(records[j.name], name=j.name, run=j.name, variant=j.variant, origin=j.origin) for j in jobs]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "running", "pending")}
    write_json(root / "batch.json", {"jobs": rows, "counts": counts, "updated": time.time(), "started": started})
    with atomic_output(root / "index.html") as tmp:
        tmp.write_text(index_html(root, rows, counts))


def _metric_cells(m: dict) -> str:
    from loraedit.evaluate import COLUMNS

    items = [(label, m[key], d) for key, label, d in COLUMNS if isinstance(m.get(key), (int, float))
             and not math.isnan(m[key])]
    return "<br>".join(f"{html.escape(label)}: <b>{v:.{d}f}</b>" for label, v, d in items)


def _shown(value) -> str:
    """A variant's value as a person reads it: file names, not whole paths."""
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]" if value else "none"
    text = str(value)
    key, sep, rest = text.partition("=")
    if sep and "/" in rest:
        return f"{key}={Path(rest).name}"
    return Path(text).name if "/" in text else text


def index_html(root: Path, rows: list[dict], counts: dict) -> str:
    """One page a person opens from disk: a row per job, its video playing inline."""
    def esc(x):
        return html.escape(str(x))

    body = []
    for r in rows:
        run = quote(r["run"])
        render_name = r.get("render", "render")
        render = root / r["run"] / render_name
        status = r["status"]
        links = [f"<a href='{run}/'>run folder</a>"] if NAME.match(r["run"]) and (root / r["run"]).is_dir() else []
        if (root / ".jobs" / f"{_file_name(r['run'])}.log").is_file():
            links.append(f"<a href='.jobs/{quote(_file_name(r['run']))}.log'>log</a>")
        variant = ", ".join(f"{k}={_shown(v)}" for k, v in r["variant"].items())
        cells = [f"<td><b>{esc(r['name'])}</b><div class=small>{esc(variant)}</div>"
                 f"<div class=small>{' · '.join(links)}</div></td>",
                 f"<td class='{status}'>{esc(status)}" + (f" (attempt {r['attempt']})" if r.get("attempt", 1) > 1 else "")
                 + (f"<div class=err>{esc(r['error'])}</div>" if r.get("error") else "") + "</td>",
                 f"<td class=nowrap>{_duration(r['seconds']) if 'seconds' in r else ''}</td>",
                 f"<td class=nowrap>{'%.1f GB' % r['peak_memory_gb'] if isinstance(r.get('peak_memory_gb'), (int, float)) else ''}</td>"]
        if (render / "side_by_side.mp4").is_file():
            cells.append(f"<td><video src='{run}/{quote(render_name)}/side_by_side.mp4' controls autoplay loop muted playsinline "
                         "preload='metadata'></video></td>")
        else:
            cells.append("<td></td>")
        if (render / "contact_sheet.png").is_file():
            cells.append(f"<td><a href='{run}/{quote(render_name)}/contact_sheet.png'><img src='{run}/{quote(render_name)}/contact_sheet.png'></a></td>")
        else:
            cells.append("<td></td>")
        metrics = _metric_cells(r.get("metrics") or {})
        if r.get("metrics_error"):
            metrics += f"<div class=err>{esc(r['metrics_error'])}</div>"
        cells.append(f"<td class='small nowrap'>{metrics}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>loraedit batch: {esc(root.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: top; text-align: left; }}
video {{ width: 420px; }} img {{ width: 320px; }}
.small {{ font-size: 85%; color: #444; }} .err {{ color: #b00; max-width: 28em; }} .nowrap {{ white-space: nowrap; }}
.done {{ color: #070; }} .failed {{ color: #b00; }} .running {{ color: #a60; }}
</style></head><body>
<h1>loraedit batch: {esc(root.name)}</h1>
<p>{esc(summary)} &middot; updated {time.strftime("%Y-%m-%d %H:%M:%S")} &middot; each video: source | edited</p>
<table><tr><th>job</th><th>status</th><th>time</th><th>peak memory</th><th>side by side</th><th>contact sheet</th><th>metrics</th></tr>
{chr(10).join(body)}
</table></body></html>
"""


def _unreachable(address: str) -> str | None:
    """Why nothing listens at a HOST:PORT --ray address (None: something does, or it is no such address).
    Ray itself retries an address with no cluster for minutes before it gives up."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def _ray_connect(address: str):
    try:
        import ray
    except ModuleNotFoundError:
        raise InputError("--ray needs Ray: pip install 'loraedit[ray]' (or pip install ray)") from None
    if ray.is_initialized():  # already connected (e.g. a driver script that called ray.init itself)
        return ray
    why = _unreachable(address) if address not in ("auto", "local") else None
    if why:
        raise InputError(f"--ray {address}: no Ray cluster there ({why}); start one with `ray start --head`, "
                         "or use --ray local for this machine alone")
    try:
        ray.init(address=None if address == "local" else address, runtime_env={"env_vars": WORKER_ENV},
                 log_to_driver=False)
    except ConnectionError as exc:
        raise InputError(f"--ray {address}: no Ray cluster there ({str(exc).splitlines()[0]}); start one with "
                         "`ray start --head`, or use --ray local for this machine alone") from None
    return ray


def run_batch(args) -> int:
    jobs = load_jobs(args.jobs)
    ray = _ray_connect(args.ray) if args.ray else None  # a missing cluster is reported before anything is written
    from loraedit.cli import check_out

    root = check_out(args.out, "batch folder")  # a file, or a folder this user cannot write: one line
    session = uuid.uuid4().hex[:12]
    started = time.time()
    todo = [j for j in jobs if not _is_done(root, j)]
    if ray is not None:
        gpu_jobs = [j.name for j in todo if str(j.settings.get("device", "auto")) != "cpu" and not j.error]
        have = ray.cluster_resources().get("GPU", 0)
        if gpu_jobs and args.gpus_per_job > have:
            # Ray would keep such tasks waiting for a GPU that never comes
            raise InputError(f"--ray {args.ray}: the cluster has {have:g} GPUs and job {gpu_jobs[0]} asks for "
                             f"{args.gpus_per_job:g}; start the GPU nodes first, or set device = \"cpu\" in CPU-only jobs")
    root.mkdir(parents=True, exist_ok=True)  # after every check: a refused batch leaves nothing behind
    if len(todo) < len(jobs):
        log.info("%d of %d jobs already done; running the other %d", len(jobs) - len(todo), len(jobs), len(todo))
    for j in todo:  # a job waiting its turn is pending, whatever an earlier batch left in its state file
        st = _state_file(root, j.name)
        if st.is_file():
            st.unlink()
    write_summary(root, jobs, _records(root, jobs), started)

    slots = [1]

    def report():
        records = _records(root, jobs)
        write_summary(root, jobs, records, started)
        slots[0] = max(slots[0], sum(r["status"] == "running" and r.get("session") == session for r in records.values()))
        line = progress_line(records, session, len(todo), slots[0])
        if not args.quiet:
            log.info("batch: %s", line)

    if ray is not None:
        env = dict(WORKER_ENV, OMP_NUM_THREADS=str(args.cpus_per_job))
        task = ray.remote(run_job)
        pending = {}
        for j in todo:
            on_cpu = str(j.settings.get("device", "auto")) == "cpu"
            opts = dict(num_cpus=args.cpus_per_job, num_gpus=0 if on_cpu else args.gpus_per_job,
                        max_retries=args.max_retries, retry_exceptions=False, runtime_env={"env_vars": env})
            pending[task.options(**opts).remote(j, str(root), session, args.clip)] = j
        last = 0.0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in ready:
                j = pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:  # its worker died more often than --max-retries
                    state = _state_file(root, j.name)
                    rec = read_json(state) if state.is_file() else {"name": j.name, "session": session}
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    rec.update(status="failed", error=f"lost its worker {args.max_retries + 1} times ({first})")
                    write_json(state, rec)
            if ready or time.monotonic() - last > 30:
                report()
                last = time.monotonic()
    else:
        for j in todo:
            try:
                # the page says which job is running, as the Ray path's polling does
                run_job(j, str(root), session, args.clip, on_start=lambda: write_summary(root, jobs, _records(root, jobs), started))
            except JobInterrupted:
                write_summary(root, jobs, _records(root, jobs), started)
                return 130
            report()
    records = _records(root, jobs)
    write_summary(root, jobs, records, started)
    failed = [r for r in records.values() if r["status"] == "failed"]
    for r in failed:
        print(f"loraedit: {r['name']}: {r.get('error', 'failed')}", file=sys.stderr)
    done = sum(r["status"] == "done" for r in records.values())
    print(f"loraedit: batch: {done} of {len(records)} done, {len(failed)} failed; open {root / 'index.html'}",
          file=sys.stderr)
    return 1 if failed else 0


def register(subparsers) -> argparse.ArgumentParser:
    help = "run many edits (TOML jobs with variants) here or on a Ray cluster; writes batch.json and index.html"
    p = subparsers.add_parser("batch", help=help, description=help)
    p.add_argument("jobs", metavar="JOBS", help="a folder of TOML job files, or one TOML file with [[job]] tables")
    p.add_argument("--out", required=True, metavar="ROOT", help="the batch folder: ROOT/<job> per job (shared by every node)")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS|local",
                   help="run the jobs as Ray tasks: auto = the cluster started by `ray start`, HOST:PORT, or local "
                        "(a Ray instance on this machine only); default: one after another, here")
    p.add_argument("--gpus-per-job", dest="gpus_per_job", type=float, default=1.0, help="GPUs a job asks Ray for (default 1)")
    p.add_argument("--cpus-per-job", dest="cpus_per_job", type=int, default=1, help="CPUs a job asks Ray for (default 1)")
    p.add_argument("--max-retries", dest="max_retries", type=int, default=3,
                   help="times a job is retried when its worker dies (default 3); it resumes from its checkpoint")
    p.add_argument("--clip", default=None, metavar="PATH", help="CLIP model for the CLIP metrics on the page (see `loraedit eval`)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_batch)
    return p
