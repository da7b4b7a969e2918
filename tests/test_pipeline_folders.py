"""Tiny whole pipeline folders (PixArt-Sigma, SANA) built offline: diffusers' own pipelines load
them and generate; tokenizers split prompts into word pieces; seeded and atomic."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from loraq_export.errors import UserError
from loraq_export.models.diffusion_folders import load_diffusers_folder
from loraq_export.models.pipeline_folders import (
    build_gemma_tokenizer,
    build_t5_tokenizer,
    write_pipeline_folder,
)

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPT = "a photo of a cat sitting on a red chair, cinematic lighting"
PIPELINES = {"pixart-sigma": ("PixArtSigmaPipeline", "T5EncoderModel", "AutoencoderKL", 64),
             "sana": ("SanaPipeline", "Gemma2Model", "AutoencoderDC", 32)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {kind: write_pipeline_folder(root / kind, kind, seed=0) for kind in PIPELINES}


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_diffusers_loads_and_generates(folders, kind):
    import diffusers

    pipe_cls, enc_cls, vae_cls, side = PIPELINES[kind]
    pipe = getattr(diffusers, pipe_cls).from_pretrained(str(folders[kind]))
    assert type(pipe).__name__ == pipe_cls
    assert type(pipe.text_encoder).__name__ == enc_cls and type(pipe.vae).__name__ == vae_cls
    width = pipe.text_encoder.config.hidden_size if kind == "sana" else pipe.text_encoder.config.d_model
    assert width == pipe.transformer.config.caption_channels == 32
    pipe.set_progress_bar_config(disable=True)
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    assert size == side
    images = []
    for seed in (0, 0, 1):
        out = pipe(PROMPT, num_inference_steps=2, height=size, width=size, use_resolution_binning=False,
                   generator=torch.Generator().manual_seed(seed), output_type="np")
        images.append(out.images)
    assert images[0].shape == (1, side, side, 3) and np.isfinite(images[0]).all()
    assert images[0].std() > 0.01  # a picture, not a flat colour
    np.testing.assert_array_equal(images[0], images[1])  # same seed, same image
    assert np.abs(images[0] - images[2]).max() > 0.01  # another seed, another image


def test_tokenizers_split_prompts_into_word_pieces(folders):
    from transformers import AutoTokenizer

    t5 = build_t5_tokenizer()
    pieces = t5.convert_ids_to_tokens(t5(PROMPT).input_ids)
    assert pieces[:5] == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a", "\u2581cat"] and pieces[-1] == "</s>"
    assert "<unk>" not in t5.convert_ids_to_tokens(t5("zebras quizzically").input_ids)  # unknown words: pieces
    gemma = build_gemma_tokenizer()
    gpieces = gemma.convert_ids_to_tokens(gemma(PROMPT).input_ids)
    assert gpieces[:4] == ["<bos>", "a", "\u2581photo", "\u2581of"]
    assert gemma.decode(gemma("zebras é").input_ids, skip_special_tokens=True) == "zebras é"  # byte fallback
    # The saved tokenizers (what the pipelines load) tokenize as the built ones.
    for kind, built in (("pixart-sigma", t5), ("sana", gemma)):
        loaded = AutoTokenizer.from_pretrained(str(folders[kind] / "tokenizer"))
        assert loaded(PROMPT).input_ids == built(PROMPT).input_ids


def test_seeded_and_loraq_reads_the_transformer(folders, tmp_path):
    again = write_pipeline_folder(tmp_path / "again", "sana", seed=0)
    other = write_pipeline_folder(tmp_path / "other", "sana", seed=1)
    assert _digest(again) == _digest(folders["sana"]) != _digest(other)
    module, source = load_diffusers_folder(folders["pixart-sigma"])
    assert source["layout"] == "pipeline" and source["class"] == "PixArtTransformer2DModel"


def test_refuses_existing_path_and_unknown_kind(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_pipeline_folder(tmp_path / "taken", "sana")
    with pytest.raises(UserError, match="unknown pipeline kind"):
        write_pipeline_folder(tmp_path / "new", "flux")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing partial left behind


def test_a_folder_named_like_a_preset_is_the_folder(folders, tmp_path, monkeypatch):
    """./pixart-sigma (a relative path equal to a preset name) loads that folder, never the preset."""
    import shutil

    from loraq_export.models import diffusion, load_model, pipeline_components
    from loraq_export.models.pipeline_components import components_of

    monkeypatch.chdir(tmp_path)
    shutil.copytree(folders["pixart-sigma"], tmp_path / "pixart-sigma")
    refuse = lambda *a, **k: pytest.fail("built the preset instead of loading ./pixart-sigma")  # noqa: E731
    monkeypatch.setattr(diffusion, "build_preset", refuse)
    monkeypatch.setattr(pipeline_components, "text_encoder_preset_model", refuse)
    lm = load_model("pixart-sigma")
    assert lm.source["layout"] == "pipeline" and lm.module.config.num_layers == 1  # the tiny folder's transformer
    assert components_of("pixart-sigma") == ["transformer", "text_encoder"]
    te = load_model("pixart-sigma", component="text_encoder")
    assert te.module.config.d_model == 32 and te.source["layout"] == "pipeline"
    with pytest.raises(UserError, match="applies to the presets only"):
        load_model("pixart-sigma", num_layers=2)
    with pytest.raises(UserError, match="pipeline preset"):  # without the folder, the name is still a preset
        components_of("no-such-preset")


def test_num_layers_is_for_presets_only(tmp_path):
    with pytest.raises(UserError, match="num_layers applies to size 'preset' only"):
        write_pipeline_folder(tmp_path / "x", "sana", num_layers=2)
    with pytest.raises(UserError, match="unknown pipeline size"):
        write_pipeline_folder(tmp_path / "x", "sana", size="huge")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind,width,latent,scale", [("pixart-sigma", 4096, 4, 8), ("sana", 2304, 32, 32)])
def test_preset_size_has_the_published_widths(tmp_path, kind, width, latent, scale):
    import diffusers

    folder = write_pipeline_folder(tmp_path / kind, kind, size="preset", num_layers=1)
    pipe = getattr(diffusers, PIPELINES[kind][0]).from_pretrained(str(folder))
    enc = pipe.text_encoder.config
    assert (enc.hidden_size if kind == "sana" else enc.d_model) == pipe.transformer.config.caption_channels == width
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == latent
    assert pipe.vae_scale_factor == scale and pipe.transformer.config.num_layers == 1
