"""Token sequences a text encoder's input statistics are gathered on, drawn from its own tokenizer
with a frequency prior the tokenizer itself reveals; no text enters (the BERT case, with its
WordPiece vocabulary order, is synthetic_tokens.py).

The priors (``PRIORS``), probabilities over the ordinary tokens (special, byte-fallback and
sentinel tokens excluded):

- ``scores``: a SentencePiece *Unigram* model (T5) is a unigram language model: each piece's
  score is its log probability, learned on the training corpus (Kudo 2018, "Subword
  Regularization", arXiv:1804.10959; SentencePiece ``unigram_model.cc``). p(piece) = exp(score)
  is the model's own estimate of how often the piece occurs, and drawing pieces independently
  from it is sampling that very language model.
- ``merges``: a *BPE* model (Gemma) lists its merges in the order they were learned, most
  frequent pair first (Sennrich et al. 2016, arXiv:1508.07909), so a token made by an early merge
  is frequent: p ~ 1 / (merge rank + offset), Zipf's law over the merge order. Tokens no merge
  makes (single characters, the alphabet every merge starts from) share rank 0, ahead of the
  merges (placed after every merge instead, the prior matched real text worse: 10.48 against
  10.23 bits per token, tools/text_encoder_priors.py, docs/text-encoders.md).
- ``rank``: Zipf over the vocabulary id (what synthetic_tokens.py does for WordPiece).
- ``uniform``: every ordinary token alike (the baseline the others are measured against).

``auto`` picks ``scores`` for Unigram, ``merges`` for BPE, ``rank`` otherwise. Sequences carry
the tokenizer's own special tokens (its post-processor's template: T5 appends ``</s>``, Gemma
prepends ``<bos>``) and are right-padded, as the pipelines pad (PixArtSigmaPipeline and
SanaPipeline tokenize with padding="max_length", SanaPipeline sets padding_side "right").
"""
from __future__ import annotations

import json
import re
from typing import Optional

import torch

from loraq_export.errors import UserError
from loraq_export.models.synthetic_tokens import END_MARKS, END_PROBS, ENDED, LENGTHS, ZIPF_OFFSET, padded_batches

PRIORS = ("auto", "scores", "merges", "rank", "uniform")
_NOT_ORDINARY = re.compile(r"^(<0x[0-9A-Fa-f]{2}>|<extra_id_\d+>|<[^>\s]*>)$")  # bytes, sentinels, <pad> etc.


def tokenizer_model(tokenizer) -> dict:
    """The ``model`` section of the tokenizer's tokenizer.json (type, vocab, merges or scores)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizer.json) form; "
                        "save the model's tokenizer with transformers so that it writes tokenizer.json")
    return json.loads(backend.to_str())


def _template(tokenizer, spec: dict) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the sequence in the tokenizer's single-sequence template."""
    post = spec.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        before, after, seen = [], [], False
        for piece in post["single"]:
            if "Sequence" in piece:
                seen = True
            elif "SpecialToken" in piece:
                ids = post["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
                (after if seen else before).extend(ids)
        return before, after
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([bos] if bos is not None else []), ([eos] if eos is not None else [])


def ordinary_ids(tokenizer, vocab: dict[str, int]) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return sorted(i for t, i in vocab.items() if i not in special and not _NOT_ORDINARY.match(t))


def token_prior(tokenizer, prior: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(token ids, their probabilities (float64), the prior used) over the ordinary tokens."""
    if prior not in PRIORS:
        raise UserError(f"unknown token prior {prior!r}; choose one of {', '.join(PRIORS)}")
    spec = tokenizer_model(tokenizer)
    model = spec["model"]
    kind = model.get("type")
    if kind == "Unigram":
        vocab = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
    else:
        vocab = dict(model.get("vocab") or {})
    if prior == "auto":
        prior = {"Unigram": "scores", "BPE": "merges"}.get(kind, "rank")
    if (prior == "scores" and kind != "Unigram") or (prior == "merges" and kind != "BPE"):
        raise UserError(f"token prior {prior!r} needs a {'Unigram' if prior == 'scores' else 'BPE'} tokenizer; "
                        f"this one is {kind}: use auto, rank or uniform")
    ids = ordinary_ids(tokenizer, vocab)
    if not ids:
        raise UserError("the tokenizer's vocabulary has no ordinary tokens to draw synthetic sequences from")
    idx = torch.tensor(ids, dtype=torch.long)
    if prior == "scores":
        scores = torch.tensor([model["vocab"][i][1] for i in ids], dtype=torch.float64)
        weights = torch.exp(scores - scores.max())
    elif prior == "merges":
        made_by = {}
        for rank, merge in enumerate(model.get("merges") or []):
            a, b = merge if isinstance(merge, (list, tuple)) else merge.split(" ", 1)
            made_by.setdefault(a + b, rank)
        token_of = {i: t for t, i in vocab.items()}
        ranks = torch.tensor([made_by[token_of[i]] + 1 if token_of[i] in made_by else 0 for i in ids],
                             dtype=torch.float64)
        weights = 1.0 / (ranks + ZIPF_OFFSET)
    elif prior == "rank":
        weights = 1.0 / (torch.arange(len(ids), dtype=torch.float64) + ZIPF_OFFSET)
    else:
        weights = torch.ones(len(ids), dtype=torch.float64)
    return idx, weights / weights.sum(), prior


def prior_token_batches(tokenizer, prior: str = "auto", sequences: int = 512, batch: int = 32, seed: int = 0,
                        ) -> list[tuple[tuple[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]]:
    """``sequences`` synthetic sequences in batches of (input_ids, attention_mask), each with its
    token mask (the rows that are not padding)."""
    ids, probs, _ = token_prior(tokenizer, prior)
    before, after = _template(tokenizer, tokenizer_model(tokenizer))
    unk = tokenizer.unk_token_id
    ends = [i for i in tokenizer.convert_tokens_to_ids(list(END_MARKS)) if i is not None and i != unk]
    end_probs = torch.tensor(END_PROBS[:len(ends)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(sequences):
        n = int(torch.randint(LENGTHS[0], LENGTHS[1] + 1, (1,), generator=g))
        words = ids[torch.multinomial(probs, n, replacement=True, generator=g)]
        if ends and float(torch.rand(1, generator=g)) < ENDED:
            words[-1] = ends[int(torch.multinomial(end_probs, 1, generator=g))]
        seqs.append(torch.cat([torch.tensor(before, dtype=torch.long), words, torch.tensor(after, dtype=torch.long)]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return padded_batches(seqs, pad, batch)


def id_prior_batches(vocab_size: int, sequences: int = 64, batch: int = 8, seed: int = 0) -> list:
    """Without a tokenizer (a preset with random weights): ids 1.. drawn Zipf over the id, 0 as padding."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / (torch.arange(vocab_size - 1, dtype=torch.float64) + ZIPF_OFFSET)
    seqs = [1 + torch.multinomial(probs, int(torch.randint(LENGTHS[0], LENGTHS[1] + 1, (1,), generator=g)),
                                  replacement=True, generator=g) for _ in range(sequences)]
    return padded_batches(seqs, 0, batch)
