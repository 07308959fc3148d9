"""`loraedit eval`: score edited videos against their source, edited first frame and edit region.

    loraedit eval runs/jacket                          # a run folder (its render/)
    loraedit eval runs/*  --clip ~/models/clip-vit-large-patch14 --table scores.md
    loraedit eval other_method.mp4 --like runs/jacket  # another method's output, same inputs
    loraedit eval out.mp4 --source src.mp4 --first-frame edited.png [--mask region.mkv]

Metrics (every one is computed on the frames at the run's working size):
    clip_score        mean CLIP image-embedding cosine of each output frame 1…F-1 with the edited
                      first frame (the paper's "CLIP score"; needs --clip)
    input_similarity  mean CLIP cosine of output frame i with source frame i (the paper's; --clip)
    deqa              DeQA-Score (1–5) of the output frames, mean (the paper's; needs --deqa)
    psnr_out, ssim_out  PSNR (dB) / SSIM of output vs source outside the edit region, frames 1…F-1:
                      how well the background is kept
    first_psnr        output frame 0 vs the edited first frame (dB)
    warp_err          temporal consistency: mean |out_t − out_{t+1} warped back by the *source's*
                      optical flow| (0–255) over pixels where that flow is reliable; the figure
                      the video-editing literature calls warp error. warp_err_source is the same
                      for the source itself, the floor the flow allows.
A run folder's scores are also written to RUN/render/metrics.json.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from loraedit.errors import InputError

log = logging.getLogger("loraedit")

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # not .gif: an animated one is a clip
COLUMNS = (("clip_score", "CLIP score", 4), ("input_similarity", "input sim", 4), ("deqa", "DeQA", 3),
           ("psnr_out", "PSNR out (dB)", 2), ("ssim_out", "SSIM out", 4), ("first_psnr", "frame-0 PSNR", 2),
           ("warp_err", "warp err", 2))


@dataclass
class Scored:
    """What one result is scored on: all (F, H, W, …) at the same size."""
    name: str
    output: np.ndarray  # (F, H, W, 3) uint8
    source: np.ndarray  # (F, H, W, 3) uint8
    first: np.ndarray | None  # (H, W, 3) uint8, the edited first frame
    region: np.ndarray | None  # (F, H, W) bool, True = edit region
    write_to: Path | None = None  # where metrics.json goes (a run's render folder)


# ---------------------------------------------------------------- metrics that need no weights


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    from loraedit.world import psnr as _psnr

    return _psnr(a, b, where)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of two (H, W, 3) uint8 images per pixel, mean over channels → (H, W).

    Wang et al. 2004 with the usual 11×11 Gaussian window (σ 1.5). By hand because the masked mean
    needs the map, and this is the only use of an image-quality library here.
    """
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = a.astype(np.float64), b.astype(np.float64)

    def blur(z):
        return cv2.GaussianBlur(z, (11, 11), 1.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=-1)


def ssim_outside(output: np.ndarray, source: np.ndarray, region: np.ndarray | None) -> float:
    """Mean SSIM over pixels outside the region, frames 1…F-1 (all pixels without a region).

    Only pixels whose whole 11×11 window lies outside count, so the edit itself never lowers it."""
    vals = []
    for i in range(1, len(output)):
        s = ssim_map(output[i], source[i])
        keep = np.ones(s.shape, bool) if region is None else ~cv2.dilate(region[i].astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool)
        if keep.any():
            vals.append(s[keep])
    return float(np.concatenate(vals).mean()) if vals else float("nan")


