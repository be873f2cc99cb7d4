"""Cut {"prompt", "answer"} pairs for `moepress finetune --sft` from calibration text, deterministically.

Each document of the calibration .jsonl (never the dev text: ../shared/data/tasks is cut from dev.jsonl)
is split into sentences; a pair is 1-3 consecutive sentences (at most --max-prompt characters) as the
prompt and the sentence that follows as the answer (--min-answer to --max-answer characters, the
prompt ending with a space so the answer continues it), i.e. next-sentence completion. Pairs
do not overlap; at most --per-doc pairs come from one document, taken in file order, and when more
than --max-pairs result an evenly spaced subset is kept. No randomness: the same file gives the same
pairs.

    python bench/sft_pairs.py --data ../shared/data/calib.jsonl -o bench/results/sft_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
    """Sentences of a document, whitespace collapsed (a rough splitter: end punctuation, space, capital)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if para:
            out.extend(s.strip() for s in _SENTENCE_END.split(para) if s.strip())
    return out


def doc_pairs(text: str, per_doc: int, max_prompt: int, min_answer: int, max_answer: int,
              context: int = 3) -> list[dict]:
    """Non-overlapping (context sentences -> next sentence) pairs of one document, in order."""
    sents = sentences(text)
    pairs: list[dict] = []
    i = 0
    while i < len(sents) and len(pairs) < per_doc:
        ctx: list[str] = []
        j = i
        while j < len(sents) and len(ctx) < context and len(" ".join([*ctx, sents[j]])) <= max_prompt:
            ctx.append(sents[j])
            j += 1
        if not ctx:  # one sentence longer than the prompt limit: skip it
            i += 1
            continue
        if j >= len(sents):
            break
        answer = sents[j]
        if min_answer <= len(answer) <= max_answer:
            pairs.append({"prompt": " ".join(ctx) + " ", "answer": answer})
            i = j + 1
        else:
            i += 1
    return pairs


def cut_pairs(path: Path, per_doc: int = 8, max_pairs: int = 4000, max_prompt: int = 480,
              min_answer: int = 16, max_answer: int = 320, text_field: str = "text") -> list[dict]:
    pairs: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                pairs.extend(doc_pairs(json.loads(line)[text_field], per_doc, max_prompt, min_answer, max_answer))
    if len(pairs) > max_pairs:  # evenly spaced, so every part of the (shuffled-by-source) file stays
        pairs = [pairs[k * len(pairs) // max_pairs] for k in range(max_pairs)]
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/calib.jsonl")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--per-doc", type=int, default=8)
    ap.add_argument("--max-pairs", type=int, default=4000)
    ap.add_argument("--max-prompt", type=int, default=480, help="characters")
    ap.add_argument("--min-answer", type=int, default=16, help="characters")
    ap.add_argument("--max-answer", type=int, default=320, help="characters")
    args = ap.parse_args()
    if "dev" in args.data.name:
        raise SystemExit(f"{args.data} looks like held-out text; cut SFT pairs from calibration text")
    pairs = cut_pairs(args.data, args.per_doc, args.max_pairs, args.max_prompt, args.min_answer, args.max_answer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    chars = sum(len(p["answer"]) for p in pairs)
    print(f"wrote {len(pairs)} pairs ({chars:,} answer characters) from {args.data} to {args.out}")


if __name__ == "__main__":
    main()
