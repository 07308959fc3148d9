"""The typed settings of each stage, and the command-line flags generated from them.

Each stage takes one small dataclass (PrepareSettings, TrainSettings, RenderSettings) and never
an argparse Namespace, so a Python caller (a batch runner, a web UI) builds the same objects the
command line does:

    from loraedit.settings import PrepareSettings, TrainSettings, RenderSettings
    s = TrainSettings(model="Wan2.1-I2V-14B-480P-Diffusers", steps=200, lr=5e-5)   # checked here

A field is declared once, with `setting(...)`: its default, help text, how a value is read from a
string or a TOML/JSON value (`parse`), and what makes it valid. From that one declaration come the
flag (`--ref-steps` for `ref_steps`), its `--help` line, the TOML key, and the checks, for every
command that uses the stage. Adding a setting is adding one field here (and reading it in its stage).

Validation is plain Python (no torch, no model), so a bad value fails in a fraction of a second,
before any heavy import: one line `loraedit: error: ...` naming the value and the fix (InputError).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from loraedit.errors import InputError

DEFAULT_LORA_TARGETS = r".*blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.0\.proj|ffn\.net\.2)"
MEMORY_HELP = ("auto (default: the fastest mode the memory model fits in this GPU's free memory; fp32 on the CPU), fp32, bf16, "
               "fp8 (weights stored in float8), bf16-offload / fp8-offload (block inputs in host memory), bf16-swapN / "
               "fp8-swapN (also N blocks' weights in host memory); `loraedit plan` shows what fits")
MASK_STYLES = ("bbox", "tight", "dilate", "blocks", "static")
SEGMENTERS = ("flow", "sam2")


# ---------------------------------------------------------------- value readers
# Each reader takes a string (from a flag) or a native value (from TOML/JSON or Python) and returns
# the normalised value, or raises ValueError with what is wrong and what to write instead.


def integer(value) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError("must be a whole number")


def number(value) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise ValueError("must be a number, e.g. 1e-4") from None
    else:
        raise ValueError("must be a number")
    if not math.isfinite(out):
        raise ValueError("must be a finite number")
    return out


def text(value) -> str:
    if not isinstance(value, str):
        raise ValueError("must be text (in a TOML file: in quotes)")
    return value


def boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ValueError("must be true or false")


def path(value) -> str:
    """A file or folder path, made absolute (so the run's record does not depend on the working folder)."""
    s = text(value).strip()
    if not s:
        raise ValueError("is an empty path")
    return os.path.abspath(os.path.expanduser(s))


def model_path(value) -> str:
    """A local model folder (made absolute) or, where it does not exist locally, a hub id."""
    s = text(value).strip()
    if not s:
        raise ValueError("is an empty path")
    if not Path(os.path.expanduser(s)).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not s.startswith((".", "/", "~")):
        return s
    return path(s)


def size(value) -> str:
    """'832x480' (any case, spaces allowed) → '832x480'; both sides positive multiples of 16."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text(value))
    if m is None:
        raise ValueError("write it as WIDTHxHEIGHT, e.g. 832x480")
    w, h = int(m[1]), int(m[2])
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise ValueError("width and height must be positive multiples of 16 (e.g. 832x480)")
    return f"{w}x{h}"


def regex(value) -> str:
    s = text(value)
    try:
        re.compile(s)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None
    return s


def device(value) -> str:
    s = text(value).strip().lower()
    if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", s):
        raise ValueError("is not a device; use auto, cpu, cuda or cuda:N")
    return s


def memory(value) -> str:
    """auto, or a memory mode name (loraedit.plan.parse_mode: bf16, fp8-offload, bf16-swap20 …)."""
    from loraedit.plan import parse_mode

    s = text(value).strip().lower()
    if s != "auto":
        parse_mode(s)  # ValueError names the modes there are
    return s


def choice(*options: str) -> Callable[[Any], str]:
    def read(value) -> str:
        s = text(value).strip()
        if s not in options:
            raise ValueError(f"choose one of {', '.join(options)}")
        return s

    read.choices = options
    return read


def refs(value) -> dict[int, str]:
    """Edited later frames: ['24=a.png', …] (flags), {24: 'a.png'} (TOML table), '24=a.png' → {24: abs path}."""
    if isinstance(value, dict):
        items = list(value.items())
    else:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError("write each reference as FRAME=PATH, e.g. 24=edited_024.png (in TOML: a [ref] table)")
        items = []
        if [str(v).strip().lower() for v in value] == ["none"]:
            return {}  # --ref none: no references, also where the run's job.json has some
        for item in value:
            if not isinstance(item, str):
                raise ValueError("write each reference as FRAME=PATH, e.g. 24=edited_024.png")
            k, sep, p = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: write it as FRAME=PATH, e.g. 24=edited_024.png")
            items.append((k, p))
    out: dict[int, str] = {}
    for k, p in items:
        try:
            k = integer(k)
        except ValueError:
            raise ValueError(f"{k!r}={p}: the frame must be a whole number, as in 24=edited_024.png") from None
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{k}=: the path is missing; write it as FRAME=PATH, e.g. {k}=edited_{k:03d}.png")
        if k in out:
            raise ValueError(f"frame {k} is given twice")
        out[k] = path(p)
    return dict(sorted(out.items()))


def boxes(value) -> list[tuple[int, int, int, int]]:
    """Boxes x0,y0,x1,y1 on frame 0: ['100,40,300,260', …] or [[100, 40, 300, 260], …]."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("write each box as x0,y0,x1,y1, e.g. 100,40,300,260")
    out = []
    for b in value:
        try:
            vals = [int(round(float(v))) for v in (b.replace(" ", "").split(",") if isinstance(b, str) else b)]
        except (TypeError, ValueError):
            raise ValueError(f"{b!r}: write a box as x0,y0,x1,y1 in pixels, e.g. 100,40,300,260") from None
        if len(vals) != 4:
            raise ValueError(f"{b!r}: a box has four numbers x0,y0,x1,y1")
        x0, y0, x1, y1 = vals
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{b!r}: needs x0 < x1 and y0 < y1 (left, top, right, bottom)")
        out.append((x0, y0, x1, y1))
    return out


# checks on a read value: return None when fine, else what is wrong


def at_least(low) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low}"


