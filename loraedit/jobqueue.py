"""The UI's job queue: `loraedit` commands run one at a time in a worker subprocess, recorded on disk.

A job is a `loraedit edit` (or `render`) command line for an ordinary run folder. It runs as the
CLI itself in a child process, so the UI has no second implementation of any stage, a person
can close the page and come back, and a run stopped or interrupted is resumed by the same
command (the stages skip what is done and training continues from its last checkpoint).
One job runs at a time: one GPU, one training.

    RUN/ui/jobs/NNNN.json   the job: command line, state, times, exit code, the error line
    RUN/ui/jobs/NNNN.log    everything the command printed (its progress bars included)

States: queued → running → done | failed | stopped (by the person) | interrupted (the UI went
away while it ran). A stopped, failed or interrupted job can be queued again as it was.
Nothing here imports gradio; the progress of a job is read back from its log (`progress`).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraedit.files import read_json, write_json

log = logging.getLogger("loraedit")

JOBS_SUBDIR = Path("ui") / "jobs"
FINISHED = ("done", "failed", "stopped", "interrupted")
STOP_GRACE = 60.0  # seconds a stopped job has to finish its Ctrl-C before it is terminated


@dataclass
class Job:
    run_dir: str
    argv: list[str]  # the loraedit command line without the program name, e.g. ["edit", "--out", ...]
    id: str = ""
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    returncode: int | None = None
    error: str | None = None  # one line: the CLI's `loraedit: error: ...`, or the last line of a crash
    pid: int | None = None
    owner: int | None = None  # pid of the UI process that ran it (a dead owner means interrupted)

    @property
    def kind(self) -> str:
        return self.argv[0] if self.argv else "?"

    @property
    def record(self) -> Path:
        return Path(self.run_dir) / JOBS_SUBDIR / f"{self.id}.json"

    @property
    def log_file(self) -> Path:
        return Path(self.run_dir) / JOBS_SUBDIR / f"{self.id}.log"

    def save(self) -> None:
        write_json(self.record, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "Job":
        data = read_json(path)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def run_jobs(run_dir: Path) -> list[Job]:
    """The jobs of one run folder, oldest first."""
    folder = Path(run_dir) / JOBS_SUBDIR
    # not the hidden temporary files of an atomic write in progress (.0001.xxxx.json): reading one
    # half-written would kill the worker and leave every job queued
    return [Job.load(p) for p in sorted(folder.glob("*.json")) if not p.name.startswith(".")] if folder.is_dir() else []


def run_folders(root: Path) -> list[Path]:
    """Run folders under `root` (a loraedit job.json or UI jobs inside), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
             and ((p / "job.json").is_file() or (p / JOBS_SUBDIR).is_dir())]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


