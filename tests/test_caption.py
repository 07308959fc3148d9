"""Prompts as the paper uses them: the source's caption trains, the edited one renders and trains
stage 2, a trigger word before both; --caption auto with a tiny random Florence-2 saved in the
real transformers layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loraedit import caption
from loraedit.cli import main
from loraedit.errors import InputError

from conftest import edit_argv


def save_tiny_florence2(folder: Path) -> Path:
    """A randomly initialised Florence-2 (DaViT vision tower + BART) with its processor, written by
    transformers' own save_pretrained: config.json, model.safetensors, generation_config.json,
    tokenizer (byte-level BPE trained here, offline) and processor_config.json."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (BartConfig, BartTokenizerFast, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig)

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = ["a man walking in a red jacket on a street", "a kitten turns its head on a wooden floor", "a man with a cowboy hat",
              "Describe in detail what is shown in the image."]
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    tok = BartTokenizerFast.from_pretrained(str(folder), extra_special_tokens={"image_token": "<image>"})
    # 64×64 input, total stride 32: 2×2 image tokens + 1 pooled
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    vision = Florence2VisionConfig(depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], num_heads=[1, 2, 2, 4], num_groups=[1, 2, 2, 4],
                                   window_size=2, projection_dim=32, max_position_embeddings=8, max_temporal_embeddings=4,
                                   drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text, image_token_id=tok.image_token_id))
    model.generation_config.min_new_tokens = 3  # a random model would often stop at once; a caption has words
    model.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    return save_tiny_florence2(tmp_path_factory.mktemp("captioner") / "tiny-florence2")


def test_prompts_put_the_trigger_before_each_caption():
    assert caption.prompts("a man walking", None, "sks") == ("sks a man walking", "sks a man walking")
    assert caption.prompts("a man walking", "a man in a red jacket walking", "sks") == ("sks a man walking", "sks a man in a red jacket walking")
    assert caption.prompts("", None, "") == ("", "")
    assert caption.prompts("", "a hat", "zwx") == ("zwx", "zwx a hat")


def test_tiny_florence2_captions_from_its_saved_folder(florence):
    assert {p.name for p in florence.iterdir()} >= {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                                                    "generation_config.json"}
    model, processor = caption.load_captioner(str(florence), torch.device("cpu"))
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), rng.integers(0, 255, (90, 90, 3), dtype=np.uint8)]
    out = caption.caption_images(model, processor, imgs, max_new_tokens=8)
    assert len(out) == 2 and all(isinstance(c, str) and c for c in out)
    assert caption.caption_images(model, processor, imgs[:1], max_new_tokens=8) == out[:1]  # greedy: the same words again


def test_missing_or_wrong_captioner_is_one_clear_error(tmp_path, tiny_model):
    with pytest.raises(InputError, match="no such Florence-2 folder"):
        caption.load_captioner(str(tmp_path / "nope"), torch.device("cpu"))
    with pytest.raises(InputError, match="cannot be loaded as a Florence-2 captioner|not Florence-2"):
        caption.load_captioner(str(tiny_model), torch.device("cpu"))  # a Wan folder, not a captioner


def test_missing_captioner_from_the_cli_fails_before_any_model_loads(tiny_model, clip, tmp_path, capsys):
    argv = edit_argv(tiny_model, clip, tmp_path / "run", "--caption", "auto", "--captioner", str(tmp_path / "no-florence"))
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "no such Florence-2 folder" in err[0] and "--captioner" in err[0]
    assert not (tmp_path / "run" / "prepare").exists()


def test_encode_keeps_the_source_caption_for_training_and_the_edited_one_for_rendering(tiny_model, clip, tmp_path):
    from loraedit import encode, prepare
    from loraedit.models import load_encoders
    from loraedit.settings import PrepareSettings

    prepare.run(PrepareSettings(model=str(tiny_model), video=str(clip["video"]), first_frame=str(clip["first_frame"]),
                                mask=str(clip["mask"]), frames=5, size="96x64"), tmp_path)
    prepared = prepare.load(tmp_path)
    s = encode.EncodeSettings(model=str(tiny_model), prompt="a red square", edit_prompt="a blue square", trigger="sks")
    cache = encode.run(s, tmp_path / "cache.safetensors", prepared, torch.device("cpu"))
    pipe = load_encoders(str(tiny_model), torch.device("cpu"))
    with torch.no_grad():
        want_train, _ = pipe.encode_prompt("sks a red square", do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
        want_edit, _ = pipe.encode_prompt("sks a blue square", do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
    assert torch.allclose(cache["text"], want_train.float()) and torch.allclose(cache["text_edit"], want_edit.float())
    assert not torch.allclose(cache["text"], cache["text_edit"])
    # no --edit-prompt: the render text is the training text
    same = encode.run(encode.EncodeSettings(model=str(tiny_model), prompt="a red square", trigger="sks"), tmp_path / "c2.safetensors",
                      prepared, torch.device("cpu"))
    assert torch.equal(same["text"], same["text_edit"]) and torch.allclose(same["text"], want_train.float())


def test_caption_auto_end_to_end(tiny_model, clip, florence, tmp_path, monkeypatch):
    """--caption auto: Florence-2 captions both first frames; the source's trains stage 1, the edited
    one trains stage 2 and renders; the trigger and captions are recorded in the run."""
    from loraedit import train

    seen = []
    real_step = train.training_step

    def spy(transformer, optimizer, x0, condition, text, image, *rest):
        seen.append((x0.shape[2], text.detach().cpu().clone()))
        return real_step(transformer, optimizer, x0, condition, text, image, *rest)

    monkeypatch.setattr(train, "training_step", spy)
    out = tmp_path / "run"
    argv = edit_argv(tiny_model, clip, out, "--caption", "auto", "--captioner", str(florence), "--trigger", "zwx",
                     "--ref", f"8={clip['ref']}", "--ref-steps", "2", "--ref-video-every", "0")
    assert main(argv) == 0
    caps = json.loads((out / "cache" / "captions.json").read_text())
    assert caps["source"] and caps["edited"] and caps["captioner"] == str(florence)
    from safetensors.torch import load_file

    caches = sorted((out / "cache").glob("encoded*.safetensors"))
    assert len(caches) == 1  # render used training's encodings
    cache = load_file(str(caches[0]))
    video_texts = [t for T, t in seen if T > 1]
    ref_texts = [t for T, t in seen if T == 1]
    assert len(video_texts) == 4 and len(ref_texts) == 2
    assert all(torch.equal(t, cache["text"]) for t in video_texts)
    assert all(torch.equal(t, cache["text_edit"]) for t in ref_texts)
    settings = json.loads((out / "render" / "settings.json").read_text())
    assert settings["prompt"] == f"zwx {caps['edited']}"
    job = json.loads((out / "job.json").read_text())
    assert job["train"]["trigger"] == "zwx" and job["train"]["caption"] == "auto"
    # a rerun does not caption again (the captions are in the run)
    monkeypatch.setattr(caption, "load_captioner", lambda *a, **k: pytest.fail("captioned again"))
    assert main(argv) == 0
