"""`loraedit ui` without a browser: the command, the job queue, reading progress, errors next to fields.

The page itself is driven in a real browser by tests/test_ui_browser.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraedit import jobqueue
from loraedit.jobqueue import Job, JobQueue, error_line, progress

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))


def run_python(code: str, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=timeout)


# ---------------------------------------------------------------- the command


def test_cli_path_does_not_import_gradio_and_ui_without_it_says_how_to_install(tmp_path):
    # every CLI command builds the full parser, which registers `ui`: that must not pull in the page;
    # then, as if gradio were not installed, `loraedit ui` is one line (one interpreter for both: start-up is slow)
    r = run_python("import contextlib, io, sys\nfrom loraedit import cli\ncli.build_parser()\n"
                   "with contextlib.redirect_stderr(io.StringIO()):\n"
                   "    assert cli.main(['prepare', '--out', '/nonexistent/x']) == 2\n"
                   "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'selenium') or m == 'loraedit.ui'))\n"
                   "sys.modules['gradio'] = None\n"
                   f"sys.exit(cli.main(['ui', '--runs', {str(tmp_path / 'runs')!r}]))")
    assert r.stdout.strip() == "[]", r.stderr
    assert r.returncode == 2
    assert r.stderr.strip() == "loraedit: error: the web UI needs Gradio: pip install 'loraedit[ui]'"


def test_ui_listens_on_this_machine_only_by_default():
    from loraedit.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.share, args.runs) == ("127.0.0.1", 7860, False, "runs")
    args = build_parser().parse_args(["ui", "--host", "0.0.0.0", "--port", "9000", "--share"])
    assert (args.host, args.port, args.share) == ("0.0.0.0", 9000, True)


def test_ui_bad_port_and_runs_file_are_one_line_errors(tmp_path):
    from loraedit.cli import main

    assert main(["ui", "--port", "70000"]) == 2
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["ui", "--runs", str(f)]) == 2


def test_ui_port_in_use_is_one_line_error(tmp_path, capsys):
    import socket

    pytest.importorskip("gradio")
    from loraedit.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--runs", str(tmp_path), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"loraedit: error: --port {port}: cannot listen on 127.0.0.1:{port} (in use); pass another --port"


# ---------------------------------------------------------------- reading a job's log


TQDM_LOG = (
    "loraedit: prepared 17 frames at 128x128 in runs/x/prepare\n"
    "\rtrain:   0%|          | 0/6 [00:00<?, ?step/s]"
    "\rtrain:  17%|█▋        | 1/6 [00:00<00:00,  9.09step/s, loss=0.2097, stage=1]"
    "\rtrain:  33%|███▎      | 2/6 [00:00<00:00,  9.09step/s, loss=0.2013, stage=1]"
    "\rtrain:  67%|██████▋   | 4/6 [00:03<00:01,  3.94step/s, loss=0.1852, stage=2]"
)


def make_job(tmp_path, log: str, state="running", argv=("edit", "--out", "x")) -> Job:
    job = Job(run_dir=str(tmp_path), argv=list(argv), id="0001", state=state)
    job.log_file.parent.mkdir(parents=True, exist_ok=True)
    job.log_file.write_text(log)
    job.save()
    return job


def test_progress_reads_stage_step_eta_and_losses(tmp_path):
    p = progress(make_job(tmp_path, TQDM_LOG))
    assert (p["stage"], p["step"], p["total"], p["seconds_left"], p["train_stage"]) == ("train", 4, 6, 1.0, 2)
    assert p["losses"] == [(1, 0.2097), (2, 0.2013), (4, 0.1852)]
    assert p["message"] == "training (stage 2): step 4/6, 0:01 left in this stage, loss 0.1852"


def test_progress_prefers_the_exact_checkpointed_losses(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "losses.csv").write_text("step,stage,sample,loss\n1,1,video,0.5\n2,1,video,0.25\n")
    p = progress(make_job(tmp_path, TQDM_LOG))
    assert p["losses"] == [(1, 0.5), (2, 0.25), (4, 0.1852)]


def test_progress_stages_before_and_after_the_bars(tmp_path):
    assert progress(make_job(tmp_path, ""))["stage"] == "preparing"
    assert progress(make_job(tmp_path, "loraedit: prepared 17 frames at 128x128 in x\n"))["stage"] == "encoding"
    done_render = TQDM_LOG + "\n\rrender: 100%|██████████| 4/4 [00:00<00:00, 12.43step/s]\n"
    assert progress(make_job(tmp_path, done_render))["stage"] == "writing"
    assert progress(make_job(tmp_path, TQDM_LOG, state="queued"))["message"] == "waiting for the job before it to finish"


def test_error_line_is_the_cli_error_or_the_last_line_of_a_crash(tmp_path):
    job = make_job(tmp_path, TQDM_LOG + "\nloraedit: error: --frames 18: must be 4k+1\n")
    assert error_line(job.log_file) == "loraedit: error: --frames 18: must be 4k+1"
    job = make_job(tmp_path, TQDM_LOG + "\nTraceback (most recent call last):\n  File \"x\", line 1\n"
                   "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert error_line(job.log_file) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


# ---------------------------------------------------------------- the queue


FAKE_CLI = textwrap.dedent("""
    import os, signal, sys, time
    # a stand-in for `loraedit`: records when it ran, draws a progress bar, fails on request, and (as
    # loraedit.cli.stop_on_sigint) takes SIGINT even when started with it ignored (a background shell job)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    out = sys.argv[sys.argv.index("--out") + 1]
    open(os.path.join(out, "ran.txt"), "a").write(f"start {time.time()}\\n")
    try:
        for i in range(1, 11):
            sys.stderr.write(f"\\rtrain:  {10 * i}%|#| {i}/10 [00:00<00:01,  9step/s, loss={1 / i:.4f}, stage=1]")
            sys.stderr.flush()
            time.sleep(float(os.environ.get("FAKE_STEP", "0.05")))
    except KeyboardInterrupt:
        sys.stderr.write("\\nloraedit: interrupted; run the same command again to resume from the last checkpoint\\n")
        sys.exit(130)
    open(os.path.join(out, "ran.txt"), "a").write(f"end {time.time()}\\n")
    if "--fail" in sys.argv:
        sys.stderr.write("\\nloraedit: error: --frames 18: must be 4k+1\\n")
        sys.exit(2)
