"""The web page of `loraedit ui` (Gradio): the whole edit, from upload to download.

1. the video → its first frame and the frames that will be edited (the CLI's frame selection);
2. the edited first frame, uploaded or painted on the first frame; optional edited later frames;
3. the edit region the CLI would use, shown by `loraedit masks` (overlay video, contact sheet),
   corrected with boxes, the mask style and looseness, or an uploaded mask;
4. model, prompts, steps, memory; Start checks every input with `loraedit prepare` (the errors are
   the CLI's one-line messages, shown next to their field) and queues `loraedit edit`;
5. progress read from the job's log (stage, step, ETA, loss curve); the page can be closed and
   opened again — jobs run in a worker process, one at a time (loraedit/jobqueue.py);
6. the result beside the source, its contact sheet, downloads of the video and the LoRA,
   re-renders with another seed or first frame (`loraedit render`), and the earlier runs.

Every step calls the CLI or the same stage functions the CLI calls; nothing here computes frames,
regions, training or renders on its own. The run folders are ordinary: `loraedit edit --out RUN`
resumes any of them from a terminal. The UI's own files live in RUN/ui/ (inputs, jobs, logs).
"""

from __future__ import annotations

import contextlib
import html
import io
import logging
import re
import shlex
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

from loraedit import cli, masks
from loraedit.errors import InputError
from loraedit.files import atomic_output, read_json, sha256_file
from loraedit.jobqueue import Job, JobQueue, progress, run_folders, run_jobs
from loraedit.video import fit_to_size, probe_video, read_image, read_video_frames, write_png

log = logging.getLogger("loraedit")

TOY_MODEL = Path(__file__).resolve().parent / "toymodel"
CLICK_WIDTH = 480  # frame 0 is shown at least this wide for drawing boxes
REGION_SOURCES = ("found from the edit", "boxes", "mask file")
CSS = """
.field-error {color: #b42318; background: #fef3f2; border: 1px solid #fda29b; border-radius: 6px;
              padding: 4px 8px; font-size: 0.9em; margin-top: 2px;}
.field-warning {color: #93370d; background: #fffaeb; border: 1px solid #fedf89; border-radius: 6px;
                padding: 4px 8px; font-size: 0.9em;}
.progress-outer {background: #eaecf0; border-radius: 6px; height: 14px; overflow: hidden;}
.progress-inner {background: #2e90fa; height: 14px;}
"""


# ---------------------------------------------------------------- calling the CLI in this process

_CLI_LOCK = threading.Lock()


@dataclass
class CliResult:
    returncode: int
    error: str | None = None  # the message of `loraedit: error: MESSAGE`
    warnings: list[str] = field(default_factory=list)
    stdout: str = ""


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def call_cli(argv: list[str]) -> CliResult:
    """Run `loraedit ARGV` here and return its error line and warnings, exactly as a terminal shows them."""
    err, out, collect = io.StringIO(), io.StringIO(), _Collect()
    logger = logging.getLogger("loraedit")
    with _CLI_LOCK:
        logger.addHandler(collect)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    rc = cli.main(argv)
                except SystemExit as exc:  # argparse rejecting a value
                    rc = exc.code if isinstance(exc.code, int) else 2
        finally:
            logger.removeHandler(collect)
    error = None
    for line in err.getvalue().splitlines():
        m = re.match(r"loraedit(?: \w+)?: error: (.*)", line)
        if m:
            error = m.group(1)
    return CliResult(rc, error if rc else None, collect.messages, out.getvalue())


def flags_of(command: str) -> set[str]:
    """The option strings `loraedit COMMAND` accepts (so the page offers only what the CLI has)."""
    parser = cli.build_parser()
    for action in parser._actions:
        if action.dest == "command":
            sub = action.choices.get(command)
            return set() if sub is None else {s for a in sub._actions for s in a.option_strings}
    return set()


def choices_of(command: str, dest: str) -> list[str] | None:
    parser = cli.build_parser()
    for action in parser._actions:
        if action.dest == "command" and command in action.choices:
            for a in action.choices[command]._actions:
                if a.dest == dest and a.choices:
                    return list(a.choices)
    return None


def has_command(command: str) -> bool:
    parser = cli.build_parser()
    return any(action.dest == "command" and command in action.choices for action in parser._actions)


# ---------------------------------------------------------------- errors next to their field


def error_html(message: str | None, cls: str = "field-error"):
    if not message:
        return gr.update(value="", visible=False)
    return gr.update(value=f"<div class='{cls}'>{html.escape(message)}</div>", visible=True)


def warnings_html(messages: list[str]):
    if not messages:
        return gr.update(value="", visible=False)
    body = "<br>".join(html.escape(m) for m in dict.fromkeys(messages))
    return gr.update(value=f"<div class='field-warning'>{body}</div>", visible=True)


def which_field(message: str, paths: dict[str, str | None], flags: list[tuple[str, str]]) -> str:
    """The field an error message is about: the file it starts with, else the first flag it names
    (flags: (flag, field) pairs), else "start" (the message goes next to the Start button)."""
    for name, path in paths.items():
        if path and (message.startswith(str(path)) or message.startswith(Path(path).name + ":")):
            return name
    first = None
    for flag, name in flags:
        for m in re.finditer(re.escape(flag) + r"(?![\w-])", message):
            if first is None or m.start() < first[0]:
                first = (m.start(), name)
            break
    return first[1] if first else "start"


def short_paths(message: str, folders: list[Path]) -> str:
    """Messages name copied inputs by the name the person gave them, not by their place in the run folder."""
    for folder in folders:
        message = message.replace(f"{folder}/", "")
    return message


# ---------------------------------------------------------------- step 1: the video


@dataclass
class Selection:
    """The frames the CLI would edit, for the settings on the page."""
    width: int
    height: int
    indices: list[int]
    fps: float
    rule: str
    n_source: int
    source_size: tuple[int, int]
    cuts: list[dict]


SELECTION_FLAGS = {"frames": "--frames", "start": "--start", "fps": "--fps", "stride": "--stride", "size": "--size"}