def above(low) -> Callable[[Any], str | None]:
    return lambda v: None if v > low else f"must be greater than {low}"


MAX_SEED = 10**13  # torch takes 64 bits; training seeds step s with seed × 1_000_003 + s, which must stay under 2^64


def between(low, high) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must lie between {low} and {high}"


def frames_or_auto(value) -> int | str:
    """--frames: a count, or 'auto' (as many as fit)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return integer(value)
    except ValueError:
        raise ValueError("write a frame count 4k+1 (e.g. 49) or auto") from None


def start_point(value) -> str:
    """--start: a frame number ('12') or seconds ('2.5s'), normalised ('2.50s' → '2.5s')."""
    from loraedit.video import parse_start

    try:
        return str(parse_start(value))
    except InputError:
        raise ValueError("write a frame number (e.g. 12) or a time in seconds (e.g. 2.5s), 0 or more") from None


def frame_count(v: int | str) -> str | None:
    if v == "auto" or v >= 1 and (v - 1) % 4 == 0:
        return None
    return f"must be 4k+1 (e.g. 17, 33, 49, 81); nearest is {max(1, round((v - 1) / 4) * 4 + 1)}"


# ---------------------------------------------------------------- declaring a setting


def setting(default, help: str, *, parse: Callable = text, check: Callable | None = None, flag: str | None = None,
            metavar: str | None = None, repeat: bool = False, group: str = "", affects_result: bool = True,
            inherit: bool = True):
    """A field of a settings dataclass, with everything the command line and the checks need.

    parse: reads a string or a native value into the normalised value (raises ValueError).
    check: returns None when a read value is valid, else the problem.
    repeat: the flag may be given several times (the values are collected in a list for `parse`).
    affects_result: False for settings that change how a stage runs but not what it makes
        (device, memory mode, checkpoint interval); these never make a rerun refuse.
    inherit: False for a setting that a later command does not take over from the run's record.
    """
    meta = {"parse": parse, "check": check, "help": help, "flag": flag, "metavar": metavar, "repeat": repeat,
            "group": group, "affects_result": affects_result, "inherit": inherit}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def read_value(f: dataclasses.Field, value, source: str | None = None):
    """The normalised value of field `f`; InputError naming the flag (or the TOML key and file)."""
    plain = isinstance(value, str) and value and not any(c.isspace() for c in value)
    shown = "" if f.metadata["repeat"] and isinstance(value, (list, tuple)) else f" {value if plain else repr(value)}"
    where = f"{flag_name(f)}{shown}" if source is None else f"{source}: {f.name.replace('_', '-')} = {value!r}"
    if value is None:
        return None
    try:
        out = f.metadata["parse"](value)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None
    check = f.metadata.get("check")
    if check is not None and out is not None:
        problem = check(out)
        if problem:
            raise InputError(f"{where}: {problem}")
    return out


class Settings:
    """Base of the stage settings: every field is read and checked when the object is made."""

    def __post_init__(self):
        for f in fields(self):
            if f.metadata:
                object.__setattr__(self, f.name, read_value(f, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Checks across fields (override)."""

    @classmethod
    def from_values(cls, values: dict, sources: dict[str, str] | None = None):
        """Build from a dict of raw values (strings from flags, native values from TOML/JSON);
        `sources` names where a value came from (a file), for the error message."""
        sources = sources or {}
        kwargs = {}
        for f in fields(cls):
            if f.name in values:
                kwargs[f.name] = read_value(f, values[f.name], sources.get(f.name))
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def result_dict(self) -> dict:
        """The settings that decide what the stage makes (not how it runs)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self) if f.metadata.get("affects_result", True)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _exists(value: str | None, what: str, fix: str) -> None:
    if value is not None and not Path(value).exists():
        raise InputError(f"{value}: no such {what}; {fix}")


# ---------------------------------------------------------------- the stages' settings

EDIT_MODES = ("auto", "mask-aware", "naive")
_MODE_HELP = ("auto (default): mask-aware for a local edit, naive for a global one (a restyle, a grade; the decision is in "
              "prepare/plan.json); mask-aware; naive: the paper's baseline with the stock first-frame mask")
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "cudnn", "efficient", "math", "flash-attn", "flash3", "sage", "xformers")
ATTENTION_HELP = ("attention kernel (diffusers' attention dispatcher): auto (default: PyTorch's SDPA, which picks its own kernel; the "
                  "fastest measured on an H200), sdpa, flash / cudnn / efficient (PyTorch's kernels, CUDA), math, flash-attn / "
                  "flash3 / sage / xformers (their packages installed)")
COMPILE_HELP = ("torch.compile the transformer's repeated blocks (regional compilation; the first step also compiles, about a "
                "minute on a GPU; not with fp8 memory modes)")
_MODEL_HELP = "Wan I2V model folder in diffusers layout (or a hub id, where there is network)"


@dataclass(frozen=True)
class PrepareSettings(Settings):
    """Stage prepare: which frames, at which size, the edited first frame, references, the edit region."""

    model: str | None = setting(None, _MODEL_HELP, parse=model_path, group="inputs")
    video: str | None = setting(None, "source video", parse=path, group="inputs")
    first_frame: str | None = setting(None, "the edited first frame (PNG/JPEG)", parse=path, group="inputs")
    ref: dict = setting({}, "edited later frame K (0 < K < frames) as an appearance reference; repeatable; --ref none: no references (over the run's recorded ones)",
                        parse=refs, metavar="K=PATH", repeat=True, group="inputs")
    frames: int | str = setting(49, "frames to edit, 4k+1 (default 49; 17 with the bundled toy model), or auto: as many as fit, up to 81", parse=frames_or_auto,
                                check=frame_count, group="frames")
    size: str | None = setting(None, "WIDTHxHEIGHT, multiples of 16 (default: the clip's aspect at the model's pixel budget: "
                                     "832x480 for 16:9, 624x624 for a square clip)", parse=size, group="frames")
    start: str = setting("0", "where to start: a source frame number (12) or a time in seconds (2.5s); default 0", parse=start_point,
                         group="frames")
    fps: float | None = setting(None, "frame rate to take the frames at (default: the model's, 16 for Wan2.1)", parse=number,
                                check=above(0), group="frames")
    stride: int | None = setting(None, "take every N-th source frame instead", parse=integer, check=at_least(1), group="frames")
    spread: bool = setting(False, "spread the frames evenly over the rest of the clip instead (the motion then depends on its length)",
                           parse=boolean, group="frames")
    allow_cuts: bool = setting(False, "go on when the frames cross a scene cut", parse=boolean, group="frames", affects_result=False)
    mode: str = setting("auto", _MODE_HELP, parse=choice(*EDIT_MODES), group="inputs")
    # the edit region (see loraedit/masks.py)
    mask: str | None = setting(None, "mask video, folder of PNG frames, or one PNG (white = edit region)", parse=path, group="edit region")
    masks: str | None = setting(None, "reuse the masks written by `loraedit masks --out DIR`, exactly", parse=path, metavar="DIR", group="edit region")
    box: list = setting([], "edit region on frame 0 as a box in pixels of the working size (--size); repeatable; followed through the video",
                        parse=boxes, metavar="x0,y0,x1,y1", repeat=True, group="edit region")
    mask_style: str = setting("bbox", "bbox: each region's box grown by --grow (default); tight: as found; dilate: grown by --dilate pixels; "
                              "blocks: coarse --block-size blocks at the edge; static: the union over all frames",
                              parse=choice(*MASK_STYLES), group="edit region")
    grow: float = setting(0.10, "bbox style: grow each box by this fraction of its size (default 0.10)", parse=number, check=at_least(0), group="edit region")
    dilate: int = setting(16, "dilate style: grow the region by N pixels (default 16)", parse=integer, check=at_least(0), metavar="N", group="edit region")
    block_size: int = setting(7, "blocks style: block size in pixels (default 7)", parse=integer, check=at_least(1), group="edit region")
    segmenter: str = setting("flow", "flow: follow the region by optical flow (default, no weights); sam2: refine each frame with SAM2 "
                             "(needs loraedit[sam2] and --sam2-checkpoint)", parse=choice(*SEGMENTERS), group="edit region")
    sam2_checkpoint: str | None = setting(None, "SAM2 weights (.pt) for --segmenter sam2", parse=path, metavar="PATH", group="edit region")
    sam2_config: str | None = setting(None, "SAM2 model config (default: guessed from the checkpoint's name)", group="edit region")
    diff_threshold: float = setting(0.0, "automatic region: colour difference (CIE ΔE) that counts as edited; 0 = choose per image (default)",
                                    parse=number, check=at_least(0), group="edit region")
    min_region: float = setting(0.002, "automatic region: drop found regions smaller than this fraction of the frame (default 0.002)",
                                parse=number, check=between(0, 1), group="edit region")

    def check(self) -> None:
        if sum(v not in (None, False) for v in (self.fps, self.stride, self.spread)) > 1:
            raise InputError("--fps, --stride and --spread each choose the frames; give one of them")
        for k in self.ref:
            if self.frames != "auto" and not 1 <= k < self.frames:
                raise InputError(f"--ref {k}={self.ref[k]}: frame {k} is outside the clip's frames 1..{self.frames - 1} (frame 0 is --first-frame)")

    def check_files(self) -> None:
        """The input files exist (before anything is read or loaded)."""
        if self.model is None:
            raise InputError("--model is required: a Wan I2V folder in diffusers layout (the run remembers it for train and render)")
        if self.video is None or self.first_frame is None:
            raise InputError("--video and --first-frame are required (the source clip and its edited first frame)")
        _exists(self.video, "video file", "check --video")
        _exists(self.first_frame, "image", "check --first-frame")
        for k, p in self.ref.items():
            _exists(p, f"reference image (from --ref {k}=…)", "check the path")
        _exists(self.mask, "mask file or folder", "check --mask")
        if self.sam2_checkpoint is not None:
            _exists(self.sam2_checkpoint, "SAM2 checkpoint", "check --sam2-checkpoint")

    def mask_options(self):
        from loraedit.masks import MaskOptions

        return MaskOptions(mask=self.mask, masks=self.masks, boxes=list(self.box), style=self.mask_style, grow=self.grow,
                           dilate=self.dilate, block=self.block_size, segmenter=self.segmenter,
                           sam2_checkpoint=self.sam2_checkpoint, sam2_config=self.sam2_config,
                           diff_threshold=self.diff_threshold, min_area=self.min_region)


def compile_problem(memory: str, compile_: bool, render_cache: str = "off") -> str | None:
    """Why --compile cannot run with these settings (None: it can); checked before any weights load.

    fp8 storage: diffusers' layerwise casting casts each layer's weights in a forward hook by swapping
    the module's parameters (`module.to`), which torch.compile cannot trace (the recomputation of a
    checkpointed block then sees float8 where the forward saw bf16). The render cache's hooks decide
    per step, from a tensor's value, whether the blocks run at all: data-dependent control flow that
    breaks the compiled graphs.
    """
    if not compile_:
        return None
    if memory.startswith("fp8"):
        return (f"--compile with --memory {memory}: fp8 storage casts each layer's weights in a hook that torch.compile cannot "
                f"trace; use --memory {memory.replace('fp8', 'bf16')} or leave out --compile")
    if render_cache != "off":
        return "--compile with --render-cache: the cache decides per step whether the blocks run, which breaks the compiled graphs; use one of them"
    return None


@dataclass(frozen=True)
class TrainSettings(Settings):
    """Stages encode + train: what the LoRA learns from the prepared run, and how it is trained."""

    model: str | None = setting(None, _MODEL_HELP, parse=model_path, group="inputs")
    prompt: str = setting("", "the source video's caption, for training: what the clip shows before the edit (optional)", group="prompts")
    edit_prompt: str | None = setting(None, "the edited video's caption, for rendering and for the edited reference frames "
                                            "(default: --prompt)", group="prompts",
                                  affects_result=False)  # trains only stage 2, whose text is recorded as a training input
    trigger: str = setting("sks", "a rare word put before both captions, the LoRA's handle on this video (default sks; \"\" for none)",
                           group="prompts")
    caption: str = setting("off", "auto: caption the source's and the edited first frame with Florence-2 where --prompt / "
                                  "--edit-prompt are not given", parse=choice("off", "auto"), group="prompts",
                           affects_result=False)  # the captions it gives are recorded as training inputs
    captioner: str | None = setting(None, "Florence-2 for --caption auto: a local folder in the transformers layout, or a hub id where "
                                          "there is network (default florence-community/Florence-2-base)", parse=model_path,
                                    metavar="PATH", group="prompts", affects_result=False)
    mode: str = setting("auto", _MODE_HELP, parse=choice(*EDIT_MODES), group="inputs")
    steps: int = setting(100, "stage-1 steps on the video (default 100)", parse=integer, check=at_least(0))
    colour_copies: int = setting(0, "stage 1 also trains on N copies of the video with every colour's hue turned (frame 0 and "
                                    "condition alike), so the LoRA takes the object's colour from the first frame instead of "
                                    "learning the source's (default 0: the paper)", parse=integer, check=at_least(0))
    ref_steps: int = setting(100, "stage-2 steps on the references (default 100; only with --ref)", parse=integer, check=at_least(0))
    ref_video_every: int = setting(10, "stage 2: every N-th step trains on the video (default 10; 0: never)", parse=integer, check=at_least(0))
    ref_sample: str = setting("still", "stage 2: how a reference trains: still (default, the paper: alone, one latent frame) or "
                                       "pair (after the edited first frame, as far from it in time as in the clip)",
                              parse=choice("still", "pair"))
    rank: int = setting(16, "LoRA rank (default 16)", parse=integer, check=at_least(1))
    alpha: float = setting(16.0, "LoRA alpha (default 16)", parse=number, check=above(0))
    lora_targets: str = setting(DEFAULT_LORA_TARGETS, "regex of the layers to adapt (default: every linear layer of each block but the image k/v)",
                                parse=regex)
    lr: float = setting(1e-4, "AdamW learning rate (default 1e-4)", parse=number, check=above(0))
    weight_decay: float = setting(0.01, "AdamW weight decay (default 0.01)", parse=number, check=at_least(0))
    grad_clip: float = setting(1.0, "clip the gradient norm to this (default 1; 0: no clipping)", parse=number, check=at_least(0))
    timesteps: str = setting("uniform", "training noise levels (default uniform, as the paper)", parse=choice("uniform", "shifted", "logit-normal"))
    train_shift: float = setting(5.0, "shift for --timesteps shifted (default 5)", parse=number, check=above(0))
    seed: int = setting(0, "random seed (default 0)", parse=integer, check=between(0, MAX_SEED))
    experts: str = setting("both", "Wan2.2-I2V-A14B: train a LoRA for both experts, each on its side of the noise boundary "
                           "(default), or for the low-noise expert only (half the training time)", parse=choice("both", "low"))
    high_noise_steps: int | None = setting(None, "Wan2.2-I2V-A14B: stage-1 steps of the high-noise expert (default: --steps)",
                                           parse=integer, check=at_least(0))
    memory: str = setting("auto", MEMORY_HELP,
                          parse=memory, group="resources", affects_result=False)
    gradient_checkpointing: str = setting("auto", "recompute activations in the backward pass (auto: on for GPU)",
                                          parse=choice("auto", "on", "off"), group="resources", affects_result=False)
    checkpoint_every: int = setting(25, "save a resumable checkpoint every N steps (default 25)", parse=integer, check=at_least(1),
                                    group="resources", affects_result=False)
    compile: bool = setting(False, COMPILE_HELP, parse=boolean, group="resources", affects_result=False, inherit=False)
    attention: str = setting("auto", ATTENTION_HELP, parse=choice(*ATTENTION_CHOICES), group="resources", affects_result=False)
    device: str = setting("auto", "auto (default), cuda, cuda:N or cpu", parse=device, group="resources", affects_result=False)

    def check(self) -> None:
        problem = compile_problem(self.memory, self.compile)
        if problem:
            raise InputError(problem)

    def check_files(self, run_dir: Path | None = None) -> None:
        """run_dir: the run trained, whose cache/captions.json may already hold --caption auto's captions."""
        if self.model is None:
            raise InputError("--model is required: a Wan I2V folder in diffusers layout")
        names = linear_layer_names(self.model)
        if names and not any(re.fullmatch(self.lora_targets, n) for n in names):
            raise InputError(f"--lora-targets {self.lora_targets}: matches none of the model's {len(names)} linear layers "
                             f"(e.g. {names[0]}); fix the regular expression (it must match a whole layer name)")
        if self.caption == "auto" and self.captioner and Path(self.captioner).is_absolute() and not Path(self.captioner).is_dir():
            raise InputError(f"{self.captioner}: no such Florence-2 folder (--captioner); give a local Florence-2 folder in the "
                             "transformers layout, or write --prompt / --edit-prompt yourself")
        captioned = run_dir is not None and (Path(run_dir) / "cache" / "captions.json").is_file()
        if self.caption == "auto" and not (self.prompt and self.edit_prompt is not None) and not captioned:
            from loraedit.caption import DEFAULT_CAPTIONER

            captioner = self.captioner or DEFAULT_CAPTIONER
            if not Path(captioner).expanduser().exists():
                from loraedit.models import hub_problem

                problem = hub_problem(captioner, "config.json")
                if problem:  # said at once: offline, the download was retried for minutes before failing
                    raise InputError(f"--caption auto: the captioner {captioner}: {problem}; download it (huggingface-cli "
                                     f"download {captioner} --local-dir DIR, then --captioner DIR), or write --prompt / "
                                     "--edit-prompt yourself")
        if self.experts != "both" or self.high_noise_steps is not None:
            _two_experts_only(self.model, "--experts low" if self.experts != "both" else "--high-noise-steps")


