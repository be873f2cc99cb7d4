"""Rich progress bars for every long loop; quiet when not on a terminal (CI, tests)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on an interactive terminal, plainly otherwise."""
    if not sys.stderr.isatty() or os.environ.get("MOEPRESS_QUIET"):
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, total=total, transient=True)
