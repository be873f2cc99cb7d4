"""COPA prompts, as lm-evaluation-harness's own task builds them, so local scores match its numbers."""

from __future__ import annotations


def _choice(text: str) -> str:
    # the choice continues the premise's sentence: "The man fell because" + " he slipped."; lm-eval then
    # puts its target delimiter (a space) before it, so two spaces are scored, as in lm-eval's own numbers
    return " " + text[0].lower() + text[1:]


def doc_to_text(doc: dict) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # [:-1] drops the premise's full stop


def doc_to_target(doc: dict) -> str:
    return _choice(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def doc_to_choice(doc: dict) -> list[str]:
    return [_choice(doc["choice1"]), _choice(doc["choice2"])]