def linear_layer_names(model: str) -> list[str]:
    """Names of the transformer's 2-D weight layers, read from the safetensors headers (no torch, no
    weights read); [] where the folder has none (a hub id)."""
    import json
    import struct

    names = []
    for f in sorted(Path(model).glob("transformer*/*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        names += [k[: -len(".weight")] for k, v in header.items()
                  if k.endswith(".weight") and isinstance(v, dict) and len(v.get("shape", ())) == 2]
    return sorted(set(names))


def _two_experts_only(model: str, what: str) -> None:
    """A setting that means something only for a two-expert model (read from the folder's JSON, no torch)."""
    if Path(model).is_dir():
        from loraedit.family import detect

        fam = detect(model)
        if not fam.two_experts:
            raise InputError(f"{what}: {model} is a {fam.name} model with one transformer; this applies to two-expert models "
                             "(Wan2.2-I2V-A14B); leave it out")


@dataclass(frozen=True)
class RenderSettings(Settings):
    """Stage render: sampling the edited video with the trained LoRA, and what is written."""

    model: str | None = setting(None, _MODEL_HELP, parse=model_path, group="inputs")
    first_frame: str | None = setting(None, "the edited first frame (default: the run's; another one renders it with the same LoRA)",
                                      parse=path, group="inputs", inherit=False)
    negative_prompt: str | None = setting(None, "what to steer away from (default: Wan's negative prompt)", group="rendering")
    seed: int = setting(0, "random seed (default 0)", parse=integer, check=between(0, MAX_SEED))
    render_steps: int = setting(30, "sampling steps (default 30)", parse=integer, check=at_least(1), group="rendering")
    shift: float = setting(5.0, "sampling flow shift (default 5)", parse=number, check=above(0), group="rendering")
    guidance: float = setting(5.0, "classifier-free guidance scale (default 5; 1 turns it off)", parse=number, check=at_least(1),
                              group="rendering")
    guidance_2: float | None = setting(None, "Wan2.2-I2V-A14B: guidance scale of the low-noise expert (default: --guidance)",
                                       parse=number, check=at_least(1), group="rendering")
    composite: bool = setting(False, "paste the source back outside the (feathered) edit region", parse=boolean, group="rendering")
    feather: int = setting(8, "--composite: blend band in pixels (default 8)", parse=integer, check=at_least(0), group="rendering")
    # the render's numbers depend on the precision it samples in, so another mode is another render
    # (and any mode can render a LoRA trained in any mode)
    memory: str = setting("auto", MEMORY_HELP,
                          parse=memory, group="resources")
    # --compile is not taken over from the run's record (train's or render's): a later render with --render-cache
    # (which --compile refuses) must not be refused for a flag its own command line never gave
    compile: bool = setting(False, COMPILE_HELP, parse=boolean, group="resources", affects_result=False, inherit=False)
    attention: str = setting("auto", ATTENTION_HELP, parse=choice(*ATTENTION_CHOICES), group="resources", affects_result=False)
    # the cache skips computation, so it changes the result: another render
    render_cache: str = setting("off", "first-block: diffusers' first-block cache at render (reuses the other blocks' output "
                                "while the first block's changes little; faster, slightly different; see docs/memory.md)",
                                parse=choice("off", "first-block"), group="rendering")
    render_cache_threshold: float = setting(0.05, "--render-cache first-block: relative change of the first block's output "
                                            "below which a step reuses the cache (default 0.05; higher skips more)",
                                            parse=number, check=above(0), group="rendering")
    device: str = setting("auto", "auto (default), cuda, cuda:N or cpu", parse=device, group="resources", affects_result=False)

    def check(self) -> None:
        problem = compile_problem(self.memory, self.compile, self.render_cache)
        if problem:
            raise InputError(problem)

    def check_files(self) -> None:
        if self.model is None:
            raise InputError("--model is required: a Wan I2V folder in diffusers layout")
        _exists(self.first_frame, "image", "check --first-frame")
        if self.guidance_2 is not None:
            _two_experts_only(self.model, "--guidance-2")


# ---------------------------------------------------------------- commands: which stages' settings each takes

COMMANDS: dict[str, tuple[type[Settings], ...]] = {
    "prepare": (PrepareSettings,),
    "train": (TrainSettings,),
    "render": (RenderSettings,),
    "edit": (PrepareSettings, TrainSettings, RenderSettings),
}


def command_fields(command: str) -> dict[str, dataclasses.Field]:
    """The fields a command takes, by name; a name shared by two stages (model, seed, device) is one flag."""
    out: dict[str, dataclasses.Field] = {}
    for cls in COMMANDS[command]:
        for f in fields(cls):
            out.setdefault(f.name, f)
    return out


def commands_taking(name: str) -> list[str]:
    return [c for c in COMMANDS if name in command_fields(c)]


def all_fields() -> dict[str, dataclasses.Field]:
    out: dict[str, dataclasses.Field] = {}
    for c in COMMANDS:
        for name, f in command_fields(c).items():
            out.setdefault(name, f)
    return out


def add_arguments(parser: argparse.ArgumentParser, flds, *, raw: bool = True) -> None:
    """One flag per field.

    raw=True (the stage commands): values stay strings and unset flags stay absent; the CLI merges
    them over the run's record and the job file and reads them with the fields' parsers.
    raw=False (a standalone parser): each value is read by its field's parser as argparse parses it,
    and unset flags get the field's default.
    """
    groups: dict[str, Any] = {}
    for f in flds:
        g = groups.get(f.metadata["group"])
        if g is None:
            g = groups[f.metadata["group"]] = parser.add_argument_group(f.metadata["group"] or "settings")
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if raw:
            kw["default"] = argparse.SUPPRESS
        else:
            kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parse = f.metadata["parse"]
        choices = getattr(parse, "choices", None)
        if parse is boolean:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if f.metadata["repeat"]:
                kw["action"] = "append" if raw else "extend"
            if not raw:
                kw["type"] = _argparse_type(f)
            if choices:
                kw["metavar"] = "{" + ",".join(choices) + "}"
            if f.metadata["metavar"]:
                kw["metavar"] = f.metadata["metavar"]
        g.add_argument(flag_name(f), **kw)


def _argparse_type(f: dataclasses.Field):
    def read(value: str):
        try:
            return read_value(f, [value] if f.metadata["repeat"] else value)
        except InputError as exc:
            # argparse names the flag itself ("argument --box: …"): not twice
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag_name(f)}: ").removeprefix(f"{flag_name(f)} ")) from None

    read.__name__ = f.name  # argparse names the type in its message
    return read


def group_fields(cls: type[Settings], group: str) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if f.metadata.get("group") == group]
