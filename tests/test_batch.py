"""`loraedit batch` without Ray: reading jobs and variants, one-line failures, the page, reruns."""

import pytest

from loraedit.batch import job_argv, load_jobs
from loraedit.cli import main
from loraedit.errors import InputError
from loraedit.files import read_json


def test_jobs_expand_variants_and_resolve_paths_beside_the_file(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"")
    (tmp_path / "b8.png").write_bytes(b"")
    f = tmp_path / "shots.toml"
    f.write_text("""
model = "org/some-model"
steps = 10
[[job]]
name = "walk"
video = "clips/a.mp4"
mode = ["mask-aware", "naive"]
seed = [0, 1]
[[job]]
name = "turn"
ref = [{}, {8 = "b8.png"}]
[[job.variant]]
name = "tight"
mask-style = "tight"
[[job.variant]]
name = "loose"
""")
    jobs = load_jobs(str(f))
    names = [j.name for j in jobs]
    assert names == ["walk.mode-mask-aware.seed-0", "walk.mode-mask-aware.seed-1", "walk.mode-naive.seed-0",
                     "walk.mode-naive.seed-1", "turn.ref-none.tight", "turn.ref-none.loose", "turn.ref-8.tight",
                     "turn.ref-8.loose"]
    walk = jobs[3]
    assert walk.settings["mode"] == "naive" and walk.settings["seed"] == 1 and walk.settings["steps"] == 10
    assert walk.settings["video"] == str(tmp_path / "clips" / "a.mp4")
    assert walk.settings["model"] == "org/some-model"  # not a file: kept, as a hub id
    assert walk.variant == {"mode": "naive", "seed": 1}
    tight8 = jobs[6]
    assert tight8.settings["ref"] == [f"8={tmp_path / 'b8.png'}"] and tight8.settings["mask_style"] == "tight"
    argv = job_argv(tight8, tmp_path / "out")
    assert argv[:4] == ["edit", "--out", str(tmp_path / "out"), "-q"]
    assert argv[argv.index("--ref") + 1] == f"8={tmp_path / 'b8.png'}" and argv[argv.index("--mask-style") + 1] == "tight"
    assert all(j.error is None for j in jobs)


def test_job_mistakes_fail_that_job_alone_and_batch_mistakes_stop_before_anything_runs(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "good.toml").write_text('video = "x.mp4"\n')
    (folder / "typo.toml").write_text("stepz = 3\n")
    (folder / "broken.toml").write_text("steps = = 3\n")
    (folder / "two.toml").write_text('steps = [1, 2]\nframes = 17\n')
    jobs = {j.name: j for j in load_jobs(str(folder))}
    assert jobs["good"].error is None and jobs["two.steps-1"].error is None and jobs["two.steps-2"].error is None
    assert "unknown setting 'stepz'" in jobs["typo"].error
    assert "not valid TOML" in jobs["broken"].error
    dup = tmp_path / "dup.toml"
    dup.write_text('[[job]]\nname = "a"\n[[job]]\nname = "a"\n')
    with pytest.raises(InputError, match="used twice"):
        load_jobs(str(dup))
    with pytest.raises(InputError, match="no such job file"):
        load_jobs(str(tmp_path / "missing.toml"))
    assert main(["batch", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "r")]) == 2


