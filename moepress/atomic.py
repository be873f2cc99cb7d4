"""Write a whole output folder or nothing: build it in a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moepress.errors import MoepressError


def check_output(out: str | Path, overwrite: bool = False, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse outputs that would clobber an input or an existing result, before any work starts."""
    out = Path(out).expanduser()
    for src in inputs:
        if src is not None and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise MoepressError(f"output {out} is the input; choose another output folder")
    if out.exists() and not overwrite:
        raise MoepressError(f"output {out} already exists; pass --overwrite or choose another folder")
    parent = out.resolve().parent
    if not parent.exists():
        raise MoepressError(f"output's parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise MoepressError(f"cannot write in {parent} (read-only or no permission); choose another output")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out`, on any failure it is removed."""
    out = check_output(out, overwrite)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == 28:  # ENOSPC
            raise MoepressError(f"disk full while writing {out}; free space and retry (nothing was written)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