class JobQueue:
    """A worker thread that runs queued jobs under `root`, oldest first, one at a time."""

    def __init__(self, root: str | os.PathLike, env: dict | None = None, poll: float = 1.0,
                 command: list[str] | None = None):
        self.root = Path(root)
        self.command = list(command or [sys.executable, "-m", "loraedit"])  # the CLI, as a person runs it
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.poll = poll
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._running: Job | None = None
        self._stop_requested: set[str] = set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ what a person does

    def submit(self, run_dir: str | os.PathLike, argv: list[str]) -> Job:
        run_dir = Path(run_dir).resolve()
        with self._lock:
            existing = run_jobs(run_dir)
            job = Job(run_dir=str(run_dir), argv=list(argv), id=f"{len(existing) + 1:04d}")
            job.save()
        self._wake.set()
        return job

    def stop(self, job: Job) -> None:
        """Stop a running job the way Ctrl-C does (it resumes from its last checkpoint), or unqueue it."""
        with self._lock:
            current = Job.load(job.record)
            if current.state == "queued":
                current.state, current.finished = "stopped", time.time()
                current.save()
                return
            if current.state == "running" and self._running is not None and self._running.id == current.id \
                    and self._running.run_dir == current.run_dir and self._proc is not None:
                self._stop_requested.add(current.record.as_posix())
                proc = self._proc
                proc.send_signal(signal.SIGINT)
                # a job that does not stop at Ctrl-C within a while (stuck in a library) is terminated
                timer = threading.Timer(STOP_GRACE, lambda: proc.poll() is None and proc.terminate())
                timer.daemon = True
                timer.start()

    def requeue(self, job: Job) -> Job:
        """Queue a finished job's command again: the CLI resumes where the run stopped."""
        return self.submit(job.run_dir, job.argv)

    def jobs(self) -> list[Job]:
        """Every job under the root, oldest first."""
        out = [j for run in run_folders(self.root) for j in run_jobs(run)]
        return sorted(out, key=lambda j: (j.created, j.id))

    def position(self, job: Job) -> int:
        """0 while running, n ≥ 1: n-th in the queue; -1 when finished."""
        current = Job.load(job.record)
        if current.state == "running":
            return 0
        if current.state != "queued":
            return -1
        queued = [j for j in self.jobs() if j.state == "queued"]
        return 1 + [(j.run_dir, j.id) for j in queued].index((current.run_dir, current.id))

    # ------------------------------------------------------------ the worker

    def start(self) -> "JobQueue":
        self.recover()
        self._thread = threading.Thread(target=self._work, name="loraedit-jobs", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30) -> None:
        """Stop the worker; a running job is interrupted like Ctrl-C (resumable)."""
        self._closed.set()
        self._wake.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        if self._thread is not None:
            self._thread.join(timeout)

    def recover(self) -> None:
        """Jobs left 'running' by a UI process that is gone were interrupted."""
        for job in self.jobs():
            if job.state == "running" and not (_alive(job.owner) and job.owner != os.getpid()):
                if _alive(job.pid):
                    continue  # its process still runs (another UI on the same folder): leave it alone
                job.state, job.finished = "interrupted", time.time()
                job.error = "the UI stopped while this ran; queue it again to resume from the last checkpoint"
                job.save()

    def _next(self) -> Job | None:
        queued = [j for j in self.jobs() if j.state == "queued"]
        return queued[0] if queued else None

    def _work(self) -> None:
        while not self._closed.is_set():
            job = self._next()
            if job is None:
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        job.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log_file, "ab") as out:
            with self._lock:
                if Job.load(job.record).state != "queued":
                    return  # unqueued meanwhile
                self._proc = subprocess.Popen([*self.command, *job.argv], stdout=out,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
                self._running = job
                job.state, job.started, job.pid, job.owner = "running", time.time(), self._proc.pid, os.getpid()
                job.save()
            rc = self._proc.wait()
        with self._lock:
            key = job.record.as_posix()
            stopped = key in self._stop_requested
            self._stop_requested.discard(key)
            job.returncode, job.finished = rc, time.time()
            if rc == 0:
                job.state, job.error = "done", None
            elif stopped or self._closed.is_set():
                job.state = "stopped" if not self._closed.is_set() else "interrupted"
                job.error = "stopped; queue it again to resume from the last checkpoint"
            else:
                job.state, job.error = "failed", error_line(job.log_file)
            job.save()
            self._proc, self._running = None, None


# ---------------------------------------------------------------- reading a job's log


_BAR = re.compile(r"(?P<desc>[\w-]+): *(?P<pct>\d+)%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+) "
                  r"\[(?P<elapsed>[\d:]+)<(?P<left>[\d:?]+)(?:, *(?P<rate>[^,\]]+))?(?P<post>[^\]]*)\]")
_LOSS = re.compile(r"loss=(?P<loss>[-+\d.eE]+|nan|inf)")
_STAGE = re.compile(r"stage=(?P<stage>\d+)")


def log_lines(text: str) -> list[str]:
    """A log with progress bars (carriage returns) → its lines, each bar redraw a line of its own."""
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def error_line(log_file: Path) -> str:
    """The one line that says why a job failed: the CLI's error line, or the last line of a crash."""
    try:
        lines = log_lines(log_file.read_text(errors="replace"))
    except FileNotFoundError:
        return "the job wrote no log"
    for line in reversed(lines):
        if line.startswith("loraedit: error:"):
            return line
    for line in reversed(lines):
        if not _BAR.search(line) and not line.startswith((" ", "\t")):
            return line.strip()
    return lines[-1].strip() if lines else "the job ended without output"


def _seconds(text: str) -> float | None:
    if "?" in text:
        return None
    parts = [int(p) for p in text.split(":")]
    out = 0
    for p in parts:
        out = out * 60 + p
    return float(out)


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step written to train/losses.csv (at each checkpoint)."""
    path = Path(run_dir) / "train" / "losses.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def progress(job: Job) -> dict:
    """Where a job is, read from its log and run folder.

    {"stage": "waiting" | "preparing" | "encoding" | "train" | "render" | "writing" | <state>,
     "step", "total", "seconds_left" (of this stage), "rate", "loss", "train_stage" (1 or 2),
     "losses": [(step, loss)], "message": one line for a person}
    """
    out: dict = {"stage": job.state, "step": None, "total": None, "seconds_left": None, "rate": None, "loss": None,
                 "train_stage": None, "losses": []}
    text = job.log_file.read_text(errors="replace") if job.log_file.is_file() else ""
    lines = log_lines(text)
    bar_losses: dict[int, float] = {}
    last_bar = None
    after_bar: list[str] = []
    for line in lines:
        m = _BAR.search(line)
        if m:
            last_bar, after_bar = m, []
            if m["desc"] == "train":
                loss = _LOSS.search(m["post"] or "")
                if loss:
                    bar_losses[int(m["n"])] = float(loss["loss"])
        else:
            after_bar.append(line)
    exact = dict(read_losses(Path(job.run_dir))) if job.kind == "edit" or job.kind == "train" else {}
    merged = dict(bar_losses)
    merged.update(exact)  # the checkpointed losses are exact; the bar's fill the steps since
    out["losses"] = sorted(merged.items())
    if job.state == "queued":
        out["stage"] = "waiting"
    elif job.state == "running":
        if last_bar is None:
            out["stage"] = "preparing" if not any("prepared" in line for line in lines) else "encoding"
        else:
            n, total = int(last_bar["n"]), int(last_bar["total"])
            out.update(stage=last_bar["desc"], step=n, total=total, seconds_left=_seconds(last_bar["left"]),
                       rate=(last_bar["rate"] or "").strip() or None)
            if n >= total:
                out["stage"] = "writing" if last_bar["desc"] == "render" else "loading"
        if last_bar is not None and last_bar["desc"] == "train":
            stage = _STAGE.search(last_bar["post"] or "")
            out["train_stage"] = int(stage["stage"]) if stage else None
    if out["losses"]:
        out["loss"] = out["losses"][-1][1]
    out["message"] = describe(job, out)
    return out


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def describe(job: Job, p: dict) -> str:
    stage = p["stage"]
    if job.state == "done":
        return f"{job.kind} finished in {_clock((job.finished or 0) - (job.started or 0))}"
    if job.state in ("failed", "stopped", "interrupted"):
        return f"{job.kind} {job.state}: {job.error or ''}".rstrip(": ")
    if stage == "waiting":
        return "waiting for the job before it to finish"
    if stage == "preparing":
        return "preparing: reading the frames and finding the edit region"
    if stage == "encoding":
        return "encoding the video and prompts, loading the model"
    if stage == "loading":
        return "training finished; loading the model to render"
    if stage == "writing":
        return "decoding and writing the videos"
    what = "training" if stage == "train" else "rendering" if stage == "render" else stage
    if stage == "train" and p.get("train_stage"):
        what += f" (stage {p['train_stage']})"
    loss = f", loss {p['loss']:.4f}" if stage == "train" and p.get("loss") is not None else ""
    return f"{what}: step {p['step']}/{p['total']}, {_clock(p['seconds_left'])} left in this stage{loss}"