def selection_values(frames, start, fps, stride, spread, size) -> dict:
    """The page's frame-selection fields as the raw values a command line would give (empty = default)."""
    raw = {"frames": frames, "start": start, "fps": fps, "stride": stride, "size": size}
    out = {k: (str(int(v)) if isinstance(v, float) and v.is_integer() and k != "fps" else str(v)).strip()
           for k, v in raw.items() if v not in (None, "") and str(v).strip() and not (k in ("fps", "stride") and not v)}
    if spread:
        out["spread"] = True
    return out


def select_frames(video: str, model: str | None, values: dict) -> Selection:
    """The prepare stage's own frame selection (settings read and checked as the CLI reads flags)."""
    from loraedit import prepare, shots
    from loraedit.settings import PrepareSettings

    settings = PrepareSettings.from_values(values)
    info = probe_video(video)
    model = model if model and Path(model).is_dir() else None
    choice, (width, height) = prepare.select(info, prepare.footage_from(settings), prepare.model_frame_rate(model),
                                             prepare.model_pixel_budget(model), model)
    cuts = shots.report(video, choice.indices, info)["cuts"]
    return Selection(width, height, choice.indices, choice.fps, choice.rule, info.n_frames, (info.width, info.height), cuts)


def thumbnails(video: str, sel: Selection, width: int = 200) -> tuple[list, np.ndarray, np.ndarray]:
    """(gallery items, source-size first frame, working-size first frame)."""
    raw = read_video_frames(video, sel.indices)
    fitted = [fit_to_size(f, sel.width, sel.height) for f in raw]
    h = max(16, round(sel.height * width / sel.width))
    items = [(fit_to_size(f, width, h), f"{i} (src {j})") for i, (f, j) in enumerate(zip(fitted, sel.indices))]
    return items, raw[0], fitted[0]


# ---------------------------------------------------------------- step 2: the edited first frame


def painted(editor) -> bool:
    """Did the person draw on the image editor (any visible stroke in a layer)?"""
    if not isinstance(editor, dict):
        return False
    for layer in editor.get("layers") or []:
        arr = np.asarray(layer)
        if arr.ndim == 3 and arr.shape[2] == 4 and arr[..., 3].any():
            return True
    return False


def edited_first_frame(upload: str | None, editor, folder: Path) -> str:
    """The edited first frame as a file: the painted composite, else the uploaded image."""
    if painted(editor):
        composite = np.asarray(editor["composite"])[..., :3].astype(np.uint8)
        path = folder / "first_frame_painted.png"
        write_png(path, composite)
        return str(path)
    if upload:
        return upload
    raise InputError("edited first frame: upload the edited frame 0, or paint the edit on the first frame")


def copy_input(path: str | None, folder: Path) -> str | None:
    """A person's file copied into the run (kept under its own name), so the run folder stands alone."""
    if not path:
        return None
    src = Path(path)
    dst = folder / src.name
    if dst.exists() and dst.is_file() and src.is_file() and sha256_file(dst) == sha256_file(src):
        return str(dst)
    if dst.exists():
        dst = folder / f"{src.stem}-{int(time.time() * 1000)}{src.suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        with atomic_output(dst) as tmp:
            shutil.copyfile(src, tmp)
    return str(dst)


# ---------------------------------------------------------------- the argv the page builds


@dataclass
class PageInputs:
    """Everything on the page that a command line is built from."""
    video: str | None = None
    first_frame: str | None = None
    refs: list[tuple[int, str]] = field(default_factory=list)
    selection: dict = field(default_factory=dict)  # frames, start, fps, stride, spread, size as a command line gives them
    region_source: str = REGION_SOURCES[0]
    boxes: str = ""
    mask: str | None = None
    mask_style: str = "bbox"
    grow: float = 0.10
    dilate: int = 16
    block_size: int = 7
    model: str = ""
    prompt: str = ""
    edit_prompt: str = ""
    negative_prompt: str | None = None
    steps: int = 100
    ref_steps: int = 100
    render_steps: int = 30
    seed: int = 0
    memory: str = "auto"
    device: str = "auto"
    lr: float = 1e-4
    rank: int = 16
    guidance: float = 5.0
    extra: str = ""


def parse_boxes(text: str) -> list[str]:
    """'x0,y0,x1,y1; x0,y0,x1,y1' → ['x0,y0,x1,y1', ...], each read by the CLI's own --box reader."""
    from loraedit.settings import PrepareSettings

    parts = [part.strip() for part in re.split(r"[;\n]+", text or "") if part.strip()]
    for part in parts:
        PrepareSettings.from_values({"box": [part]})  # InputError: the CLI's message for this box
    return parts


def selection_argv(p: PageInputs) -> list[str]:
    argv = []
    for key, value in p.selection.items():
        argv += ["--spread"] if key == "spread" else [SELECTION_FLAGS[key], str(value)]
    return argv


def region_argv(p: PageInputs) -> list[str]:
    argv = ["--mask-style", p.mask_style, "--grow", f"{float(p.grow):g}", "--dilate", str(int(p.dilate)),
            "--block-size", str(int(p.block_size))]
    if p.region_source == "boxes":
        boxes = parse_boxes(p.boxes)
        if not boxes:
            raise InputError("--box: draw a box on frame 0 (click two corners) or type x0,y0,x1,y1")
        for b in boxes:
            argv += ["--box", b]
    elif p.region_source == "mask file":
        if not p.mask:
            raise InputError("--mask: upload a mask (PNG, PNG folder as zip is not read; a mask video or one PNG)")
        argv += ["--mask", p.mask]
    return argv