def source_flows(source: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """For t = 0…F-2: (flow t→t+1 (H, W, 2), reliable (H, W) bool), from the source by DIS flow.

    Reliable = the forward flow and the backward flow agree (occlusions and flow failures fail the
    check) and the target lies inside the frame.
    """
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in source]
    H, W = gray[0].shape
    xs, ys = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    out = []
    for a, b in zip(gray[:-1], gray[1:]):
        fwd = dis.calc(a, b, None)
        bwd = dis.calc(b, a, None)
        mx, my = xs + fwd[..., 0], ys + fwd[..., 1]
        back = cv2.remap(bwd, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        err = np.linalg.norm(fwd + back, axis=-1)
        mag = np.linalg.norm(fwd, axis=-1) ** 2 + np.linalg.norm(back, axis=-1) ** 2
        inside = (mx >= 0) & (mx <= W - 1) & (my >= 0) & (my <= H - 1)
        out.append((fwd, inside & (err ** 2 <= 0.01 * mag + 0.5)))  # Sundaram et al.'s consistency test
    return out


def warp_error(video: np.ndarray, flows: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean |v_t − v_{t+1} warped back to t by the given flows| over the reliable pixels, 0–255."""
    H, W = video.shape[1:3]
    xs, ys = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    total, count = 0.0, 0
    for t, (flow, ok) in enumerate(flows):
        warped = cv2.remap(video[t + 1], xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        d = np.abs(video[t].astype(np.float64) - warped.astype(np.float64)).mean(-1)
        total += float(d[ok].sum())
        count += int(ok.sum())
    return total / count if count else float("nan")


def pixel_metrics(s: Scored) -> dict[str, float]:
    if len(s.output) < 2:  # a single frame: nothing after frame 0 to compare, no motion to warp
        nan = float("nan")
        first = psnr(s.output[0], s.first) if s.first is not None else nan
        return {"psnr_out": nan, "ssim_out": nan, "first_psnr": first, "warp_err": nan, "warp_err_source": nan}
    later = slice(1, len(s.output))
    keep = None if s.region is None else ~s.region
    flows = source_flows(s.source)
    return {
        "psnr_out": psnr(s.output[later], s.source[later], None if keep is None else keep[later]),
        "ssim_out": ssim_outside(s.output, s.source, s.region),
        "first_psnr": psnr(s.output[0], s.first) if s.first is not None else float("nan"),
        "warp_err": warp_error(s.output, flows),
        "warp_err_source": warp_error(s.source, flows),
    }


# ---------------------------------------------------------------- metrics that need weights


class ClipScorer:
    """CLIP image embeddings from a local folder (or a hub id where there is network)."""

    def __init__(self, path: str, device: str = "cpu"):
        import torch
        from transformers import AutoConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

        local = Path(path).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise InputError(f"--clip {path}: has no config.json, so it is not a CLIP model folder; give the "
                                 "folder of a transformers CLIP model (e.g. openai/clip-vit-large-patch14)")
            path = str(local)
        elif path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise InputError(f"--clip {path}: no such folder; give a local CLIP model folder (e.g. a download of "
                             "openai/clip-vit-large-patch14) or its hub id")
        try:
            self.processor = CLIPImageProcessor.from_pretrained(path)
            kind = AutoConfig.from_pretrained(path).model_type
            if kind == "clip":  # a whole CLIP model (vision + text): keep its vision tower and projection
                self.model = CLIPModel.from_pretrained(path).eval().to(device)
            elif kind == "clip_vision_model":
                self.model = CLIPVisionModelWithProjection.from_pretrained(path).eval().to(device)
            else:
                raise InputError(f"--clip {path}: is a {kind} model, not CLIP")
        except OSError as exc:
            raise InputError(f"--clip {path}: could not load a CLIP model ({str(exc).splitlines()[0]}); "
                             "give a local folder when there is no network") from None
        self.device = device
        self.torch = torch

    def embed(self, frames: np.ndarray, batch: int = 16):
        """(N, H, W, 3) uint8 → (N, D) unit-length image embeddings."""
        torch = self.torch
        out = []
        with torch.no_grad():
            for i in range(0, len(frames), batch):
                px = self.processor(images=list(frames[i:i + batch]), return_tensors="pt")["pixel_values"]
                px = px.to(self.device, self.model.dtype)
                if hasattr(self.model, "visual_projection") and hasattr(self.model, "text_model"):
                    e = self.model.visual_projection(self.model.vision_model(pixel_values=px).pooler_output)
                else:
                    e = self.model(pixel_values=px).image_embeds
                e = e.float()
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        return torch.cat(out)

    def scores(self, s: Scored) -> dict[str, float]:
        out = self.embed(s.output)
        res = {"input_similarity": float((out * self.embed(s.source)).sum(-1).mean())}
        if s.first is not None and len(s.output) > 1:
            first = self.embed(s.first[None])[0]
            res["clip_score"] = float((out[1:] @ first).mean())
        return res


def deqa_score(path: str, frames: np.ndarray, device: str = "cpu", every: int = 1) -> float:
    """DeQA-Score (1–5, higher = better quality) averaged over the frames.

    DeQA-Score ships as a transformers remote-code model whose `score(list of PIL images)` returns
    one score per image (zhiyuanyou/DeQA-Score-Mix3).
    """
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM

    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise InputError(f"--deqa {path}: no such folder; give a local DeQA-Score model folder "
                         "(e.g. a download of zhiyuanyou/DeQA-Score-Mix3)")
    import transformers

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else path, trust_remote_code=True,
                                                 attn_implementation="eager", **{dtype_arg: dtype}).to(device).eval()
    with torch.no_grad():
        scores = model.score([Image.fromarray(f) for f in frames[::every]])
    return float(torch.as_tensor(scores, dtype=torch.float32).mean())


# ---------------------------------------------------------------- inputs


def is_run(path: Path) -> bool:
    return (path / "prepare" / "plan.json").is_file()


def load_run(run_dir: Path, render_name: str = "render") -> Scored:
    """A run folder's result and the prepared inputs it was made from (lossless PNGs)."""
    from loraedit.video import read_gray, read_image

    from loraedit.files import read_json

    from loraedit.cli import check_render_name

    check_render_name(render_name, "--render")  # a folder of this run, not a path to another run's render
    plan = read_json(run_dir / "prepare" / "plan.json")
    frames_dir = run_dir / render_name / "frames"
    if not (run_dir / render_name / "settings.json").is_file() or not frames_dir.is_dir():
        raise InputError(f"{run_dir}: has no finished {render_name}/ yet; run `loraedit edit` or `loraedit render` first")
    F = plan["frames"]
    prep = run_dir / "prepare"
    return Scored(
        name=str(run_dir) if render_name == "render" else f"{run_dir}/{render_name}",
        output=np.stack([read_image(frames_dir / f"{i:03d}.png") for i in range(F)]),
        source=np.stack([read_image(prep / "source" / f"{i:03d}.png") for i in range(F)]),
        # a render with another --first-frame keeps it beside its frames; renders made before did not
        first=read_image(next(p for p in (run_dir / render_name / "first_frame.png", prep / "first_frame.png") if p.is_file())),
        region=np.stack([read_gray(prep / "region" / f"{i:03d}.png") > 127 for i in range(F)]),
        write_to=run_dir / render_name,
    )


def _read_video(path: Path) -> np.ndarray:
    from loraedit.video import probe_video, read_video_frames

    info = probe_video(path)
    return read_video_frames(path, list(range(info.n_frames)))


def load_video(path: Path, like: Path | None, source: str | None, first_frame: str | None, mask: str | None) -> Scored:
    """Any result video, scored on a run's prepared inputs (`like`) or on the given files."""
    from loraedit.masks import _read_mask_frames
    from loraedit.video import fit_to_size, read_image

    if like is not None and (source or first_frame or mask):
        raise InputError("--like RUN scores on the run's own source, first frame and region: give it, or --source "
                         "(with --first-frame, --mask), not both")
    out = _read_video(path)
    F, H, W = out.shape[:3]
    if like is not None:
        ref = load_run_inputs(like)
        _same_aspect(f"--like {like}", ref.source.shape[2], ref.source.shape[1], W, H, path)
        if ref.source.shape[0] != F:
            log.warning("%s: has %d frames, the run %s %d; scoring the first %d", path, F, like, ref.source.shape[0],
                        min(F, ref.source.shape[0]))
        n = min(F, ref.source.shape[0])
        h, w = ref.source.shape[1:3]
        out = np.stack([fit_to_size(f, w, h) for f in out[:n]])
        return Scored(str(path), out, ref.source[:n], ref.first, ref.region[:n])
    if source is None:
        raise InputError(f"{path}: a video needs what it was made from: --like RUN (a run folder) or --source VIDEO")
    if Path(source).is_dir():
        raise InputError(f"--source {source}: is a folder; pass the source video the result was made from")
    if not Path(source).is_file():
        raise InputError(f"--source {source}: no such file")
    if Path(source).suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"--source {source}: is an image; pass the source video the result was made from")
    from loraedit.video import probe_video

    src_info, out_info = probe_video(source), probe_video(path)
    _same_aspect(f"--source {source}", src_info.width, src_info.height, W, H, path)
    src = _read_video(Path(source))
    if abs(src_info.fps - out_info.fps) > 0.01 * out_info.fps:
        # frame i of the result is at i / its fps: the source frame nearest that instant (both from 0 s)
        picks = [j for j in (int(round(i * src_info.fps / out_info.fps)) for i in range(F)) if j < len(src)]
        log.info("--source %s: %.3g fps, the result %.3g fps; comparing the frames at the same times from 0 s",
                 source, src_info.fps, out_info.fps)
        src = src[picks]
    if len(src) != F:
        log.warning("%s: has %d frames, --source %s %d at its rate; scoring the first %d", path, F, source, len(src),
                    min(F, len(src)))
    n = min(F, len(src))
    src = np.stack([fit_to_size(f, W, H) for f in src[:n]])
    first = None
    if first_frame:
        if not Path(first_frame).is_file():
            raise InputError(f"--first-frame {first_frame}: no such file")
        img = read_image(first_frame)
        _same_aspect(f"--first-frame {first_frame}", img.shape[1], img.shape[0], W, H, path)
        first = fit_to_size(img, W, H)
    region = None
    if mask:
        if not Path(mask).exists():
            raise InputError(f"--mask {mask}: no such file or folder")
        region = np.stack([fit_to_size(m, W, H, nearest=True) > 127 for m in _read_mask_frames(Path(mask), list(range(n)), n)])
    return Scored(str(path), out[:n], src, first, region)


def _same_aspect(what: str, w: int, h: int, W: int, H: int, path: Path) -> None:
    """A comparison input must show the result's picture. It is centre-cropped to the result's aspect,
    as prepare crops a clip to its --size (a 4:3 source edited at 832x480: said in a line); one whose
    aspect is more than twice off cannot be the picture the result was made from."""
    off = (w / h) / (W / H)
    if max(off, 1 / off) > 2:
        raise InputError(f"{what}: is {w}x{h}, another aspect ratio than the result's {W}x{H} ({path}); "
                         "pass the file the result was made from")
    if max(off, 1 / off) > 1.05:
        log.warning("%s: is %dx%d, the result %dx%d: centre-cropped to the result's aspect, as prepare crops", what, w, h, W, H)


def load_run_inputs(run_dir: Path) -> Scored:
    """A run's prepared source, edited first frame and region (no result needed)."""
    from loraedit.files import read_json
    from loraedit.video import read_gray, read_image

    if not is_run(run_dir):
        raise InputError(f"--like {run_dir}: is not a prepared run folder (no prepare/plan.json)")
    F = read_json(run_dir / "prepare" / "plan.json")["frames"]
    prep = run_dir / "prepare"
    src = np.stack([read_image(prep / "source" / f"{i:03d}.png") for i in range(F)])
    return Scored(str(run_dir), src, src, read_image(prep / "first_frame.png"),
                  np.stack([read_gray(prep / "region" / f"{i:03d}.png") > 127 for i in range(F)]))


# ---------------------------------------------------------------- scoring


def score(s: Scored, clip: ClipScorer | None = None, deqa: str | None = None, device: str = "cpu") -> dict[str, float]:
    m = pixel_metrics(s)
    if clip is not None:
        m.update(clip.scores(s))
    if deqa:
        m["deqa"] = deqa_score(deqa, s.output, device)
    m["frames"] = int(len(s.output))
    return m


def score_run(run_dir: Path, clip_path: str | None = None, deqa: str | None = None, device: str = "cpu",
              render_name: str = "render") -> dict[str, float]:
    """Score a finished run and write RUN/render/metrics.json (what `loraedit batch` calls)."""
    from loraedit.files import write_json

    s = load_run(Path(run_dir), render_name)
    m = score(s, ClipScorer(clip_path, device) if clip_path else None, deqa, device)
    write_json(s.write_to / "metrics.json", m)
    return m


def format_table(rows: dict[str, dict], markdown: bool = False) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]

    def cell(m, key, digits):
        v = m.get(key)
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    if markdown:
        lines = ["| result | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(cell(m, k, d) for k, _, d in cols) + " |" for name, m in rows.items()]
        return "\n".join(lines)
    width = max([6] + [len(n) for n in rows]) + 2
    lines = [f"{'result':{width}s}" + "".join(f"{c[1]:>15s}" for c in cols)]
    lines += [f"{name:{width}s}" + "".join(f"{cell(m, k, d):>15s}" for k, _, d in cols) for name, m in rows.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def register(subparsers) -> argparse.ArgumentParser:
    help = "score edited videos: CLIP score, input similarity, DeQA, background PSNR/SSIM, warp error"
    p = subparsers.add_parser("eval", help=help, description=help,
                              epilog="A video needs --like RUN or --source (and optionally --first-frame, --mask).")
    p.add_argument("targets", nargs="+", metavar="RUN_OR_VIDEO", help="run folders (their render/) or result videos")
    p.add_argument("--like", default=None, metavar="RUN", help="score videos on this run's prepared source, edited first frame and region")
    p.add_argument("--source", default=None, help="the source video a result video was made from")
    p.add_argument("--first-frame", dest="first_frame", default=None, help="the edited first frame of a result video")
    p.add_argument("--mask", default=None, help="the edit region of a result video (mask video, PNG folder or PNG; white = edit)")
    p.add_argument("--render", default="render", help="which render of a run folder (default render)")
    p.add_argument("--clip", default=None, metavar="PATH", help="CLIP model folder (or hub id) for CLIP score and input similarity")
    p.add_argument("--deqa", default=None, metavar="PATH", help="DeQA-Score model folder (or hub id) for the quality score")
    p.add_argument("--device", default="cpu", help="for the CLIP / DeQA models (default cpu)")
    p.add_argument("--table", default=None, metavar="FILE", help="also write the table (.md: markdown, else text)")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args) -> int:
    from loraedit.files import atomic_output, write_json

    targets = [Path(t) for t in args.targets]
    many = len(targets) > 1
    for t in targets:
        if not t.exists():
            raise InputError(f"{t}: no such run folder or video")
    given = [f for f, v in (("--like", args.like), ("--source", args.source), ("--first-frame", args.first_frame),
                            ("--mask", args.mask)) if v]
    if given and all(t.is_dir() for t in targets):  # they were silently ignored
        raise InputError(f"{given[0]}: is for scoring a result video; a run folder is scored on its own prepared "
                         "source, first frame and region")
    if args.table:  # checked before the scoring, which can take minutes: one line, not a lost table at the end
        from loraedit.cli import check_out

        if Path(args.table).is_dir():
            raise InputError(f"--table {args.table}: is a folder; pass a file name, e.g. {Path(args.table) / 'scores.md'}")
        check_out(str(Path(args.table).expanduser().parent), "table's folder", flag="--table")
    clip = ClipScorer(args.clip, args.device) if args.clip else None
    if clip is None and not args.quiet:
        log.info("CLIP score and input similarity need CLIP weights: give --clip PATH (e.g. openai/clip-vit-large-patch14); skipped")
    rows = {}
    for t in targets:
        if t.is_dir() and not is_run(t):
            if many:  # `loraedit eval ROOT/*` also meets batch.json, index.html and failed jobs
                log.info("%s: not a run folder; skipped", t)
                continue
            raise InputError(f"{t}: is not a run folder (no prepare/plan.json)")
        if t.is_file() and t.suffix.lower() not in VIDEO_SUFFIXES:
            if many:
                continue
            raise InputError(f"{t}: is not a video ({', '.join(VIDEO_SUFFIXES)}) or a run folder")
        try:
            s = load_run(t, args.render) if t.is_dir() else load_video(t, Path(args.like) if args.like else None,
                                                                      args.source, args.first_frame, args.mask)
        except InputError as exc:
            if many:
                log.info("%s; skipped", exc)
                continue
            raise
        m = score(s, clip, args.deqa, args.device)
        if s.write_to is not None:
            write_json(s.write_to / "metrics.json", m)
        rows[s.name] = m
    if not rows:
        raise InputError("nothing to score: no finished run folder or video among " + " ".join(args.targets))
    print(format_table(rows))
    if args.table:
        with atomic_output(args.table) as tmp:
            tmp.write_text(format_table(rows, markdown=args.table.endswith(".md")) + "\n")
    return 0
