"""`loraedit batch --ray` on a local Ray cluster: a worker killed mid-training is retried and resumes
to the same LoRA, a job with bad input fails alone, and the page lists every job."""

import os
import signal
import threading
import time

import ray
import torch
from safetensors.torch import load_file

from loraedit.cli import main
from loraedit.files import read_json


def _jobs_file(tmp_path, tiny_model, clip):
    f = tmp_path / "jobs.toml"
    f.write_text(f"""
model = "{tiny_model}"
video = "{clip['video']}"
first-frame = "{clip['first_frame']}"
mask = "{clip['mask']}"
frames = 17
size = "96x64"
steps = 12
checkpoint-every = 2
render-steps = 1
device = "cpu"

[[job]]
name = "killed"

[[job]]
name = "whole"

[[job]]
name = "naive"
mode = "naive"
steps = 2

[[job]]
name = "bad"
video = "no_such_clip.mp4"
""")
    return f


def test_ray_batch_retries_a_killed_worker_and_resumes_to_the_same_lora(tiny_model, clip, tmp_path, capsys):
    root = tmp_path / "batch"
    jobs = _jobs_file(tmp_path, tiny_model, clip)
    killed = {}
    finished = threading.Event()

    def kill_mid_training():
        state = root / ".jobs" / "killed.json"
        while not finished.is_set():
            # a whole checkpoint (its folder is renamed into place complete), so the retry can resume
            ckpts = [p for p in (root / "killed" / "train" / "checkpoints").glob("step-*/state.json") if ".tmp" not in str(p)]
            if state.is_file() and ckpts:
                rec = read_json(state)
                last = max(int(p.parent.name.split("-")[1]) for p in ckpts)
                if rec["status"] == "running" and last < 12:  # 12 steps: the last checkpoint ends training
                    os.kill(rec["pid"], signal.SIGKILL)
                    killed.update(pid=rec["pid"], after=sorted(p.parent.name for p in ckpts))
                    return
            time.sleep(0.02)

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        killer = threading.Thread(target=kill_mid_training, daemon=True)
        killer.start()
        rc = main(["batch", str(jobs), "--out", str(root), "--ray", "auto", "--max-retries", "2", "-q"])
        finished.set()
        killer.join(timeout=5)
        # a job that wants a GPU on a cluster without one would wait forever: refused in one line
        gpu_job = tmp_path / "gpu.toml"
        gpu_job.write_text(jobs.read_text().replace('device = "cpu"', 'device = "cuda"'))
        capsys.readouterr()
        assert main(["batch", str(gpu_job), "--out", str(tmp_path / "gpu"), "--ray", "auto"]) == 2
        assert "the cluster has 0 GPUs and job killed asks for 1" in capsys.readouterr().err
    finally:
        ray.shutdown()

    assert killed, "the test never caught the job mid-training"
    assert rc == 1  # one job failed
    batch = read_json(root / "batch.json")
    by_name = {j["name"]: j for j in batch["jobs"]}
    assert {n: j["status"] for n, j in by_name.items()} == {"killed": "done", "whole": "done", "naive": "done", "bad": "failed"}
    assert by_name["killed"]["attempt"] == 2 and by_name["killed"]["pid"] != killed["pid"]
    assert by_name["whole"]["attempt"] == 1
    assert "no_such_clip.mp4: no such video file" in by_name["bad"]["error"]
    assert "\n" not in by_name["bad"]["error"]
    resumed = read_json(root / "killed" / "train" / "done.json")["resumed_from"]
    assert resumed > 0, "the retry started over instead of resuming"
    for name in ("pytorch_lora_weights.safetensors", "wan_lora.safetensors"):
        a = load_file(str(root / "whole" / "lora" / name))
        b = load_file(str(root / "killed" / "lora" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    page = (root / "index.html").read_text()
    for name in by_name:
        assert f"<b>{name}</b>" in page
    assert "whole/render/side_by_side.mp4" in page and "no_such_clip.mp4: no such video file" in page
    assert isinstance(by_name["whole"]["metrics"]["psnr_out"], float)
