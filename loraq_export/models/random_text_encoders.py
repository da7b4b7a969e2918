"""Text encoders with seeded random weights and tokenizers built in code (no download), for the
pipelines loraq supports: T5 (PixArt-Sigma) and Gemma-2 (SANA).

The tokenizers are the real classes with a small vocabulary of English word pieces:

- T5 is a SentencePiece *Unigram* model: each piece carries a log-probability score, and the
  tokenizer picks the segmentation with the highest total score. Here whole words score by a
  Zipf-like rank (frequent words higher), suffixes and single characters lower, so a known word is
  one piece and an unknown one splits into suffixes / characters
  (transformers ``models/t5/tokenization_t5.py``: ``T5Tokenizer(vocab=[(piece, score), ...])``).
- Gemma is a SentencePiece *BPE* model with byte fallback: merges are applied in list order (the
  order of merge frequency in training). Here each word is built by merging its prefix with its next
  character, words in frequency order; byte tokens ``<0x00>..<0xFF>`` catch any other character
  (transformers ``models/gemma/tokenization_gemma.py``: ``GemmaTokenizer(vocab={token: id},
  merges=[...])``).

Both spell words with SentencePiece's word-start marker U+2581 ("▁"), as the published models do.
"""
from __future__ import annotations

import torch

# Frequent English words and words of image prompts, most frequent first (rank gives the score).
WORDS = (
    "a the of and in on with to is at by for an from as it its this that are be or over under near "
    "photo picture painting drawing image portrait illustration render close up view shot of "
    "cat dog bird horse fish cow fox owl bear lion tiger wolf rabbit mouse duck frog deer elephant "
    "man woman child girl boy person people family friend king queen knight robot astronaut "
    "house city street road bridge tower castle village garden park forest tree trees flower flowers "
    "mountain mountains river lake sea ocean beach island desert sky cloud clouds sun moon star stars "
    "rain snow storm fog night day morning evening sunset sunrise light shadow water fire ice stone "
    "red blue green yellow orange purple pink black white gray brown golden silver dark bright "
    "small big large tiny huge old new young beautiful cute happy sad calm wild quiet "
    "sitting standing running walking flying swimming sleeping reading eating playing looking holding "
    "table chair window door room wall floor book cup car boat train bicycle hat coat dress glasses "
    "style detailed realistic cinematic lighting soft sharp focus high quality art oil watercolor "
    "digital anime studio lens wide angle background foreground colorful vintage modern futuristic "
    "very two three one many some all no not but has have while into through above below behind"
).split()
SUFFIXES = ("s", "es", "ed", "ing", "er", "est", "ly", "y", "ful", "ness", "tion", "al", "ish", "en")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&"
SP = "\u2581"  # SentencePiece word-start marker


def _unique(seq):
    return list(dict.fromkeys(seq))


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability score) in T5's layout: <pad>, </s>, <unk>, then the pieces (the
    tokenizer appends its 100 ``<extra_id_*>`` sentinels itself)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (SP, -3.0)]
    for rank, word in enumerate(_unique(WORDS)):
        pieces.append((SP + word, round(-4.0 - 0.02 * rank, 4)))  # Zipf-like: log p falls with rank
    for i, suffix in enumerate(SUFFIXES):
        pieces.append((suffix, round(-9.0 - 0.1 * i, 4)))
    for i, ch in enumerate(CHARS):
        pieces.append((ch, round(-11.0 - 0.05 * i, 4)))
        pieces.append((SP + ch, round(-12.0 - 0.05 * i, 4)))
    first: dict[str, float] = {}
    for piece, score in pieces:  # a piece listed twice (the word "a" and the character) keeps its first score
        first.setdefault(piece, score)
    return list(first.items())


def build_t5_tokenizer(model_max_length: int = 512):
    """A T5 (Unigram) tokenizer over ``t5_vocab()``; prompts tokenize into several pieces."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(), model_max_length=model_max_length)


def gemma_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma's layout: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4, the Gemma chat-turn markers,
    the 256 byte-fallback tokens, single characters, then one token per merge."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += [SP, *CHARS]
    merges: list[tuple[str, str]] = []
    # Words after a space ("▁cat"), then at the start of the text ("cat": Gemma prepends no space), then suffixes.
    for word in _unique([SP + w for w in WORDS] + list(WORDS) + list(SUFFIXES)):
        for k in range(1, len(word)):  # prefix + next character, left to right
            pair = (word[:k], word[k])
            if pair not in merges:
                merges.append(pair)
            tokens.append(word[: k + 1])
    vocab = {tok: i for i, tok in enumerate(_unique(tokens))}
    return vocab, merges


def build_gemma_tokenizer(model_max_length: int = 8192):  # Gemma-2 context length
    """A Gemma (BPE, byte fallback) tokenizer over ``gemma_vocab_and_merges()``."""
    from transformers import GemmaTokenizerFast

    vocab, merges = gemma_vocab_and_merges()
    return GemmaTokenizerFast(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True)


def _seeded(build, seed: int):
    """Call ``build()`` with torch's global generator seeded (transformers draws its initial weights
    from it), without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().float().eval()


# Tiny text-encoder configs (hidden size = the tiny transformers' caption_channels, 32).
TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
           "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0}  # gated-gelu: T5 v1.1, as t5-v1_1-xxl
TINY_GEMMA2 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 2048,
               "sliding_window": 64, "query_pre_attn_scalar": 16}


def build_t5_encoder(config: dict | None = None, seed: int = 0, vocab_size: int | None = None):
    """``T5EncoderModel`` (float32, eval) with seeded random weights; ``config`` overrides
    ``TINY_T5``; ``vocab_size`` defaults to the size of ``build_t5_tokenizer()``."""
    from transformers import T5Config, T5EncoderModel

    kwargs = {**TINY_T5, **(config or {})}
    kwargs.setdefault("vocab_size", vocab_size or len(build_t5_tokenizer()))
    cfg = T5Config(**kwargs, is_encoder_decoder=False, use_cache=False)
    return _seeded(lambda: T5EncoderModel(cfg), seed)


def build_gemma2_encoder(config: dict | None = None, seed: int = 0, vocab_size: int | None = None):
    """``Gemma2Model`` (float32, eval) with seeded random weights; ``config`` overrides
    ``TINY_GEMMA2``; ``vocab_size`` defaults to the size of ``build_gemma_tokenizer()``."""
    from transformers import Gemma2Config, Gemma2Model

    kwargs = {**TINY_GEMMA2, **(config or {})}
    kwargs.setdefault("vocab_size", vocab_size or len(build_gemma_tokenizer()))
    cfg = Gemma2Config(**kwargs, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return _seeded(lambda: Gemma2Model(cfg), seed)
