"""WinoGrande's partial scoring, as lm-evaluation-harness's own task does it, so local scores match its
numbers. lm-eval reads an integer from doc_to_text as "the choices are the contexts; this one is gold",
so doc_to_text returns the answer's index and doc_to_choice the two filled-in sentence beginnings."""

from __future__ import annotations


def doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[str(doc["answer"])]  # the dataset stores "1"/"2" as strings


def doc_to_target(doc: dict) -> str:
    blank = doc["sentence"].index("_") + 1
    return doc["sentence"][blank:].strip()


def doc_to_choice(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