""")


@pytest.fixture
def fake_queue(tmp_path):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    queues = []

    def make(step=0.05):
        q = JobQueue(tmp_path / "runs", env=dict(ENV, FAKE_STEP=str(step)), poll=0.05,
                     command=[sys.executable, str(script)]).start()
        queues.append(q)
        return q

    yield make
    for q in queues:
        q.close()


def wait_for(job: Job, states, timeout=60) -> Job:
    t0 = time.time()
    while time.time() - t0 < timeout:
        current = Job.load(job.record)
        if current.state in states:
            return current
        time.sleep(0.05)
    raise AssertionError(f"job {job.id} still {Job.load(job.record).state}")


def test_queue_runs_jobs_one_at_a_time_in_order(tmp_path, fake_queue):
    q = fake_queue()
    runs = [tmp_path / "runs" / name for name in ("a", "b", "c")]
    for r in runs:
        r.mkdir(parents=True)
    jobs = [q.submit(r, ["edit", "--out", str(r)] + (["--fail"] if r.name == "b" else [])) for r in runs]
    finished = [wait_for(j, jobqueue.FINISHED) for j in jobs]
    assert [j.state for j in finished] == ["done", "failed", "done"]
    assert finished[1].error == "loraedit: error: --frames 18: must be 4k+1"
    spans = []
    for r in runs:
        lines = (r / "ran.txt").read_text().split()
        spans.append((float(lines[1]), float(lines[3])))
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 <= s1, "two jobs ran at the same time"
    p = progress(finished[0])
    assert p["losses"][-1] == (10, 0.1) and p["message"].startswith("edit finished in")


def test_stop_then_queue_again(tmp_path, fake_queue):
    q = fake_queue(step=0.5)
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    job = q.submit(run, ["edit", "--out", str(run)])
    wait_for(job, ("running",))
    waiting = q.submit(run, ["edit", "--out", str(run)])
    assert q.position(waiting) == 1 and q.position(job) == 0
    q.stop(waiting)  # a queued job is just taken off the queue
    time.sleep(0.3)
    q.stop(job)
    stopped = wait_for(job, jobqueue.FINISHED)
    assert stopped.state == "stopped" and stopped.returncode == 130
    assert Job.load(waiting.record).state == "stopped"
    again = q.requeue(stopped)
    assert again.argv == stopped.argv and again.id == "0003"
    assert wait_for(again, jobqueue.FINISHED, timeout=60).state == "done"


def test_a_job_left_running_by_a_gone_ui_is_interrupted(tmp_path):
    run = tmp_path / "runs" / "a"
    job = Job(run_dir=str(run), argv=["edit", "--out", str(run)], id="0001", state="running", pid=2**22 + 12345,
              owner=2**22 + 12346)  # pids that do not exist
    job.save()
    q = JobQueue(tmp_path / "runs")
    q.recover()
    again = Job.load(job.record)
    assert again.state == "interrupted" and "queue it again" in again.error


# ---------------------------------------------------------------- the page's checks are the CLI's


def test_page_errors_are_the_cli_messages(tmp_path, clip):
    pytest.importorskip("gradio")
    from loraedit import ui

    # the frame fields of the page are read by the prepare stage's own settings: the CLI's message
    r = ui.call_cli(["prepare", "--model", str(ui.TOY_MODEL), "--video", str(clip["video"]), "--first-frame",
                     str(clip["first_frame"]), "--out", str(tmp_path / "r"), "--frames", "18", "--size", "96x64"])
    assert r.returncode == 2 and r.error.startswith("--frames 18: must be 4k+1")
    with pytest.raises(ui.InputError) as exc:
        ui.select_frames(str(clip["video"]), None, ui.selection_values("18", "0", "", "", False, "96x64"))
    assert str(exc.value) == r.error
    flags = [("--frames", "frames"), ("--steps", "steps"), ("--render-steps", "render")]
    assert ui.which_field(r.error, {"video": str(clip["video"])}, flags) == "frames"
    chosen = ui.select_frames(str(clip["video"]), None, ui.selection_values("17", "2", "", "", False, "96x64"))
    assert (len(chosen.indices), chosen.indices[0], chosen.width, chosen.height, chosen.cuts) == (17, 2, 96, 64, [])

    bad = ui.call_cli(["prepare", "--model", str(ui.TOY_MODEL), "--video", str(tmp_path / "nope.mp4"), "--first-frame",
                       str(clip["first_frame"]), "--out", str(tmp_path / "r2")])
    assert bad.error.startswith(f"{tmp_path / 'nope.mp4'}: no such video file")
    assert ui.which_field(bad.error, {"video": str(tmp_path / "nope.mp4")}, flags) == "video"
    assert ui.short_paths(bad.error, [tmp_path]).startswith("nope.mp4: no such video file")
    r = ui.call_cli(["render", "--out", str(tmp_path / "r3"), "--model", str(ui.TOY_MODEL), "--render-steps", "0"])
    assert r.error.startswith("--render-steps 0: must be at least 1")
    assert ui.which_field(r.error, {}, flags) == "render"  # not "--steps": a flag is matched whole
    assert ui.which_field("something else went wrong", {}, flags) == "start"


def test_edit_argv_takes_only_the_cli_flags(tmp_path):
    pytest.importorskip("gradio")
    from loraedit import ui

    p = ui.PageInputs(video="v.mp4", first_frame="f.png", model="m", selection=ui.selection_values("17", "2.5s", "", "3", False, "128x128"),
                      region_source="boxes", boxes="10,10,40,50; 60,60,90,90", refs=[(8, "r.png")], extra="--composite --shift 3",
                      edit_prompt="a red flower")
    argv = ui.edit_argv(p, tmp_path / "run", ui.flags_of("edit"))
    assert argv[:2] == ["edit", "--out"] and argv.count("--box") == 2 and "8=r.png" in argv
    assert argv[argv.index("--start") + 1] == "2.5s" and argv[argv.index("--stride") + 1] == "3" and "--fps" not in argv
    assert argv[-3:] == ["--composite", "--shift", "3"] and argv[argv.index("--edit-prompt") + 1] == "a red flower"
    from loraedit.cli import build_parser

    _, unknown = build_parser().parse_known_args(argv)
    assert unknown == []  # the CLI has every flag the page writes
    with pytest.raises(ui.InputError, match="--no-such: `loraedit edit` has no such flag"):
        ui.edit_argv(ui.PageInputs(video="v", first_frame="f", model="m", extra="--no-such 1"), tmp_path, ui.flags_of("edit"))
    with pytest.raises(ui.InputError, match="needs x0 < x1"):
        ui.edit_argv(ui.PageInputs(video="v", first_frame="f", model="m", region_source="boxes", boxes="10,10,5,50"),
                     tmp_path, ui.flags_of("edit"))


def test_a_job_record_being_written_is_not_read(tmp_path):
    """An atomic write in progress leaves a hidden, half-written .NNNN.*.json beside the records."""
    from loraedit.jobqueue import JOBS_SUBDIR, run_jobs

    run = tmp_path / "runs" / "a"
    job = Job(run_dir=str(run), argv=["edit", "--out", str(run)], id="0001")
    job.save()
    (run / JOBS_SUBDIR / ".0002.k3j4.json").write_text('{"run_dir": ')  # cut off mid-write
    assert [j.id for j in run_jobs(run)] == ["0001"]


def test_a_two_expert_run_offers_both_loras_and_can_be_rendered_again(tmp_path):
    """Wan2.2-A14B keeps lora/high_noise and lora/low_noise: the page offered no LoRA to download and
    refused to render again ("no trained LoRA yet") however long one waited."""
    pytest.importorskip("gradio")
    from loraedit import ui
    from loraedit.api import training_unfinished

    run = tmp_path / "run"
    for expert in ("high_noise", "low_noise"):
        (run / "lora" / expert).mkdir(parents=True)
        (run / "lora" / expert / "pytorch_lora_weights.safetensors").write_bytes(b"x")
        (run / "lora" / expert / f"wan_lora_{expert}.safetensors").write_bytes(b"x")  # ComfyUI's
        (run / "train" / expert).mkdir(parents=True)
        (run / "train" / expert / "done.json").write_text("{}")
    (run / "train" / "record.json").write_text('{"settings": {"steps": 4}}')
    assert [str(Path(p).relative_to(run / "lora")) for p in ui.lora_files(run)] == [
        "high_noise/pytorch_lora_weights.safetensors", "high_noise/wan_lora_high_noise.safetensors",
        "low_noise/pytorch_lora_weights.safetensors", "low_noise/wan_lora_low_noise.safetensors"]
    assert training_unfinished(run) is None
    (run / "train" / "low_noise" / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "train" / "low_noise" / "done.json").unlink()
    assert training_unfinished(run) == "its training was interrupted and is not finished"
    # the high-noise expert done, the low-noise one stopped before its first checkpoint (loading 14B takes minutes)
    (run / "train" / "low_noise" / "checkpoints" / "step-000002").rmdir()
    (run / "train" / "training.json").write_text("{}")  # what `train` writes before it starts
    assert training_unfinished(run) == "its training was interrupted and is not finished"
