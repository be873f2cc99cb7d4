"""RTE rows in SuperGLUE's layout (premise/hypothesis) renamed to GLUE's (sentence1/sentence2), which
lm-evaluation-harness's `rte` task reads; both layouts carry the same labels."""

from __future__ import annotations


def process_docs(dataset):
    if "premise" in dataset.column_names and "sentence1" not in dataset.column_names:
        dataset = dataset.rename_columns({"premise": "sentence1", "hypothesis": "sentence2"})
    return dataset
