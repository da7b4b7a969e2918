"""Which token prior makes a text encoder's data-free input statistics most useful.

    python tools/text_encoder_priors.py --train TRAIN.txt --eval EVAL.txt [--width 256 --layers 4 --vocab 2000]

No published T5 / Gemma tokenizer or weights can be downloaded here, so the measurement is built
from what a tokenizer learns from real text: a SentencePiece-style Unigram tokenizer (T5's kind,
with its learned log-probability scores) and a BPE tokenizer (Gemma's kind, with its learned merge
order) are trained with the ``tokenizers`` library on TRAIN (one sentence per line), and a T5
encoder / Gemma-2 model with seeded random weights is built over each vocabulary. For each prior
(token_priors.PRIORS) the input statistics are gathered on synthetic sequences alone, loraq fits
the layers with them, and the quantized encoder is compared with FP on the sentences of EVAL
(hidden-state cosine per real token, as the export report measures); RTN, which reads no
statistics, is the floor. EVAL must not overlap TRAIN. Random weights make this a measurement
of how well each prior's token distribution matches real text's (the layers' input covariance is
a frequency-weighted sum over token embeddings), not of a trained encoder's quality.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..")]
from loraq_export.evaluate.quality import prompt_batches, text_encoder_quality, token_states  # noqa: E402
from loraq_export.fit.parallel import fit_layers  # noqa: E402
from loraq_export.fit.prepare import prepare_fit  # noqa: E402
from loraq_export.fit.recipes import load_recipe  # noqa: E402
from loraq_export.fit.swap import quantized  # noqa: E402
from loraq_export.models.text_encoders import build_from_config, make_text_encoder_model  # noqa: E402

SP = "\u2581"


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [s.strip() for s in f if s.strip()]


def train_unigram_t5(lines: list[str], vocab: int):
    """A T5 tokenizer (transformers T5TokenizerFast) over a Unigram vocabulary learned from ``lines``."""
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP)
    tok.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>", "<unk>"],
                                                           unk_token="<unk>"))
    pieces = [(p, s) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=pieces)


def train_bpe_gemma(lines: list[str], vocab: int):
    """A Gemma tokenizer (transformers GemmaTokenizerFast) over BPE merges learned from ``lines``."""
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP)
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return GemmaTokenizerFast(vocab=model["vocab"], merges=merges)


def distribution_match(tokenizer, prior: str, texts: list[str]) -> tuple[float, float]:
    """(cross-entropy in bits of the real tokens of ``texts`` under the prior, total variation
    distance between the prior and their empirical frequencies), over the ordinary tokens."""
    from collections import Counter
    from loraq_export.models.token_priors import token_prior
    ids, probs, _ = token_prior(tokenizer, prior)
    p = dict(zip(ids.tolist(), probs.tolist()))
    counts = Counter(i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"] if i in p)
    n = sum(counts.values())
    ce = -sum(c * torch.log2(torch.tensor(max(p[i], 1e-300))).item() for i, c in counts.items()) / n
    tv = 0.5 * sum(abs(counts.get(i, 0) / n - q) for i, q in p.items())
    return ce, tv


def encoder(kind: str, vocab: int, width: int, layers: int, seed: int):
    if kind == "t5":
        cfg = {"vocab_size": vocab, "d_model": width, "d_kv": 64, "d_ff": width * 5 // 2, "num_layers": layers,
               "num_heads": width // 64, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0}
        return build_from_config("T5EncoderModel", cfg, seed)
    cfg = {"vocab_size": vocab, "hidden_size": width, "intermediate_size": width * 4, "num_hidden_layers": layers,
           "num_attention_heads": width // 64, "num_key_value_heads": width // 128, "head_dim": 64,
           "query_pre_attn_scalar": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    return build_from_config("Gemma2Model", cfg, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--recipe", default="w4a16-g64-r32-w8a8")
    ap.add_argument("--seeds", type=int, default=3, help="encoder weight seeds (medians over them)")
    args = ap.parse_args()
    train, evaluate = read_lines(args.train), read_lines(args.eval)
    if set(train) & set(evaluate):
        sys.exit("--train and --eval overlap; use disjoint sentence files")
    recipe = load_recipe(args.recipe, None)
    print(f"tokenizers trained on {len(train)} sentences ({args.train}); evaluated on {len(evaluate)} ({args.eval}); "
          f"random-weight encoders width {args.width}, {args.layers} layers; recipe {args.recipe}")
    for kind, tokenizer in (("t5", train_unigram_t5(train, args.vocab)), ("gemma2", train_bpe_gemma(train, args.vocab))):
        priors = ["auto", "rank", "uniform"]
        for prior in priors:
            ce, tv = distribution_match(tokenizer, prior, evaluate)
            print(f"  {kind} {prior:>8} prior vs the tokens of --eval: cross-entropy {ce:.2f} bits/token, "
                  f"total variation {tv:.3f}")
        rows: dict[str, list[float]] = {p: [] for p in priors + ["rtn (no statistics)"]}
        for seed in range(args.seeds):
            module = encoder(kind, len(tokenizer), args.width, args.layers, seed)
            for prior in priors + ["rtn (no statistics)"]:
                rtn = prior.startswith("rtn")
                loaded = make_text_encoder_model(module, tokenizer, kind, prior="auto" if rtn else prior)
                fp = token_states(loaded.wrapper, prompt_batches(loaded, texts=evaluate))
                r = recipe.with_method("rtn") if rtn else recipe
                t = time.perf_counter()
                r, plans, _ = prepare_fit(loaded, r, seed, fold=False)
                records = fit_layers(loaded.module, plans, r.method, seed=seed, workers=1, progress=False)
                with quantized(loaded.module, records):
                    q = text_encoder_quality(loaded, fp, texts=evaluate)["torch"]
                rows[prior].append(1 - q["mean"])
                print(f"  {kind} seed {seed} {prior:>20}: 1 - cosine {1 - q['mean']:.5f}  ({time.perf_counter() - t:.1f} s)",
                      flush=True)
        from statistics import median
        name = {"t5": "Unigram scores", "gemma2": "BPE merge order"}[kind]
        print(f"{kind} ({tokenizer.__class__.__name__}, vocab {len(tokenizer)}), median 1 - cosine over {args.seeds} seeds:")
        for p, v in rows.items():
            label = f"auto ({name})" if p == "auto" else p
            print(f"  {label:>28}: {median(v):.5f}   ratio to auto {median(v) / median(rows['auto']):.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
