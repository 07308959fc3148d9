"""scripts/pretrain_toy.py reproduces its model from a seed: the same flags give the same bytes."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--threads", "1", "--workers", "2", "--layers", "2", "--heads", "2", "--head-dim", "16",
         "--ffn", "64", "--dit-clips", "2", "--dit-variants", "2", "--encode-batch", "4", "--dit-batch", "2",
         "--eval-clips", "1", "--eval-render-steps", "1", "--log-every", "1"]
# the VAE phases at their smallest (one clip of 5 frames, 32×32 crops): the runs check schedules and bytes, not quality
LEGACY_VAE = ["--dit-steps", "3", "--dit-warmup", "2", "--vae-steps", "1", "--vae-eval-every", "0", "--vae-clips", "1",
              "--vae-eval-clips", "1", "--dec-steps", "1", "--vae-batch", "1", "--vae-frames", "5", "--vae-crop", "32",
              "--dec-batch", "1", "--dec-frames", "5", "--dec-crop", "32"]


def weights_digest(folder: Path, part: str = "") -> str:
    h = hashlib.sha256()
    for p in sorted((folder / part).rglob("*.safetensors")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def pretrain_together(*runs: tuple) -> list[Path]:
    """Several (out, seed, *flags) runs of the script at once: each is one torch thread, so on a machine
    with two cores or more they share the cores instead of waiting for each other (half the test's time)."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "pretrain_toy.py"), "--seed", str(seed),
                               "--out", str(out), *SMALL, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for out, seed, *extra in runs]
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    return [run[0] for run in runs]