def edit_argv(p: PageInputs, run_dir: Path, accepted: set[str]) -> list[str]:
    argv = ["edit", "--out", str(run_dir), "--model", p.model.strip(), "--video", p.video, "--first-frame", p.first_frame,
            "--prompt", p.prompt or ""]
    argv += selection_argv(p) + region_argv(p)
    for k, path in p.refs:
        argv += ["--ref", f"{int(k)}={path}"]
    if p.edit_prompt and p.edit_prompt.strip():
        argv += ["--edit-prompt", p.edit_prompt.strip()]
    if p.negative_prompt:
        argv += ["--negative-prompt", p.negative_prompt]
    argv += ["--steps", str(int(p.steps)), "--ref-steps", str(int(p.ref_steps)), "--render-steps", str(int(p.render_steps)),
             "--seed", str(int(p.seed)), "--memory", p.memory, "--device", p.device or "auto", "--lr", f"{float(p.lr):g}",
             "--rank", str(int(p.rank)), "--guidance", f"{float(p.guidance):g}"]
    if p.extra and p.extra.strip():
        try:
            argv += shlex.split(p.extra)
        except ValueError as exc:
            raise InputError(f"more flags: {exc}; quote values with spaces") from None
    unknown = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and a.split("=")[0] not in accepted]
    if unknown:
        raise InputError(f"{unknown[0]}: `loraedit edit` has no such flag; see `loraedit edit --help`")
    return argv


def only_flags(argv: list[str], accepted: set[str]) -> list[str]:
    """The flags (with their values) of `argv` that a command accepts: `edit`'s line cut down for `prepare`."""
    out, keep = [], False
    for item in argv:
        if item.startswith("--"):
            keep = item.split("=")[0] in accepted
        if keep:
            out.append(item)
    return out


def check_settings(argv: list[str]) -> str | None:
    """Every setting of the command line read and checked the way the CLI does, before anything runs."""
    try:
        cli.resolve(argv)
    except InputError as exc:
        return str(exc)
    return None


def run_name(video: str | None, wanted: str) -> str:
    name = (wanted or "").strip()
    if name:
        if not re.fullmatch(r"[\w.+-]+", name) or name.startswith("."):
            raise InputError(f"run name {name!r}: use letters, digits, '.', '_', '-' and '+' only")
        return name
    stem = re.sub(r"[^\w.+-]+", "-", Path(video).stem if video else "run").strip("-") or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------- runs and their results


def renders(run_dir: Path) -> list[Path]:
    """Completed renders of a run (settings.json is written last), oldest first."""
    done = [p.parent for p in Path(run_dir).glob("render*/settings.json")]
    return sorted(done, key=lambda p: (p.stat().st_mtime, p.name))


def lora_files(run_dir: Path) -> list[str]:
    """The trained LoRA's files to download: lora/ of one transformer, lora/high_noise and
    lora/low_noise of a two-expert model (Wan2.2-A14B)."""
    lora = Path(run_dir) / "lora"
    return [str(p) for p in sorted(lora.glob("*.safetensors")) + sorted(lora.glob("*/*.safetensors"))]


def run_table(root: Path) -> list[list]:
    rows = []
    for run in run_folders(root):
        jobs = run_jobs(run)
        last = jobs[-1] if jobs else None
        state = progress(last)["message"] if last else ("trained" if (run / "lora").is_dir() else "prepared")
        done = renders(run)
        rows.append([run.name, last.kind if last else "", state, len(done),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(run.stat().st_mtime))])
    return rows


def progress_html(p: dict, job: Job | None) -> str:
    if job is None:
        return "<p>No job in this run yet.</p>"
    frac = 1.0 if job.state == "done" else (p["step"] / p["total"] if p.get("total") else 0.0)
    colour = {"failed": "#d92d20", "stopped": "#98a2b3", "interrupted": "#98a2b3", "done": "#12b76a"}.get(job.state, "#2e90fa")
    return (f"<div><b>{html.escape(Path(job.run_dir).name)}</b> · job {job.id} ({html.escape(job.kind)}) · "
            f"<span class='job-state'>{html.escape(job.state)}</span></div>"
            f"<div class='progress-outer'><div class='progress-inner' style='width:{100 * frac:.1f}%;background:{colour}'></div></div>"
            f"<div class='job-message'>{html.escape(p['message'])}</div>")


def loss_frame(p: dict):
    import pandas as pd

    return pd.DataFrame(p["losses"] or [], columns=["step", "loss"]) if p["losses"] else pd.DataFrame({"step": [], "loss": []})


def log_tail(job: Job | None, lines: int = 30) -> str:
    if job is None or not job.log_file.is_file():
        return ""
    from loraedit.jobqueue import log_lines

    text = log_lines(job.log_file.read_text(errors="replace"))
    # keep the last redraw of each progress bar, not all of them
    kept: list[str] = []
    for line in text:
        if kept and re.match(r"^\w+: +\d+%\|", line) and re.match(r"^\w+: +\d+%\|", kept[-1]) and line.split(":")[0] == kept[-1].split(":")[0]:
            kept[-1] = line
        else:
            kept.append(line)
    return "\n".join(kept[-lines:])


# ---------------------------------------------------------------- the page


