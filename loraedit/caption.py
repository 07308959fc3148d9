"""The paper's prompts: a caption of the source for training, of the edited video for rendering.

LoRA-Edit trains with [p*] + c, a trigger word and a caption of the *source* video, and renders
with [p*] + c̃, the same trigger and a caption of the *edited* video; the original code captions
with Florence-2 and puts the trigger word first. Here:

    --prompt        c   the source's caption: stage 1 trains on the video with it
    --edit-prompt   c̃   the edited video's caption: render, and stage 2 (the edited reference
                        frames, which show the edit) train with it; default: --prompt
    --trigger       p*  a rare word put before both (default TRIGGER), so the LoRA's learnt
                        appearance attaches to a word the base model has no strong meaning for
    --caption auto      where --prompt / --edit-prompt are not given, caption the source's first
                        frame and the edited first frame with Florence-2 (--captioner, through
                        transformers' own Florence2ForConditionalGeneration; no remote code)

Captions are computed once per run and kept in cache/captions.json, keyed by the captioner and
the two images, so a rerun or a re-render does not load Florence-2 again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from loraedit.errors import InputError
from loraedit.files import read_json, write_json

log = logging.getLogger("loraedit")

TRIGGER = "sks"  # DreamBooth's rare token: a few sub-word pieces with no strong meaning of their own
DEFAULT_CAPTIONER = "florence-community/Florence-2-base"  # Florence-2 in transformers' native layout
TASK = "<DETAILED_CAPTION>"  # Florence-2's task token for a sentence or two; Wan's own prompts are that long
MAX_TOKENS = 96


def with_trigger(trigger: str, text: str) -> str:
    """'sks' + 'a man walking' → 'sks a man walking'; either may be empty."""
    return " ".join(p for p in (trigger.strip(), text.strip()) if p)


def prompts(prompt: str, edit_prompt: str | None, trigger: str) -> tuple[str, str]:
    """(training text, render text): [p*] + c and [p*] + c̃, c̃ defaulting to c."""
    return with_trigger(trigger, prompt), with_trigger(trigger, prompt if edit_prompt is None else edit_prompt)


# ------------------------------------------------------------------ Florence-2


def load_captioner(where: str, device):
    """(model, processor) of a Florence-2 folder or hub id; InputError (one line) when it cannot be loaded."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = Path(where).expanduser()
    looks_local = local.is_absolute() or where.startswith((".", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise InputError(f"{where}: no such Florence-2 folder (--captioner); give a local Florence-2 folder in the transformers "
                         f"layout (e.g. {DEFAULT_CAPTIONER} downloaded) or write --prompt / --edit-prompt yourself")
    try:
        processor = AutoProcessor.from_pretrained(str(local) if looks_local else where)
        dtype = torch.bfloat16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(str(local) if looks_local else where, dtype=dtype).to(device).eval()
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise InputError(f"{where}: cannot be loaded as a Florence-2 captioner (--captioner) ({reason}); give a local Florence-2 "
                         "folder, or write --prompt / --edit-prompt yourself") from None
    if getattr(model.config, "model_type", None) != "florence2":
        raise InputError(f"{where}: is a {model.config.model_type} model, not Florence-2 (--captioner)")
    return model, processor


def caption_images(model, processor, images: list[np.ndarray], max_new_tokens: int = MAX_TOKENS) -> list[str]:
    """(H, W, 3) uint8 RGB images → one caption each (greedy, so the same image gives the same words)."""
    import torch
    from PIL import Image

    out = []
    device, dtype = model.device, next(model.parameters()).dtype
    for img in images:
        inputs = processor(text=TASK, images=Image.fromarray(img), return_tensors="pt")
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        text = processor.batch_decode(ids, skip_special_tokens=True)[0]
        out.append(" ".join(text.replace("<pad>", " ").split()))
    return out


def _digest(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes() + str(img.shape).encode()).hexdigest()[:16]


def run_captions(run_dir: Path, captioner: str, source0: np.ndarray, edited0: np.ndarray, device) -> dict:
    """{"source": c, "edited": c̃, "captioner": ...} for the run's first frames, from cache/captions.json
    when it holds these images' captions by this captioner, else by Florence-2 (then written there)."""
    path = Path(run_dir) / "cache" / "captions.json"
    key = {"captioner": captioner, "source_image": _digest(source0), "edited_image": _digest(edited0), "task": TASK}
    if path.is_file():
        saved = read_json(path)
        if all(saved.get(k) == v for k, v in key.items()):
            return saved
    log.info("captioning the source's and the edited first frame with %s", captioner)
    model, processor = load_captioner(captioner, device)
    source, edited = caption_images(model, processor, [source0, edited0])
    del model
    out = dict(key, source=source, edited=edited)
    write_json(path, out)
    log.info("captions: source %r, edited %r (cache/captions.json)", source, edited)
    return out


def resolve(run_dir: Path, prompt: str, edit_prompt: str | None, caption: str, captioner: str | None,
            prepared: dict, device) -> tuple[str, str | None]:
    """(prompt, edit_prompt) to use: the given ones, with --caption auto filling those not given."""
    if caption != "auto" or (prompt and edit_prompt is not None):
        return prompt, edit_prompt
    found = run_captions(run_dir, captioner or DEFAULT_CAPTIONER, prepared["source"][0], prepared["first"], device)
    return prompt or found["source"], edit_prompt if edit_prompt is not None else found["edited"]