def test_same_seed_same_weights_budget_reproducible_frozen_parts_copied_and_packed(tmp_path, tiny_model):
    from diffusers import WanImageToVideoPipeline

    init = ["--init-from", str(tiny_model), "--dit-warmup", "10"]
    # b: a budget already spent when the steps are timed (inside the warm-up): the 50-step schedule is cut to
    # the steps done + 1 = 4, and the weights are those of the 4-step run a
    # d: the whole model from random weights (--init-from none), with whole single frames in the VAE's step
    # (--vae-first-frames), and a --vae-budget already spent when the VAE's steps are timed: its 50-step schedule
    # is cut to 4, the VAE of e's 4-step schedule (the same fixed --vae-warmup), and the VAE's first steps repeat
    # bit for bit
    vae_warmup = ["--vae-first-frames", "1", "--vae-warmup", "10", "--no-eval-baseline"]
    a, b, d, e = pretrain_together(
        (tmp_path / "a", 0, *init, "--dit-steps", "4", "--check-determinism", "2",
         "--pack", str(tmp_path / "packed"), "--pack-part-mb", "0.1"),
        (tmp_path / "b", 0, *init, "--dit-steps", "50", "--dit-calibrate", "3", "--budget", "1",
         "--budget-reserve", "0", "--no-eval-baseline"),
        (tmp_path / "d", 1, "--init-from", "none", *LEGACY_VAE, *vae_warmup, "--vae-steps", "50",
         "--vae-calibrate", "3", "--vae-budget", "0.001", "--check-determinism", "2"),
        (tmp_path / "e", 1, "--init-from", "none", *LEGACY_VAE, *vae_warmup, "--vae-steps", "4"))
    summary_d = json.loads((d / "training.json").read_text())
    assert summary_d["args"]["vae_first_frames"] == 1
    assert summary_d["vae_steps_requested"] == 50 and summary_d["vae_steps"] == 4
    assert summary_d["vae_determinism_check"]["identical"] is True
    assert weights_digest(d, "vae") == weights_digest(e, "vae")
    summary_b = json.loads((b / "training.json").read_text())
    assert summary_b["dit_steps_requested"] == 50 and summary_b["dit_steps"] == summary_b["dit_steps_run"] == 4
    assert weights_digest(a, "transformer") == weights_digest(b, "transformer")
    assert weights_digest(a, "transformer") != weights_digest(d, "transformer")
    # everything but the transformer is the --init-from folder's, byte for byte
    for part in ("vae", "text_encoder", "image_encoder"):
        assert weights_digest(a, part) == weights_digest(tiny_model, part)
    assert weights_digest(a, "transformer") != weights_digest(tiny_model, "transformer")
    summary = json.loads((a / "training.json").read_text())
    assert summary["determinism_check"]["identical"] is True
    assert summary["dit_steps_run"] == 4 and summary["dit_samples"] == 4
    assert set(summary["rollout_after"]) == {"from source frame 0", "from edited frame 0"}
    assert "baseline_eval" in summary and set(summary["weights_sha256"]) == {
        p.relative_to(a).as_posix() for p in a.rglob("*.safetensors")}
    # the packed parts put back together are the folder
    parts = sorted((tmp_path / "packed").glob("a.tar.part*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 100_000 for p in parts)
    data = b"".join(p.read_bytes() for p in parts)
    assert hashlib.sha256(data).hexdigest() in (tmp_path / "packed" / "a.tar.sha256").read_text()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert weights_digest(tmp_path / "unpacked" / "a") == weights_digest(a)
    for folder in (a, d):
        pipe = WanImageToVideoPipeline.from_pretrained(folder)  # the real loading path
        assert pipe.transformer.config.in_channels == 36 and pipe.transformer.config.num_layers == 2
        assert len(pipe.vae.config.latents_mean) == 16


def test_candidates_train_side_by_side_with_the_bytes_each_has_alone_and_write_only_new_weights(tmp_path, tiny_model):
    import shutil

    from diffusers import WanImageToVideoPipeline

    common = ["--init-from", str(tiny_model), "--dit-warmup", "10", "--dit-steps", "3", "--weights-only"]
    both, alone = pretrain_together(
        (tmp_path / "both", 0, *common, "--candidates", "2x2x16x64,3x2x16x64", "--check-determinism", "2",
         "--log-file", str(tmp_path / "both" / "log.txt")),
        (tmp_path / "alone", 0, *common, "--candidates", "3x2x16x64", "--no-eval-baseline"))
    names = ("dit-2x2x16x64", "dit-3x2x16x64")
    assert weights_digest(both, names[1]) == weights_digest(alone, names[1])  # nothing leaks between the threads
    assert weights_digest(both, names[0]) != weights_digest(both, names[1])
    # only what --init-from does not already give: the transformers, training.json and the log
    assert sorted(p.name for p in both.iterdir()) == sorted([*names, "log.txt", "training.json"])
    summary = json.loads((both / "training.json").read_text())
    assert summary["determinism_check"]["identical"] is True
    for name in names:
        cand = summary["candidates"][name]
        assert cand["dit_steps_run"] == 3 and cand["dit_loss_curve"]
        assert set(cand["rollout_after"]) == {"from source frame 0", "from edited frame 0"}
        assert "object_sigma_0.9" in cand["dit_eval_after"] or "sigma_0.9" in cand["dit_eval_after"]
    log = (both / "log.txt").read_text()
    assert "sha256" in log and "[dit-3x2x16x64] DiT step 3/3" in log
    # a candidate put into a copy of the --init-from folder is a model the real loader takes
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    shutil.rmtree(model / "transformer")
    shutil.copytree(both / names[1] / "transformer", model / "transformer")
    assert WanImageToVideoPipeline.from_pretrained(model).transformer.config.num_layers == 3


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_toy", ROOT / "scripts" / "pretrain_toy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pretrain_toy", mod)  # its dataclasses look their module up there
    spec.loader.exec_module(sys.modules["pretrain_toy"])
    return sys.modules["pretrain_toy"]


def test_vivid_variant_saturates_every_pixel_the_same_way_for_a_seed_and_keeps_greys():
    import numpy as np

    mod = load_script()
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[:, :2] = (120, 100, 80)  # a muted brown (saturation 0.33)
    frames[:, 2:] = (90, 90, 90)  # grey
    a, b = mod.vivid(frames, 7), mod.vivid(frames, 7)
    assert a.dtype == np.uint8 and a.shape == frames.shape and (a == b).all()  # a pure function of the seed
    assert (a[:, 2:] == 90).all()  # greys stay grey
    spread = lambda px: int(px.max()) - int(px.min())
    assert 1.6 * 40 - 1 <= spread(a[0, 0, 0]) <= 2.4 * 40 + 1  # the gain is in [1.6, 2.4]
    gains = {spread(mod.vivid(frames, s)[0, 0, 0]) for s in range(8)}
    assert len(gains) > 3  # drawn per clip, not one fixed gain

    class Clip:
        seed, caption, edited_caption = 7, "a", "b"
        source = frames
        truth = frames[:, ::-1].copy()

    names = ("source", "truth vivid")
    (src, cap_s), (tv, cap_t) = mod.clip_variants(Clip, names)
    assert (src == frames).all() and cap_s == "a" and cap_t == "b" and (tv == mod.vivid(Clip.truth, 7)).all()
    assert mod.variant_names("source,source vivid,truth vivid") == ("source", "source vivid", "truth vivid")


def test_object_coverage_on_the_latent_grid_and_the_weighted_loss():
    import numpy as np
    import torch

    mod = load_script()
    alpha = np.zeros((9, 32, 32), np.float32)
    alpha[0, :8, :8] = 1.0  # frame 0: one full latent cell
    alpha[1:3, 8:16, :8] = 1.0  # frames 1-2 of the first 4-frame chunk: half a cell's time
    cover = mod.latent_coverage(alpha)
    assert cover.shape == (3, 4, 4)
    assert cover[0, 0, 0] == 1.0 and cover[1, 1, 0] == 0.5 and cover.sum() == 1.5

    class Echo(torch.nn.Module):  # predicts zero velocity: the loss is then the target's own square
        dtype = torch.float32

        def forward(self, hidden_states, **kw):
            return (torch.zeros_like(hidden_states[:, :16]),)

    x0 = torch.zeros(1, 16, 3, 4, 4)
    noise = torch.zeros_like(x0)
    noise[:, :, 0, 0, 0] = 2.0  # all the error in the one cell the object covers
    cond = torch.zeros(1, 20, 3, 4, 4)
    sigma = torch.full((1,), 0.5)
    args = (Echo(), x0, cond, torch.zeros(1, 1, 32), None, sigma, noise, torch.from_numpy(cover)[None, None])
    plain = mod.object_weighted_loss(*args, 0.0)
    weighted = mod.object_weighted_loss(*args, 4.0)
    assert torch.isclose(plain, torch.tensor(4.0 / 48))
    assert weighted > 3 * plain  # the object's cell counts 5x, the mean weight is 1 + 4 * 1.5 / 48


def test_dit_init_continues_from_the_given_weights_and_refuses_a_bad_folder(tmp_path, tiny_model):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("pretrain_toy", ROOT / "scripts" / "pretrain_toy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pretrain_toy", mod)
    spec.loader.exec_module(sys.modules["pretrain_toy"])
    mod = sys.modules["pretrain_toy"]
    folder = tiny_model / "transformer"
    args = mod.parse_args(["--device", "cpu", "--init-from", str(tiny_model), "--dit-init", str(folder)])
    config = json.loads((folder / "config.json").read_text())
    assert (args.layers, args.heads, args.ffn) == (config["num_layers"], config["num_attention_heads"], config["ffn_dim"])
    from diffusers import WanTransformer3DModel

    saved = WanTransformer3DModel.from_pretrained(folder).state_dict()
    started = mod.new_transformer(args, torch.device("cpu")).state_dict()
    assert saved.keys() == started.keys() and all(torch.equal(saved[k], started[k].to(saved[k].dtype)) for k in saved)
    fresh = mod.new_transformer(mod.parse_args(["--device", "cpu", "--init-from", str(tiny_model), "--layers",
                                                str(config["num_layers"]), "--heads", str(config["num_attention_heads"]),
                                                "--head-dim", str(config["attention_head_dim"]),
                                                "--ffn", str(config["ffn_dim"])]), torch.device("cpu"))
    comparable = [k for k, v in fresh.state_dict().items() if k in saved and v.shape == saved[k].shape]
    assert comparable and any(not torch.equal(fresh.state_dict()[k], saved[k]) for k in comparable)

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_toy.py"), "--device", "cpu",
                        "--dit-init", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--dit-init" in r.stderr and "not a transformer folder" in r.stderr
    assert not (tmp_path / "o").exists()


def test_decoder_only_refines_the_decoder_and_leaves_every_latent_as_it_was(tmp_path, tiny_model):
    """--decoder-only (how the bundled VAE's decoder was refined): the same flags give the same bytes, the
    encoder's weights (so every latent the transformer was trained on) are the --init-from folder's, the
    decoder's are not, and whole single frames (the first frame's own decoding path) are part of the steps."""
    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    flags = ["--init-from", str(tiny_model), "--decoder-only", "--dec-steps", "2", "--dec-batch", "1",
             "--dec-frames", "5", "--dec-crop", "32", "--dec-first-frames", "1", "--vae-clips", "2"]
    a, b = pretrain_together((tmp_path / "a", 0, *flags), (tmp_path / "b", 0, *flags))
    assert sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()) == [
        "training.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert weights_digest(a) == weights_digest(b)
    old = load_file(tiny_model / "vae" / "diffusion_pytorch_model.safetensors")
    new = load_file(a / "vae" / "diffusion_pytorch_model.safetensors")
    assert old.keys() == new.keys()
    enc = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in old if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec
    assert all(torch.equal(old[k], new[k]) for k in enc)
    assert any(not torch.equal(old[k], new[k]) for k in dec)
    summary = json.loads((a / "training.json").read_text())
    assert summary["dec_steps"] == 2 and {"vae_eval_before", "vae_eval_refined"} <= set(summary)
    assert AutoencoderKLWan.from_pretrained(a / "vae").config.latents_mean == \
        AutoencoderKLWan.from_pretrained(tiny_model / "vae").config.latents_mean
    # without a VAE to refine: one line, exit 2
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_toy.py"), "--device", "cpu", "--init-from",
                        "none", "--decoder-only", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "--decoder-only" in r.stderr and not (tmp_path / "o").exists()


def test_vae_init_starts_the_vae_phase_from_the_given_vae_and_dit_init_works_without_init_from(tmp_path, tiny_model):
    """--vae-init continues a trained VAE (the toy's next GPU run); with --init-from none the transformer can
    continue too (--dit-init), since its shape comes from its own config."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("pretrain_toy", ROOT / "scripts" / "pretrain_toy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pretrain_toy", mod)
    spec.loader.exec_module(sys.modules["pretrain_toy"])
    mod = sys.modules["pretrain_toy"]
    bundled = ROOT / "loraedit" / "toymodel"
    args = mod.parse_args(["--device", "cpu", "--init-from", "none", "--vae-init", str(bundled),
                           "--dit-init", str(bundled / "transformer")])
    pipe = mod.build_pipeline(args, torch.device("cpu"))
    from diffusers import AutoencoderKLWan

    saved = AutoencoderKLWan.from_pretrained(bundled, subfolder="vae").state_dict()
    started = pipe.vae.state_dict()
    assert saved.keys() == started.keys() and all(torch.equal(saved[k], started[k]) for k in saved)
    fresh = mod.build_pipeline(mod.parse_args(["--device", "cpu", "--init-from", "none"]), torch.device("cpu"))
    assert any(not torch.equal(fresh.vae.state_dict()[k], saved[k]) for k in saved)

    script = [sys.executable, str(ROOT / "scripts" / "pretrain_toy.py"), "--device", "cpu", "--out", str(tmp_path / "o")]
    r = subprocess.run(script + ["--vae-init", str(tmp_path / "nothing"), "--init-from", "none"], capture_output=True, text=True)
    assert r.returncode == 2 and "--vae-init" in r.stderr and "no vae/config.json" in r.stderr
    r = subprocess.run(script + ["--vae-init", str(bundled), "--init-from", str(tiny_model)], capture_output=True, text=True)
    assert r.returncode == 2 and "--init-from none" in r.stderr
    assert not (tmp_path / "o").exists()
