"""Writing files so that nothing the user had is lost.

Every output is written to a temporary name beside its target and moved into place with
``os.replace``; output folders are built in a staging folder and swapped in at the end,
so a failed or interrupted run leaves the previous results intact.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from potion.errors import PotionError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and then move the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp creates 0600; outputs follow the umask like any other file the user writes
        os.chmod(tmp, 0o666 & ~current_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    # numpy scalars and arrays appear in reports; json cannot encode them natively.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot encode {type(o).__name__} as JSON")


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _os_problem(e: OSError) -> str:
    return e.strerror or type(e).__name__


def make_dirs(path: str | os.PathLike, what: str, flag: str = "--out") -> Path:
    """``mkdir -p`` that says in one line which location cannot be created and why."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PotionError(f"cannot create {what} {path} ({_os_problem(e)}); choose a writable {flag}") from None
    return path


def check_writable_file(path: str | os.PathLike, what: str, flag: str = "--out") -> Path:
    """Fail before any compute when ``path`` could not be written later."""
    path = Path(path)
    if path.is_dir():
        raise PotionError(f"{what} {path} is a folder; give {flag} a file name")
    make_dirs(path.parent, f"the folder of {what}", flag)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as e:
        raise PotionError(f"cannot write {what} {path} ({_os_problem(e)}); choose a writable {flag}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output folder unless ``overwrite`` is set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PotionError(f"output path {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PotionError(
            f"output folder {out} already exists and is not empty; "
            "choose another --out or pass --overwrite to replace it"
        )
    return out


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``out`` so that a second writer fails at once.

    ``flock`` is released by the kernel when the process dies, however it dies, so a
    stale lock file never blocks the next run. The file is removed on release; a writer
    that locked a file someone else just removed notices (its inode is gone) and stops.
    """
    out = Path(out).absolute()
    make_dirs(out.parent, "the folder of the output", "--out")
    lock = out.parent / f".{out.name}.lock"
    busy = PotionError(
        f"another potion process is writing {out} (it holds {lock}); wait for it to finish or choose another --out"
    )
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise PotionError(f"cannot write beside {out} ({_os_problem(e)}); choose a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise busy from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise busy
        try:
            yield lock
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder that replaces ``out`` only if the block succeeds.

    A lock beside ``out`` keeps a second writer away for the whole block; the staging
    folder is created first, so an unwritable location fails before any compute.
    ``overwrite`` replaces ``out`` as a whole: nothing of the old folder survives.
    """
    out = Path(out).absolute()
    with output_lock(out):
        clean_stale_stages(out.resolve())
        out = check_output_dir(out, overwrite).resolve()
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
            os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes 0700
        except OSError as e:
            raise PotionError(f"cannot write output folder {out} ({_os_problem(e)}); choose a writable --out") from None
        try:
            yield stage
        except BaseException:
            from potion.interrupts import deferred

            with deferred():  # a second Ctrl-C must not leave half a staging folder
                shutil.rmtree(stage, ignore_errors=True)
            raise
        from potion.interrupts import deferred

        with deferred():  # the swap is two renames: let no signal fall between them
            backup = None
            if out.exists():
                backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                backup.rmdir()
                os.replace(out, backup)
            os.replace(stage, out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def clean_stale_stages(out: Path, quiet: bool = False) -> list[Path]:
    """Remove what a writer of ``out`` that died (SIGKILL, OOM, a lost Ray node) left beside
    it; the caller holds ``out``'s lock, so no live writer owns any of it.

    A staging folder is half-built output and goes. A backup (``.old-``) is the previous
    ``out`` moved aside for the swap: when ``out`` is missing, the writer died between the
    two renames and the backup is put back, otherwise the swap finished and it goes.
    Returns the removed folders.
    """
    removed = []
    name = glob.escape(out.name)
    for old in sorted(out.parent.glob(f".{name}.old-*")):
        if not out.exists():
            os.replace(old, out)
            if not quiet:
                print(f"potion: note: restored {out} from {old.name}, left by a run that died while replacing it",
                      file=sys.stderr)
        else:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    for stage in sorted(out.parent.glob(f".{name}.staging-*")):
        shutil.rmtree(stage, ignore_errors=True)
        removed.append(stage)
    if removed and not quiet:
        print(f"potion: note: removed {', '.join(p.name for p in removed)} beside {out}, left by a run that "
              "was stopped", file=sys.stderr)
    return removed


def refuse_overlap(out: str | os.PathLike, protected: str | os.PathLike, what: str) -> None:
    """Refuse an output folder that is, contains, or lies inside an input: replacing it
    (``--overwrite``) would delete the input."""
    o, p = Path(out).resolve(), Path(protected).resolve()
    if o == p or p in o.parents:
        raise PotionError(f"--out {out} lies inside {what} {protected}; write the result to another folder")
    if o in p.parents:
        raise PotionError(f"--out {out} contains {what} {protected}; write the result to another folder")


def refuse_inside(out: str | os.PathLike, protected: str | os.PathLike, what: str) -> None:
    """Refuse an output folder that is, or lies inside, a folder that must stay untouched."""
    o, p = Path(out).resolve(), Path(protected).resolve()
    if o == p or p in o.parents:
        raise PotionError(f"--out {out} lies inside {what} {protected}; write the result to another folder")
