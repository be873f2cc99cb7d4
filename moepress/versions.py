"""The installed transformers release as (major, minor): the lowest layer, so that `modules/` and
`models/` can both ask it without importing each other."""

from __future__ import annotations

import re


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: `5.24.0.dev0` has the families of 5.24."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def transformers_release() -> tuple[int, int]:
    import transformers

    return release(transformers.__version__)
