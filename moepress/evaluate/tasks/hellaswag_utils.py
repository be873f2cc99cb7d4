"""HellaSwag row clean-up, as lm-evaluation-harness's own task does it, so local scores match its numbers."""

from __future__ import annotations

import re


def preprocess(text: str) -> str:
    # " [title]" and other bracketed tags are artefacts of the WikiHow part of the data
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def process_docs(dataset):
    def one(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)
