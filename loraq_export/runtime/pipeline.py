"""Local diffusers pipeline folders, run with their own transformer and text encoder (FP, torch) or
with exported graphs in their place (``GraphTransformer``, ``GraphTextEncoder``): one code path for
"run these graphs in that pipeline" (``load_pipeline`` / ``with_components``).

A pipeline folder is what ``save_pretrained`` writes (``model_index.json`` naming the pipeline
class and its components, one subfolder per component). Generation needs all of text_encoder,
tokenizer, vae, scheduler and transformer. Components are loaded in float32 on the CPU
(``torch_dtype=torch.float32``): the FP reference is the float32 pipeline.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from loraq_export.errors import UserError
from loraq_export.models.diffusion import SUPPORTED

# Pipelines whose __call__ this runtime follows (see transformer.py) and their transformer classes.
PIPELINES = {"PixArtSigmaPipeline": "PixArtTransformer2DModel", "PixArtAlphaPipeline": "PixArtTransformer2DModel",
             "SanaPipeline": "SanaTransformer2DModel"}
COMPONENTS = ("text_encoder", "tokenizer", "vae", "scheduler", "transformer")
# The multiple of which each pipeline's check_inputs requires height and width to be (diffusers 0.42:
# "have to be divisible by 8" in the PixArt pipelines, by 32 in SanaPipeline, whatever the VAE).
SIZE_MULTIPLE = {"PixArtSigmaPipeline": 8, "PixArtAlphaPipeline": 8, "SanaPipeline": 32}


@dataclass
class PipelineFolder:
    root: Path
    class_name: str
    transformer_config: dict = field(default_factory=dict)
    text_encoder_config: dict = field(default_factory=dict)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); re-save the pipeline with save_pretrained") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; re-save the pipeline with save_pretrained")
    return data


def read_pipeline_folder(path) -> PipelineFolder:
    """Check that ``path`` is a whole PixArt / SANA pipeline folder; one UserError line naming what
    is missing otherwise (a bare transformer folder included)."""
    from loraq_export.inputs import readable

    fix = "pass the pipeline folder that holds model_index.json (as save_pretrained writes it)"
    root = readable(Path(path), "pipeline folder", fix)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; {fix}")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        config = root / "config.json"
        if config.is_file() and "_class_name" in _json(config):
            raise UserError(f"{root} is a bare transformer folder ({_json(config)['_class_name']}): generating needs "
                            "the whole pipeline, model_index.json with text_encoder/, tokenizer/, vae/, scheduler/ "
                            "and transformer/ beside it; pass the pipeline folder")
        raise UserError(f"{root} has no model_index.json: not a diffusers pipeline folder; {fix}")
    index = _json(index_path)
    cls_name = index.get("_class_name")
    if cls_name not in PIPELINES:
        raise UserError(f"{index_path} names pipeline {cls_name!r}; loraq generate runs {', '.join(PIPELINES)}")
    missing = [c for c in COMPONENTS
               if not index.get(c) or (isinstance(index[c], list) and index[c][0] is None) or not (root / c).is_dir()]
    if missing:
        raise UserError(f"pipeline {root} is missing {', '.join(missing)}: generating needs its text encoder, "
                        "tokenizer, VAE, scheduler and transformer; pass a whole pipeline folder")
    configs = [_json(readable(root / c / "config.json", f"{c} config", "re-save the pipeline with save_pretrained"))
               for c in ("transformer", "text_encoder")]
    return PipelineFolder(root, cls_name, *configs)


@contextmanager
def _quiet(bars: bool = False):
    """diffusers' and transformers' warnings (accelerate, clean_caption without bs4) off, and their
    loading progress bars unless ``bars``."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    if not bars:
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if not bars:
            dlog.enable_progress_bar()
            tlog.enable_progress_bar()


def _dtype_kwarg() -> str:
    """diffusers 0.42 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present since the rename)
        return "dtype"
    except ImportError:
        return "torch_dtype"


def load_pipeline(folder: PipelineFolder, transformer: Optional[torch.nn.Module] = None,
                  text_encoder: Optional[torch.nn.Module] = None):
    """The diffusers pipeline of ``folder`` in float32 on the CPU; ``transformer`` and
    ``text_encoder`` replace its own (which are then not loaded at all)."""
    import diffusers

    given = {k: v for k, v in (("transformer", transformer), ("text_encoder", text_encoder)) if v is not None}
    # Not loaded: from_pretrained takes only the library's own model classes in their place.
    kwargs = {"local_files_only": True, _dtype_kwarg(): torch.float32, **{k: None for k in given}}
    cls = getattr(diffusers, folder.class_name)
    with _quiet():
        try:
            pipe = cls.from_pretrained(str(folder.root), **kwargs)
        except Exception as e:  # diffusers / transformers raise OSError, ValueError, EnvironmentError...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the pipeline {folder.root} ({first[:300]}); re-save it with "
                            "save_pretrained") from None
    if transformer is None and type(pipe.transformer).__name__ not in SUPPORTED:
        raise UserError(f"{folder.root}: transformer {type(pipe.transformer).__name__} is not one loraq runs "
                        f"({', '.join(SUPPORTED)})")
    return with_components(pipe, **given) if given else pipe


def vae_scale(pipe) -> int:
    return int(pipe.vae_scale_factor)


@contextmanager
def step_seconds(transformer: torch.nn.Module, into: list):
    """Append the wall time of each transformer call (one per denoising step; classifier-free
    guidance batches both halves in one call) to ``into``."""
    start = {}

    def pre(*_):
        start["t"] = time.perf_counter()

    def post(*_):
        into.append(time.perf_counter() - start["t"])

    handles = [transformer.register_forward_pre_hook(pre), transformer.register_forward_hook(post)]
    try:
        yield into
    finally:
        for h in handles:
            h.remove()


def generate(pipe, prompt: str, seed: int, steps: int, height: int, width: int, guidance: Optional[float] = None,
             output_type: str = "pil", progress: bool = True, desc: str = ""):
    """One image (or latent) from ``pipe`` as diffusers gives it: ``generator =
    torch.Generator().manual_seed(seed)``, the requested size exactly (no resolution binning),
    the pipeline's own defaults for everything else."""
    kwargs = {"num_inference_steps": steps, "height": height, "width": width, "output_type": output_type,
              "generator": torch.Generator().manual_seed(seed), "use_resolution_binning": False}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    pipe.set_progress_bar_config(disable=not progress, desc=desc, leave=False)
    with _quiet(bars=True), torch.no_grad():
        try:
            return pipe(prompt, **kwargs).images[0]
        except ValueError as e:  # the pipeline's check_inputs (sizes, prompt) raises ValueError
            raise UserError(f"{type(pipe).__name__} refused the arguments: {e}") from None


def with_components(pipe, transformer: Optional[torch.nn.Module] = None,
                    text_encoder: Optional[torch.nn.Module] = None):
    """A pipeline of the same class sharing ``pipe``'s components (tokenizer, VAE, scheduler, and
    the transformer / text encoder not given), with ``transformer`` / ``text_encoder`` in place
    of its own."""
    given = {k: v for k, v in (("transformer", transformer), ("text_encoder", text_encoder)) if v is not None}
    with _quiet():
        return type(pipe)(**{**pipe.components, **given})