def build(root: Path, queue: JobQueue, model: str | None = None) -> gr.Blocks:
    root = Path(root).resolve()
    preview_root = root / ".preview"
    edit_flags = flags_of("edit")
    memory_choices = choices_of("edit", "memory") or ["auto", "fp32", "bf16", "fp8"]
    has_plan = has_command("plan")

    with gr.Blocks(title="loraedit", analytics_enabled=False) as page:
        selected = gr.State(None)  # run folder shown in steps 5-6
        corner = gr.State(None)  # first corner of a box being drawn
        frame0_scale = gr.State(1)  # frame 0 is shown this many times its working size
        refs_state = gr.State([])
        video_state = gr.State(None)
        n_frames = gr.State(None)  # how many frames the selection gives (for the references)

        gr.Markdown("# loraedit\nEdit a whole video from an edited first frame. Work top to bottom; "
                    "every run is an ordinary run folder in " f"`{root}` that `loraedit edit --out` can resume.")

        # 1 ------------------------------------------------------------ video
        gr.Markdown("## 1 · The video")
        with gr.Row():
            with gr.Column(scale=2):
                video = gr.Video(label="source video", sources=["upload"], elem_id="video", height=260)
                video_err = gr.HTML(visible=False, elem_id="video-error")
            with gr.Column(scale=3):
                with gr.Row():
                    frames = gr.Textbox("49", label="frames (4k+1, or auto)", elem_id="frames", min_width=90)
                    start = gr.Textbox("0", label="start: frame (12) or time (2.5s)", elem_id="start", min_width=90)
                    size = gr.Textbox("", label="size WxH (empty: by the clip's aspect)", elem_id="size", min_width=90)
                with gr.Row():
                    fps = gr.Textbox("", label="frame rate (empty: the model's)", elem_id="fps", min_width=90)
                    stride = gr.Textbox("", label="or every N-th frame", elem_id="stride", min_width=90)
                    spread = gr.Checkbox(False, label="or spread over the clip", elem_id="spread", min_width=90)
                frames_err = gr.HTML(visible=False, elem_id="frames-error")
                video_info = gr.Markdown("", elem_id="video-info")
                video_warn = gr.HTML(visible=False, elem_id="video-warning")
        gallery = gr.Gallery(label="the frames that will be edited (index, source frame)", columns=9, height=230,
                             elem_id="frames-gallery", allow_preview=True)

        # 2 ------------------------------------------------------------ edited first frame
        gr.Markdown("## 2 · The edited first frame")
        with gr.Row():
            with gr.Column():
                first_upload = gr.Image(label="upload the edited frame 0 (same aspect as the video)", type="filepath",
                                        sources=["upload", "clipboard"], elem_id="first-upload", height=300)
                first_err = gr.HTML(visible=False, elem_id="first-error")
            with gr.Column():
                first_paint = gr.ImageEditor(label="… or paint the edit on the first frame", type="numpy", format="png",
                                             sources=["upload", "clipboard"], elem_id="first-paint", height=300,
                                             brush=gr.Brush(colors=["#e03131", "#1971c2", "#2f9e44", "#f08c00", "#ffffff", "#000000"], color_mode="defaults"))
        with gr.Accordion("optional: edited later frames as references (stage 2)", open=False):
            with gr.Row():
                ref_frame = gr.Number(None, label="frame index (1 … frames-1, from the gallery)", precision=0, elem_id="ref-frame")
                ref_image = gr.Image(label="the edited frame", type="filepath", sources=["upload"], height=160, elem_id="ref-image")
                with gr.Column():
                    ref_add = gr.Button("add reference")
                    ref_clear = gr.Button("clear references")
            refs_view = gr.Markdown("no references")
            ref_err = gr.HTML(visible=False, elem_id="ref-error")

        # 3 ------------------------------------------------------------ region
        gr.Markdown("## 3 · The edit region (what training may change)")
        with gr.Row():
            with gr.Column(scale=2):
                region_source = gr.Radio(list(REGION_SOURCES), value=REGION_SOURCES[0], label="region from", elem_id="region-source")
                frame0 = gr.Image(label="frame 0 at the working size: click two corners to add a box", interactive=False,
                                  elem_id="frame0", height=240)
                corner_info = gr.Markdown("", elem_id="corner-info")
                boxes = gr.Textbox("", label="boxes x0,y0,x1,y1; … (pixels of the working size)", elem_id="boxes")
                boxes_err = gr.HTML(visible=False, elem_id="boxes-error")
                mask_file = gr.File(label="mask: one PNG, or a mask video (white = edit)", file_types=["image", "video"],
                                    elem_id="mask-file", height=90)
                mask_err = gr.HTML(visible=False, elem_id="mask-error")
                with gr.Row():
                    mask_style = gr.Dropdown(list(masks.MASK_STYLES), value="bbox", label="mask style", elem_id="mask-style")
                    grow = gr.Slider(0, 1, 0.10, step=0.01, label="looseness: grow boxes by (bbox, static)", elem_id="grow")
                with gr.Row():
                    dilate = gr.Slider(0, 64, 16, step=1, label="dilate: pixels", elem_id="dilate")
                    block = gr.Slider(1, 32, 7, step=1, label="blocks: block size", elem_id="block-size")
                preview_btn = gr.Button("show the edit region", variant="secondary", elem_id="preview-button")
                region_err = gr.HTML(visible=False, elem_id="region-error")
            with gr.Column(scale=3):
                overlay = gr.Video(label="region over the frames (overlay.mp4)", interactive=False, elem_id="overlay", height=260)
                sheet = gr.Image(label="contact sheet", interactive=False, elem_id="region-sheet", height=300)
                region_info = gr.Markdown("", elem_id="region-info")
                region_warn = gr.HTML(visible=False, elem_id="region-warning")

        # 4 ------------------------------------------------------------ model, settings, start
        gr.Markdown("## 4 · Model and training")
        with gr.Row():
            with gr.Column(scale=3):
                model_box = gr.Textbox(model or "", label="model folder (Wan I2V, diffusers layout)", elem_id="model")
                model_err = gr.HTML(visible=False, elem_id="model-error")
            toy_btn = gr.Button("use the bundled toy model (CPU demo)", scale=1, elem_id="toy-model")
        prompt = gr.Textbox("", label="prompt: what the edited video shows", elem_id="prompt")
        edit_prompt = gr.Textbox("", label="edit prompt (optional): the edited video's caption, when the prompt describes the source",
                                 elem_id="edit-prompt", visible="--edit-prompt" in edit_flags)
        with gr.Row():
            steps = gr.Number(100, label="training steps (stage 1)", precision=0, elem_id="steps")
            ref_steps = gr.Number(100, label="reference steps (stage 2)", precision=0, elem_id="ref-steps")
            render_steps = gr.Number(30, label="render steps", precision=0, elem_id="render-steps")
            seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
            memory = gr.Dropdown(memory_choices, value="auto", allow_custom_value=True, label="memory mode", elem_id="memory")
            device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", allow_custom_value=True, label="device", elem_id="device")
        steps_err = gr.HTML(visible=False, elem_id="steps-error")
        with gr.Accordion("more settings", open=False):
            with gr.Row():
                lr = gr.Number(1e-4, label="learning rate", elem_id="lr")
                rank = gr.Number(16, label="LoRA rank", precision=0, elem_id="rank")
                guidance = gr.Number(5.0, label="guidance (1 = off)", elem_id="guidance")
            negative = gr.Textbox("", label="negative prompt (empty: Wan's)", elem_id="negative")
            extra = gr.Textbox("", label="more `loraedit edit` flags, e.g. --composite --shift 3", elem_id="extra")
        with gr.Row(visible=has_plan):
            gpu_memory = gr.Textbox("", label="GPU memory in GiB to plan for (empty: this machine's GPU)", elem_id="gpu-memory", scale=2)
            plan_btn = gr.Button("predict memory and step time (loraedit plan)", elem_id="plan-button", scale=1)
        memory_info = gr.Markdown("", elem_id="memory-info")
        with gr.Row():
            name = gr.Textbox("", label="run name (empty: VIDEO-DATE-TIME)", elem_id="run-name", scale=2)
            start_btn = gr.Button("start the edit", variant="primary", elem_id="start-button", scale=1)
        start_err = gr.HTML(visible=False, elem_id="start-error")
        start_warn = gr.HTML(visible=False, elem_id="start-warning")

        # 5 ------------------------------------------------------------ progress
        gr.Markdown("## 5 · Progress")
        status = gr.HTML("<p>No run selected.</p>", elem_id="status")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", title="training loss", height=220, elem_id="loss-plot")
            with gr.Column():
                stop_btn = gr.Button("stop (resumable)", elem_id="stop-button")
                again_btn = gr.Button("queue again / resume", elem_id="resume-button")
                queue_info = gr.Markdown("", elem_id="queue-info")
        with gr.Accordion("log", open=False):
            log_box = gr.Code("", language=None, elem_id="log", max_lines=30)

        # 6 ------------------------------------------------------------ result
        gr.Markdown("## 6 · Result")
        with gr.Row():
            render_pick = gr.Dropdown([], label="render", elem_id="render-pick", scale=1)
            downloads = gr.File(label="downloads: video and LoRA", file_count="multiple", interactive=False, elem_id="downloads", scale=3)
        with gr.Row():
            result_video = gr.Video(label="source | edited", interactive=False, elem_id="result-video", height=300)
            result_sheet = gr.Image(label="contact sheet (source above, edited below)", interactive=False, elem_id="result-sheet", height=300)
        with gr.Accordion("render again without retraining", open=False, elem_id="rerender"):
            with gr.Row():
                rr_seed = gr.Number(1, label="seed", precision=0, elem_id="rerender-seed")
                rr_steps = gr.Textbox("", label="render steps (empty: as before)", elem_id="rerender-steps")
                rr_guidance = gr.Textbox("", label="guidance (empty: as before)", elem_id="rerender-guidance")
                rr_first = gr.Image(label="another edited first frame (optional)", type="filepath", sources=["upload"], height=140, elem_id="rerender-first")
            rr_btn = gr.Button("render again", elem_id="rerender-button")
            rr_err = gr.HTML(visible=False, elem_id="rerender-error")

        # 7 ------------------------------------------------------------ runs
        gr.Markdown("## 7 · Runs")
        with gr.Row():
            runs_pick = gr.Dropdown([], label="open a run", elem_id="runs-pick", scale=2)
            runs_refresh = gr.Button("refresh", scale=1, elem_id="runs-refresh")
        runs_view = gr.Dataframe(headers=["run", "last job", "state", "renders", "changed"], interactive=False, elem_id="runs")

        timer = gr.Timer(1.0)

        # ------------------------------------------------------------ handlers

        sel_fields = [frames, start, fps, stride, spread, size]

        def page_inputs(video_path, first_path, refs, sel, source_v, boxes_v, mask_v, style_v, grow_v, dilate_v, block_v,
                        **kw) -> PageInputs:
            return PageInputs(video=video_path, first_frame=first_path, refs=list(refs or []), selection=selection_values(*sel),
                              region_source=source_v, boxes=boxes_v or "", mask=mask_v, mask_style=style_v, grow=grow_v,
                              dilate=int(dilate_v), block_size=int(block_v), **kw)

        def on_video(video_path, model_v, *sel):
            if not video_path:
                return (None, error_html(None), error_html(None), "", warnings_html([]), [], gr.update(), None, 1, None)
            warnings = _Collect()
            log.addHandler(warnings)
            try:
                try:
                    probe_video(video_path)
                except InputError as exc:
                    return (None, error_html(short_paths(str(exc), [Path(video_path).parent])), error_html(None), "",
                            warnings_html([]), [], gr.update(value=None), None, 1, None)
                try:
                    chosen = select_frames(video_path, model_v, selection_values(*sel))
                    items, first_raw, first_fit = thumbnails(video_path, chosen)
                except InputError as exc:
                    return (video_path, error_html(None), error_html(short_paths(str(exc), [Path(video_path).parent])), "",
                            warnings_html([]), [], gr.update(), None, 1, None)
            finally:
                log.removeHandler(warnings)
            sw, sh = chosen.source_size
            span = f"source frames {chosen.indices[0]}…{chosen.indices[-1]}"
            info = (f"**{Path(video_path).name}**: {sw}×{sh}, {chosen.n_source} frames · editing **{len(chosen.indices)} frames at "
                    f"{chosen.width}×{chosen.height}**, {span}, {chosen.fps:.3g} fps ({chosen.rule})")
            messages = list(warnings.messages)
            if chosen.cuts:
                messages.append(f"{Path(video_path).name}: the selected frames span {len(chosen.cuts) + 1} shots (scene cuts at "
                                + ", ".join(f"{c['time']:.2f} s (frame {c['selected']})" for c in chosen.cuts)
                                + "); a region cannot be followed across a cut — choose start/frames inside one shot")
            editor = {"background": first_raw, "layers": [], "composite": first_raw}
            # small working sizes are shown enlarged (the browser never enlarges an image) so a box can be drawn
            scale = max(1, -(-CLICK_WIDTH // chosen.width))
            shown = np.repeat(np.repeat(first_fit, scale, 0), scale, 1)
            return (video_path, error_html(None), error_html(None), info, warnings_html(messages), items,
                    gr.update(value=editor), shown, scale, len(chosen.indices))

        video_outputs = [video_state, video_err, frames_err, video_info, video_warn, gallery, first_paint, frame0, frame0_scale,
                         n_frames]
        video_inputs = [video, model_box] + sel_fields
        video.change(on_video, video_inputs, video_outputs)
        for comp in (frames, start, fps, stride, size):
            comp.submit(on_video, video_inputs, video_outputs, trigger_mode="always_last")
            comp.blur(on_video, video_inputs, video_outputs, trigger_mode="always_last")
        spread.input(on_video, video_inputs, video_outputs, trigger_mode="always_last")

        def on_first_upload(path):
            if not path:
                return error_html(None), gr.update()
            try:
                read_image(path)
            except InputError as exc:
                return error_html(short_paths(str(exc), [Path(path).parent])), gr.update()
            img = read_image(path)
            return error_html(None), gr.update(value={"background": img, "layers": [], "composite": img})

        first_upload.upload(on_first_upload, [first_upload], [first_err, first_paint])

        def on_ref_add(refs, k, path, count):
            if not path:
                return refs, refs_text(refs), error_html("--ref: upload the edited frame first")
            if k is None or (count and not 1 <= int(k) < count):
                return refs, refs_text(refs), error_html(
                    f"--ref {k}={Path(path).name}: frame {k} is outside the clip's frames 1..{(count or 0) - 1} (frame 0 is --first-frame)")
            try:
                read_image(path)
            except InputError as exc:
                return refs, refs_text(refs), error_html(short_paths(str(exc), [Path(path).parent]))
            refs = [r for r in refs if r[0] != int(k)] + [(int(k), path)]
            return sorted(refs), refs_text(sorted(refs)), error_html(None)

        def refs_text(refs):
            return "no references" if not refs else "references: " + ", ".join(f"frame {k} ← {Path(p).name}" for k, p in refs)

        ref_add.click(on_ref_add, [refs_state, ref_frame, ref_image, n_frames], [refs_state, refs_view, ref_err])
        ref_clear.click(lambda: ([], "no references", error_html(None)), None, [refs_state, refs_view, ref_err])

        def on_frame0_click(boxes_v, corner_v, scale, evt: gr.SelectData):
            x, y = (int(v) // int(scale or 1) for v in evt.index)
            if corner_v is None:
                return boxes_v, (x, y), gr.update(value=REGION_SOURCES[1]), f"first corner at {x},{y}: click the opposite corner"
            x0, y0 = corner_v
            box = f"{min(x0, x)},{min(y0, y)},{max(x0, x)},{max(y0, y)}"
            boxes_v = f"{boxes_v}; {box}" if boxes_v and boxes_v.strip() else box
            return boxes_v, None, gr.update(value=REGION_SOURCES[1]), f"box {box} added; press “show the edit region”"

        # one click after the other: the second corner must see the first
        frame0.select(on_frame0_click, [boxes, corner, frame0_scale], [boxes, corner, region_source, corner_info], concurrency_limit=1,
                      show_progress="hidden")

        def on_preview(video_path, upload, editor, refs, frames_v, start_v, fps_v, stride_v, spread_v, size_v, source_v, boxes_v,
                       mask_v, style_v, grow_v, dilate_v, block_v, extra_v, request: gr.Request):
            outs = dict(region=None, boxes=None, mask=None, first=None)
            none = (gr.update(), gr.update(), "", warnings_html([]))
            if not video_path:
                outs["region"] = "upload the video first (step 1)"
                return (*none, *errors(outs))
            folder = preview_root / (request.session_hash if request is not None and request.session_hash else "default")
            folder.mkdir(parents=True, exist_ok=True)
            p = page_inputs(video_path, None, refs, (frames_v, start_v, fps_v, stride_v, spread_v, size_v), source_v, boxes_v,
                            mask_v, style_v, grow_v, dilate_v, block_v)
            try:
                if source_v == REGION_SOURCES[0]:
                    p.first_frame = edited_first_frame(upload, editor, folder)
            except InputError as exc:
                outs["first"] = str(exc)
                return (*none, *errors(outs))
            try:
                argv = ["masks", "--video", video_path, "--out", str(folder / "masks"), "-q"] + selection_argv(p) + region_argv(p)
                # region flags among "more flags" (e.g. --segmenter sam2) shape the preview as they shape the edit
                argv += only_flags(shlex.split(extra_v or ""), flags_of("masks") - {"--out", "--video", "--first-frame"})
            except ValueError as exc:
                outs["region"] = f"more flags: {exc}; quote values with spaces"
                return (*none, *errors(outs))
            except InputError as exc:
                outs["boxes" if source_v == "boxes" else "mask"] = str(exc)
                return (*none, *errors(outs))
            if p.first_frame:
                argv += ["--first-frame", p.first_frame]
            result = call_cli(argv)
            if result.error:
                where = which_field(result.error, {"mask": mask_v, "first": p.first_frame, "region": video_path},
                                    [("--box", "boxes"), ("--mask", "mask")])
                outs[where if where in outs else "region"] = short_paths(result.error, [folder, Path(video_path).parent])
                return (*none, *errors(outs))
            info = read_json(folder / "masks" / masks.MASKS_MANIFEST)
            per = info["region_fraction_per_frame"]
            text = (f"region: **{100 * info['region_fraction']:.1f}%** of the frames on average "
                    f"(frame 0: {100 * per[0]:.1f}%, smallest {100 * min(per):.1f}%, largest {100 * max(per):.1f}%), "
                    f"from {info['source']}, style {info['mask_style']}")
            return (str(folder / "masks" / "overlay.mp4"), str(folder / "masks" / "contact_sheet.png"), text,
                    warnings_html(result.warnings), *errors(outs))

        def errors(outs):
            return (error_html(outs["region"]), error_html(outs["boxes"]), error_html(outs["mask"]), error_html(outs["first"]))

        preview_inputs = [video_state, first_upload, first_paint, refs_state, *sel_fields, region_source, boxes, mask_file,
                          mask_style, grow, dilate, block, extra]
        preview_outputs = [overlay, sheet, region_info, region_warn, region_err, boxes_err, mask_err, first_err]
        preview_btn.click(on_preview, preview_inputs, preview_outputs, trigger_mode="always_last")
        for comp in (region_source, mask_style):
            comp.input(on_preview, preview_inputs, preview_outputs, trigger_mode="always_last")
        for comp in (grow, dilate, block):
            comp.release(on_preview, preview_inputs, preview_outputs, trigger_mode="always_last")
        boxes.submit(on_preview, preview_inputs, preview_outputs, trigger_mode="always_last")
        mask_file.upload(on_preview, preview_inputs, preview_outputs, trigger_mode="always_last")

        def on_model(path):
            from loraedit.models import check_model  # the CLI's own check: the folder's layout, no weights read

            if not path or not path.strip():
                return error_html(None)
            try:
                check_model(path.strip())
            except InputError as exc:
                return error_html(str(exc))
            return error_html(None)

        # the model decides the frame rate and size of the selection too
        model_box.blur(on_model, [model_box], [model_err]).then(on_video, video_inputs, video_outputs)
        model_box.submit(on_model, [model_box], [model_err]).then(on_video, video_inputs, video_outputs)
        def on_toy(frames_v):
            from loraedit.demo import DEMO  # the toy model's own settings (docs/toy.md)

            # its own 17 frames in place of the generic default (as `edit` takes without --frames); a count the
            # person typed stays
            frames_v = str(DEMO["frames"]) if str(frames_v).strip() in ("", "49") else frames_v
            return str(TOY_MODEL), error_html(None), DEMO["guidance"], DEMO["render_steps"], DEMO["lr"], frames_v

        toy_btn.click(on_toy, [frames], [model_box, model_err, guidance, render_steps, lr, frames]).then(
            on_video, video_inputs, video_outputs)

        def on_plan(model_v, frames_v, size_v, rank_v, gpu_v):
            """`loraedit plan` (the memory model) for the page's model, frames and size, shown as it prints."""
            if not model_v or not model_v.strip():
                return "⚠ --model: choose the model folder first (its config files are enough)"
            accepted = flags_of("plan")
            argv = ["plan", "--model", model_v.strip()]
            for flag, value in (("--frames", frames_v), ("--size", size_v), ("--rank", rank_v), ("--gpu-memory", gpu_v)):
                value = str(int(value) if isinstance(value, float) and value.is_integer() else value or "").strip()
                if flag in accepted and value and value != "auto":
                    argv += [flag, value]
            result = call_cli(argv)
            if result.error:
                return f"⚠ {result.error}"
            return f"```\n{result.stdout.strip()}\n```"

        plan_btn.click(on_plan, [model_box, frames, size, rank, gpu_memory], [memory_info])

        # the fields a Start error can be next to: by the file it names, else the flag it names
        start_fields = ["video", "frames", "first", "ref", "boxes", "mask", "model", "steps", "start"]

        def on_start(video_path, upload, editor, refs, frames_v, start_v, fps_v, stride_v, spread_v, size_v, source_v, boxes_v, mask_v,
                     style_v, grow_v, dilate_v, block_v, extra_v, model_v, prompt_v, negative_v, steps_v, ref_steps_v,
                     render_steps_v, seed_v, memory_v, device_v, lr_v, rank_v, guidance_v, name_v, edit_prompt_v, current):
            errs = dict.fromkeys(start_fields)

            def fail(field_name, message):
                errs[field_name] = message
                return (current, *[error_html(errs[f]) for f in start_fields], warnings_html([]))

            if not video_path:
                return fail("video", "--video: upload the source video (step 1)")
            if not model_v or not model_v.strip():
                return fail("model", "--model is required: a Wan I2V folder in diffusers layout")
            for label, value, low in (("--steps", steps_v, 0), ("--ref-steps", ref_steps_v, 0), ("--render-steps", render_steps_v, 1)):
                if value is None:
                    return fail("steps", f"{label}: give a number")
            try:
                name_str = run_name(video_path, name_v)
            except InputError as exc:
                return fail("start", str(exc))
            run_dir = root / name_str
            inputs = run_dir / "ui" / "inputs"
            try:
                first_path = edited_first_frame(upload, editor, inputs)
            except InputError as exc:
                return fail("first", str(exc))
            p = page_inputs(copy_input(video_path, inputs), copy_input(first_path, inputs),
                            [(k, copy_input(path, inputs)) for k, path in refs or []],
                            (frames_v, start_v, fps_v, stride_v, spread_v, size_v), source_v, boxes_v, copy_input(mask_v, inputs) if source_v == "mask file" else mask_v, style_v,
                            grow_v, dilate_v, block_v, model=model_v, prompt=prompt_v, edit_prompt=edit_prompt_v or "",
                            negative_prompt=negative_v or None,
                            steps=steps_v, ref_steps=ref_steps_v, render_steps=render_steps_v, seed=seed_v or 0,
                            memory=memory_v, device=device_v, lr=lr_v if lr_v is not None else 1e-4,
                            rank=rank_v if rank_v is not None else 16, guidance=guidance_v if guidance_v is not None else 5.0,
                            extra=extra_v)
            try:
                argv = edit_argv(p, run_dir, edit_flags)
            except InputError as exc:
                where = "boxes" if str(exc).startswith("--box") else "mask" if str(exc).startswith("--mask") else "start"
                return fail(where, str(exc))
            # every setting read as the CLI reads it, then every input checked by the CLI's own prepare stage
            # (frames, first frame, references, region) before anything is queued; no model loads
            error = check_settings(argv)
            result = call_cli(["prepare", "--out", str(run_dir), *only_flags(argv[3:], prepare_flags)]) if error is None else None
            error = error or result.error
            if error:
                message = short_paths(error, [inputs])
                where = which_field(error, {"video": p.video, "first": p.first_frame, "mask": p.mask,
                                                   "ref": p.refs[0][1] if p.refs else None, "model": p.model},
                                    [(flag, "frames") for flag in (*SELECTION_FLAGS.values(), "--spread")]
                                    + [("--ref", "ref"), ("--box", "boxes"), ("--mask", "mask"), ("--model", "model")]
                                    + [(flag, "steps") for flag in ("--steps", "--ref-steps", "--render-steps", "--rank", "--lr",
                                                                     "--seed", "--memory", "--device", "--guidance")])
                return fail(where, message)
            queue.submit(run_dir, argv)
            return (str(run_dir), *[error_html(None) for _ in start_fields], warnings_html(result.warnings))

        prepare_flags = flags_of("prepare")

        start_outputs = [selected, video_err, frames_err, first_err, ref_err, boxes_err, mask_err, model_err, steps_err,
                         start_err, start_warn]
        start_btn.click(on_start, preview_inputs + [model_box, prompt, negative, steps, ref_steps, render_steps, seed, memory,
                                                    device, lr, rank, guidance, name, edit_prompt, selected], start_outputs,
                        concurrency_limit=1)

        # ------------------------------------------------------------ progress, results, runs

        def latest_job(run: str | None) -> Job | None:
            if not run:
                return None
            jobs = run_jobs(Path(run))
            return jobs[-1] if jobs else None

        def on_tick(run, shown):
            job = latest_job(run)
            if job is None:
                return (progress_html({}, None) if run else "<p>No run selected.</p>", gr.skip(), "", "", gr.skip(),
                        gr.skip(), gr.skip(), gr.skip(), shown)
            p = progress(job)
            pos = queue.position(job)
            qtext = f"{pos - 1} job(s) ahead in the queue" if pos >= 1 else ""
            done = [d.name for d in renders(Path(run))]
            if done != shown:
                pick = done[-1] if done else None
                res = result_for(run, pick)
                return (progress_html(p, job), loss_frame(p), qtext, log_tail(job), gr.update(choices=done, value=pick), *res, done)
            return (progress_html(p, job), loss_frame(p), qtext, log_tail(job), gr.skip(), gr.skip(), gr.skip(), gr.skip(), shown)

        def result_for(run, pick):
            if not run or not pick:
                return None, None, None
            d = Path(run) / pick
            files = [str(d / "edited.mp4")] + lora_files(Path(run))
            return str(d / "side_by_side.mp4"), str(d / "contact_sheet.png"), [f for f in files if Path(f).is_file()]

        shown_renders = gr.State(None)
        tick_outputs = [status, loss_plot, queue_info, log_box, render_pick, result_video, result_sheet, downloads, shown_renders]
        timer.tick(on_tick, [selected, shown_renders], tick_outputs, show_progress="hidden", queue=False)
        render_pick.input(lambda run, pick: result_for(run, pick), [selected, render_pick], [result_video, result_sheet, downloads])

        def on_stop(run):
            job = latest_job(run)
            if job is not None:
                queue.stop(job)

        def on_again(run):
            job = latest_job(run)
            if job is not None and job.state in ("failed", "stopped", "interrupted"):
                queue.requeue(job)

        stop_btn.click(on_stop, [selected], None)
        again_btn.click(on_again, [selected], None)

        def on_rerender(run, seed_v, steps_v, guidance_v, first_v):
            if not run:
                return error_html("no run selected: start an edit or open a run (step 7)")
            from loraedit.api import training_unfinished

            unfinished = training_unfinished(Path(run))  # also a two-expert run's lora/high_noise, lora/low_noise
            if unfinished:
                return error_html(f"{Path(run).name}: {unfinished}; wait for training to finish")
            argv = ["render", "--out", run, "--seed", str(int(seed_v or 0))]
            if steps_v and steps_v.strip():
                argv += ["--render-steps", steps_v.strip()]
            if guidance_v and guidance_v.strip():
                argv += ["--guidance", guidance_v.strip()]
            if first_v:
                try:
                    read_image(first_v)
                except InputError as exc:
                    return error_html(short_paths(str(exc), [Path(first_v).parent]))
                argv += ["--first-frame", copy_input(first_v, Path(run) / "ui" / "inputs")]
            error = check_settings(argv)  # read as the CLI reads them, before the job is queued
            if error:
                return error_html(short_paths(error, [Path(run) / "ui" / "inputs"]))
            queue.submit(run, argv)
            return error_html(None)

        rr_btn.click(on_rerender, [selected, rr_seed, rr_steps, rr_guidance, rr_first], [rr_err])

        def on_runs():
            rows = run_table(root)
            return gr.update(choices=[r[0] for r in rows]), rows

        runs_refresh.click(on_runs, None, [runs_pick, runs_view])
        runs_pick.input(lambda n: (str(root / n) if n else None, None), [runs_pick], [selected, shown_renders])

        def on_load():
            rows = run_table(root)
            # coming back: show the run of the newest job
            jobs = queue.jobs()
            latest = jobs[-1].run_dir if jobs else None
            return gr.update(choices=[r[0] for r in rows]), rows, latest

        page.load(on_load, None, [runs_pick, runs_view, selected])
    return page


def serve(host: str, port: int, runs: Path, model: str | None = None, share: bool = False, block: bool = True):
    """Start the job queue and the page; prints the address. Returns (page, queue) when block=False."""
    import signal

    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # started in the background by a shell (SIGINT ignored): take Ctrl-C / SIGINT back, for this process and,
        # since a handler is reset by exec, for the jobs it starts — "stop" interrupts a job with SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
    queue = JobQueue(runs).start()
    page = build(runs, queue, model)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.queue(default_concurrency_limit=4)
    try:
        _, url, share_url = page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                                        allowed_paths=[str(runs.resolve())], theme=theme, css=CSS, show_error=True,
                                        footer_links=[])
    except OSError as exc:
        queue.close()
        raise InputError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or 'in use'}); pass another --port") from None
    shown = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"loraedit ui: open {shown} (runs in {runs}/; Ctrl-C stops)" + (f"; public link: {share_url}" if share_url else ""), flush=True)
    if not block:
        return page, queue
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("loraedit ui: stopping; a running job is interrupted and resumes when queued again", flush=True)
    finally:
        queue.close()
        page.close()
    return 0