def test_sequential_batch_runs_scores_and_reruns_only_what_is_not_done(tiny_model, clip, tmp_path, capsys, monkeypatch):
    f = tmp_path / "jobs.toml"
    body = f"""
model = "{tiny_model}"
video = "{clip['video']}"
first-frame = "{clip['first_frame']}"
mask = "{clip['mask']}"
frames = 17
size = "96x64"
steps = 2
render-steps = 2
device = "cpu"
[[job]]
name = "square"
mode = ["mask-aware", "naive"]
[[job]]
name = "bad"
frames = 16
"""
    f.write_text(body)
    root = tmp_path / "root"
    assert main(["batch", str(f), "--out", str(root)]) == 1
    err = capsys.readouterr().err
    assert "loraedit: bad: --frames 16: must be 4k+1" in err and "2 of 3 done, 1 failed" in err
    batch = read_json(root / "batch.json")
    status = {j["name"]: j["status"] for j in batch["jobs"]}
    assert status == {"square.mode-mask-aware": "done", "square.mode-naive": "done", "bad": "failed"}
    done = {j["name"]: j for j in batch["jobs"] if j["status"] == "done"}
    assert all(0 < j["metrics"]["ssim_out"] <= 1 and j["render"] == "render" for j in done.values())
    assert (root / "square.mode-naive" / "render" / "metrics.json").is_file()
    page = (root / "index.html").read_text()
    assert "square.mode-naive/render/side_by_side.mp4" in page and "must be 4k+1" in page

    # the same command again: the finished jobs are not run again; the failed one is
    started = {n: j["started"] for n, j in done.items()}
    f.write_text(body.replace("frames = 16", "frames = 17"))
    assert main(["batch", str(f), "--out", str(root)]) == 0
    batch = read_json(root / "batch.json")
    assert all(j["status"] == "done" for j in batch["jobs"])
    assert {j["name"]: j["started"] for j in batch["jobs"] if j["name"] in started} == started
    bad_started = next(j["started"] for j in batch["jobs"] if j["name"] == "bad")
    # other render settings for one job: it is redone (rendered beside the first), the page shows the new one
    f.write_text(body.replace("frames = 16", "frames = 17").replace('mode = ["mask-aware", "naive"]',
                                                                   'mode = ["mask-aware", "naive"]\nguidance = 2.0'))
    assert main(["batch", str(f), "--out", str(root)]) == 0
    jobs = {j["name"]: j for j in read_json(root / "batch.json")["jobs"]}
    assert jobs["square.mode-naive"]["render"] == "render-2" and jobs["square.mode-naive"]["started"] > started["square.mode-naive"]
    assert jobs["bad"]["started"] == bad_started
    assert "square.mode-naive/render-2/side_by_side.mp4" in (root / "index.html").read_text()

    # a training setting of one job changes: that job trains again (edit alone would refuse the run folder), its old
    # run is kept aside, not deleted; the page says "running" while it trains
    import loraedit.batch as batch_module

    seen, real = [], batch_module.write_summary
    monkeypatch.setattr(batch_module, "write_summary",
                        lambda *a: (seen.append({n: r["status"] for n, r in a[2].items()}), real(*a))[1])
    lora = "lora/pytorch_lora_weights.safetensors"
    old_lora = (root / "bad" / lora).read_bytes()
    f.write_text(body.replace("frames = 16", "frames = 17\nsteps = 3").replace('mode = ["mask-aware", "naive"]',
                                                                           'mode = ["mask-aware", "naive"]\nguidance = 2.0'))
    assert main(["batch", str(f), "--out", str(root)]) == 0
    jobs = {j["name"]: j for j in read_json(root / "batch.json")["jobs"]}
    assert jobs["bad"]["status"] == "done" and jobs["bad"]["previous_run"] == str(root / ".previous" / "bad-1")
    assert (root / ".previous" / "bad-1" / lora).read_bytes() == old_lora != (root / "bad" / lora).read_bytes()
    assert read_json(root / "bad" / "job.json")["train"]["steps"] == 3
    assert {"square.mode-mask-aware": "done", "square.mode-naive": "done", "bad": "running"} in seen
    assert "its inputs changed since its LoRA was trained" in (root / ".jobs" / "bad.log").read_text()


def test_a_job_named_like_a_path_fails_alone_and_writes_nothing_outside_its_folder(tmp_path):
    """name = "../escape" wrote ROOT/escape.json (and '../../x' would land outside ROOT) before it was refused."""
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nname = "../escape"\nvideo = "x.mp4"\n[[job]]\nname = "../../out"\nvideo = "x.mp4"\n')
    root = tmp_path / "root" / "batch"
    assert main(["batch", str(jobs), "--out", str(root)]) == 1  # every job failed
    record = read_json(root / "batch.json")
    assert [j["status"] for j in record["jobs"]] == ["failed", "failed"] and "is not a folder name" in record["jobs"][0]["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.toml", "root"]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["batch"]
    assert all(p.name.startswith("invalid-name-") for p in (root / ".jobs").iterdir())


def test_a_job_named_like_the_batch_folders_own_files_fails_alone(tmp_path):
    f = tmp_path / "jobs.toml"
    f.write_text('[[job]]\nname = "index.html"\nvideo = "x.mp4"\n[[job]]\nname = "ok"\nvideo = "x.mp4"\n')
    jobs = load_jobs(str(f))
    assert "is a file of the batch folder itself" in jobs[0].error and jobs[1].error is None


def test_a_variant_without_a_name_fails_its_job(tmp_path):
    f = tmp_path / "jobs.toml"
    f.write_text('[[job]]\nname = "a"\nvideo = "x.mp4"\n[[job.variant]]\nsteps = 3\n[[job.variant]]\nname = "b"\nsteps = 4\n')
    [job] = load_jobs(str(f))
    assert "[[variant]] 1 of job 'a' has no name" in job.error


def test_ref_none_clears_the_references():
    from loraedit.settings import PrepareSettings

    assert PrepareSettings(ref=["none"]).ref == {} and PrepareSettings(ref="None").ref == {}
