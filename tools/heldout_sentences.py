"""Held-out English sentences for quality checks, from text this machine already has: the long
descriptions of the installed Python packages (their METADATA files), which no recipe, prior or
test of loraq has seen.

    python tools/heldout_sentences.py heldout.txt              # 256 sentences
    python tools/heldout_sentences.py heldout.txt --count 512 --seed 2
    loraq bench minilm --sentences heldout.txt ...

A sentence is kept when it is 40-300 characters long, starts with a capital letter followed by a
lower-case one, ends with . ! or ?, and carries no markup (URLs, backticks, brackets, table or
heading characters). Lines of the bundled evaluation set (loraq_export/data/sentences.txt) are left
out. The candidates are sorted, shuffled with ``random.Random(seed)`` and the first ``count``
written, so the same installed packages give the same file; another set of packages gives another
draw of the same kind of text, which is what a held-out check wants.
"""
from __future__ import annotations

import argparse
import email.parser
import os
import random
import re
import site
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loraq_export.store.outputs import write_bytes_atomic  # noqa: E402

BUNDLED = REPO / "loraq_export" / "data" / "sentences.txt"
MARKUP = re.compile(r"https?:|www\.|[<>{}\[\]|`#*=_\\]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def descriptions(dirs: list[str]) -> list[str]:
    """The long description of every installed distribution found under ``dirs``."""
    out = []
    for d in dirs:
        for meta in sorted(Path(d).glob("*.dist-info/METADATA")):
            try:
                msg = email.parser.Parser().parsestr(meta.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
            body = msg.get_payload()
            if isinstance(body, str) and body.strip():
                out.append(body)
    return out


def sentences(text: str) -> list[str]:
    kept = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for s in SENTENCE_END.split(flat):
            if (40 <= len(s) <= 300 and re.match(r"[A-Z][a-z]", s) and s[-1] in ".!?"
                    and not MARKUP.search(s)):
                kept.append(s)
    return kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="file to write, one sentence per line")
    ap.add_argument("--count", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.count < 1:
        print("error: --count must be at least 1", file=sys.stderr)
        return 2
    bundled = set(BUNDLED.read_text(encoding="utf-8").splitlines()) if BUNDLED.exists() else set()
    dirs = [d for d in {*site.getsitepackages(), site.getusersitepackages()} if os.path.isdir(d)]
    pool = sorted({s for text in descriptions(dirs) for s in sentences(text)} - bundled)
    if len(pool) < args.count:
        print(f"error: only {len(pool)} sentences found in the installed packages' descriptions; "
              f"ask for --count {len(pool)} or fewer", file=sys.stderr)
        return 1
    random.Random(args.seed).shuffle(pool)
    out = Path(args.out)
    write_bytes_atomic(out, ("\n".join(pool[:args.count]) + "\n").encode("utf-8"))
    print(f"{args.count} of {len(pool)} sentences -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
