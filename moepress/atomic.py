"""Write a whole output folder or nothing: build it in a temporary sibling, then rename into place.

Temporary siblings are named `OUT.tmp-<pid>-<random>` (and `OUT.old-<pid>-<random>` while an existing
output is replaced), so that a later run can tell the leftovers of a killed writer (SIGKILL, out of
memory, power loss: no cleanup code runs) from a folder another live process is still writing.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moepress.errors import MoepressError


class DiskFullError(MoepressError):
    """The disk filled up while an output was written (and the partial folder was removed)."""

    def __init__(self, out: Path):
        super().__init__(f"disk full while writing {out}; free space and retry (nothing was written)")


def check_output(out: str | Path, overwrite: bool = False, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse outputs that would clobber an input or an existing result, before any work starts."""
    out = Path(out).expanduser()
    for src in inputs:
        if src is not None and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise MoepressError(f"output {out} is the input; choose another output folder")
    if out.exists() and not out.is_dir():
        raise MoepressError(f"output {out} is a file, not a folder; choose another output folder")
    if out.exists() and not overwrite:
        raise MoepressError(f"output {out} already exists; pass --overwrite or choose another folder")
    check_parent(out)
    return out


def check_output_file(
    path: str | Path,
    overwrite: bool = False,
    what: str = "output file",
    example: str = "out.html",
    make_parents: bool = False,
) -> Path:
    """`check_output` for a single file (a plan, a report page): not a folder, not an existing file
    unless `overwrite`, in a folder that exists (or, `make_parents`, can be made) and can be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MoepressError(f"{what} {path} is a folder; give a file name such as {path / example}")
    if path.exists() and not overwrite:
        raise MoepressError(f"{what} {path} already exists; pass --overwrite or choose another name")
    check_parent(path, what, make_parents)
    return path


def check_parent(out: Path, what: str = "output", make_parents: bool = False) -> None:
    """The folder `out` goes into exists (or, `make_parents`, its nearest existing ancestor does), is a
    folder (no regular file on the way) and is writable."""
    parent = out.resolve().parent
    for p in (parent, *parent.parents):  # the nearest existing folder on the way must not be a file
        if p.exists():
            if not p.is_dir():
                raise MoepressError(
                    f"{what} {out} cannot be written: {p} is a file, not a folder; choose another {what} path"
                )
            if make_parents:
                parent = p
            break
    if not parent.exists():
        raise MoepressError(f"{what}'s parent folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise MoepressError(f"cannot write in {parent} (read-only or no permission); choose another {what}")


def sibling(out: Path, kind: str) -> Path:
    """`OUT.<kind>-<pid>-<random>`: the pid lets a later run tell a dead writer's leftovers."""
    return out.with_name(f"{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def remove_stale_siblings(out: Path) -> None:
    """Delete `OUT.tmp-*` folders whose writer process no longer exists, and such `OUT.old-*` ones once
    `OUT` exists (killed between its two renames, the old folder is the only complete copy left)."""
    for kind in ("tmp", "old") if out.exists() else ("tmp",):
        for p in out.parent.glob(f"{glob.escape(out.name)}.{kind}-*"):
            pid = p.name[len(out.name) + len(kind) + 2:].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out`, on any failure it is removed."""
    out = check_output(out, overwrite)
    remove_stale_siblings(out)
    tmp = sibling(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise DiskFullError(out) from None
        raise
    except DiskFullError:  # from a writer nested in this one: name this (the user's) folder, not its temp
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = sibling(out, "old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
