"""Token sequences a BERT-family encoder's statistics can be gathered on, built from the model's
own tokenizer and no text: [CLS] w_1 .. w_L [SEP] with the words drawn from the vocabulary.

WordPiece vocabularies list their ordinary words after the special, unused and single-character
entries, in descending corpus frequency (BERT's vocab.txt: 'the', 'of', 'and', ...), so a Zipf
law over the vocabulary rank, p(rank) ~ 1 / (rank + 10), is a frequency prior read from the
tokenizer itself. Most sequences end with a sentence mark, as sentences do. Measured on MiniLM
while designing this (GPTQ at g64 on E[x x^T] of 512 sequences, end-to-end 1 - cosine on
sentences outside the repo): 0.0203 with these sequences, 0.0267 with uniformly drawn tokens
(which make every rare word-piece as likely as 'the', as real text never does).
"""
from __future__ import annotations

from typing import Optional

import torch

ZIPF_OFFSET = 10.0
LENGTHS = (6, 40)  # words per sequence, drawn uniformly
END_MARKS = (".", "?", "!")
END_PROBS = (0.8, 0.15, 0.05)
ENDED = 0.85  # share of sequences closed by a sentence mark


def first_word_id(tokenizer) -> int:
    """The first vocabulary entry that is an ordinary word (alphabetic, two characters or more, not
    a sub-word continuation): where WordPiece's frequency-ordered words begin."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    for i, t in enumerate(vocab):
        if len(t) >= 2 and t.isalpha() and i not in set(tokenizer.all_special_ids):
            return i
    raise ValueError("the tokenizer's vocabulary has no ordinary words to draw synthetic sequences from")


def synthetic_token_batches(tokenizer, sequences: int = 512, batch: int = 32, seed: int = 0,
                            ) -> list[tuple[tuple[torch.Tensor, ...], Optional[torch.Tensor]]]:
    """``sequences`` synthetic sequences in batches of (input_ids, attention_mask, token_type_ids),
    each with its token mask (the rows that are not padding)."""
    g = torch.Generator().manual_seed(seed)
    lo = first_word_id(tokenizer)
    ranks = torch.arange(tokenizer.vocab_size - lo, dtype=torch.float64)
    probs = 1.0 / (ranks + ZIPF_OFFSET)
    ends = [i for i in tokenizer.convert_tokens_to_ids(list(END_MARKS)) if i != tokenizer.unk_token_id]
    end_probs = torch.tensor(END_PROBS[:len(ends)], dtype=torch.float64)
    seqs = []
    for _ in range(sequences):
        n = int(torch.randint(LENGTHS[0], LENGTHS[1] + 1, (1,), generator=g))
        words = lo + torch.multinomial(probs, n, replacement=True, generator=g)
        if ends and float(torch.rand(1, generator=g)) < ENDED:
            words[-1] = ends[int(torch.multinomial(end_probs, 1, generator=g))]
        seqs.append(torch.cat([torch.tensor([tokenizer.cls_token_id]), words, torch.tensor([tokenizer.sep_token_id])]))
    return padded_batches(seqs, tokenizer.pad_token_id, batch, token_type_ids=True)


def padded_batches(seqs: list[torch.Tensor], pad_id: int, batch: int, token_type_ids: bool = False,
                   ) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Right-padded batches of ``seqs``: ((input_ids, attention_mask[, token_type_ids]), token mask)."""
    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)] = s
            mask[j, :len(s)] = 1
        inputs = (ids, mask, torch.zeros_like(ids)) if token_type_ids else (ids, mask)
        out.append((inputs, mask.reshape(-1).bool()))
    return out
