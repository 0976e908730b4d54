"""The output folder of a run: one writer at a time, and an ``--overwrite`` that loses nothing.

Contract (docs/safety.md):

* **Lock.** A run holds an exclusive ``flock`` on ``OUT/.scalebio.lock`` (the file names the
  holder: pid, host, start time, command). A second run on the same folder is refused with that
  line; the lock dies with its process, so a killed run never blocks the next one.
* **Inputs.** ``--overwrite`` is refused when ``OUT`` is, or contains, any input of the run
  (sources, validation files, model, tokenizer, mixture, config file).
* **Overwrite.** The old contents are *moved* into ``OUT/.scalebio-previous`` (renames inside one
  folder: instant, nothing copied). :func:`commit` deletes them once the new run has something
  to show for itself (its first checkpoint, or its final outputs); :func:`rollback` puts them
  back when the run fails before that. A run killed in between leaves them there, and the next
  run on ``OUT`` finishes the job: it restores them unless the killed run had already produced a
  checkpoint or final outputs.
* **Permissions** are checked before anything moves: ``OUT`` (or the folder that will hold it)
  and, for ``--overwrite``, every folder inside it must be writable.

State is per process: :func:`guard` (used by the CLI) commits every pending overwrite when its
block succeeds, rolls back on any exception, and releases the locks either way.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".scalebio.lock"
ASIDE_NAME = ".scalebio-previous"
# what a folder may hold and still count as empty: the lock, and the tokenised-data cache of an
# attempt that failed before its first checkpoint (its files are keyed by content, so reusing
# them only saves time)
_IGNORED = {LOCK_NAME}
_REUSABLE = {"cache"}
# files or folders that show a run finished or can be resumed: once present, the old contents
# set aside are no longer needed
_PRODUCTS = ("checkpoints", "weights.json", "results.json", "model", "compare.json", "demo.json")

_locks: dict[Path, int] = {}
_pending: dict[Path, Path] = {}
_protected: list[Path] = []


class OutputError(RuntimeError):
    """The output folder cannot be used as asked (exists, not resumable, locked, …)."""


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(out: Path, overwrite: bool) -> None:
    probe = out if out.exists() else _nearest_existing(out.parent)
    if not probe.is_dir():
        raise OutputError(f"{out}: cannot be created: {probe} is not a folder")
    if not _writable(probe):
        raise OutputError(f"{out}: not writable ({probe}: permission denied)")
    if overwrite and out.is_dir():
        for folder, dirs, _ in os.walk(out):
            for d in dirs:
                if not _writable(Path(folder) / d):
                    raise OutputError(f"{out}: --overwrite cannot move the old run aside: "
                                      f"{Path(folder) / d} is not writable")


def refuse_deleting_inputs(out: Path, inputs, error=OutputError) -> None:
    """Raise ``error`` when an input file or folder lies in (or is) ``out``."""
    out = Path(out).resolve()
    inside = sorted({str(p) for p in (Path(q).resolve() for q in inputs)
                     if p == out or out in p.parents})
    if inside:
        raise error(f"--out {out}: --overwrite would delete inputs inside it: {inside}; "
                    "choose another --out")


def _lock(out: Path) -> None:
    if out in _locks:  # this process holds it already (an earlier call on the same folder)
        return
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the lock file {LOCK_NAME} "
                          f"({e.strerror})") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{out}: in use by another scalebio run ({holder}); wait for it to "
                              "end or choose another --out") from None
    when = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since {when}: "
                   f"{' '.join(sys.argv)}\n").encode(), 0)
    _locks[out] = fd


def release(out: Path) -> None:
    """Release this process's lock on ``out`` (the lock file stays: a stale file locks nothing)."""
    fd = _locks.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def _entries(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name not in _IGNORED and p.name != ASIDE_NAME)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _restore(out: Path, aside: Path) -> None:
    """Delete the failed run's files in ``out`` and move the set-aside contents back."""
    try:
        for p in _entries(out):
            _remove(p)
        for p in sorted(aside.iterdir()):
            os.rename(p, out / p.name)
        aside.rmdir()
    except OSError as e:
        log.warning("%s: could not restore the previous run from %s (%s); its files are still "
                    "there: move them back by hand", out, aside, e)


def _recover(out: Path) -> None:
    """An aside folder left by a run that is gone: finish its commit or its rollback."""
    aside = out / ASIDE_NAME
    if any((out / name).exists() for name in _PRODUCTS):
        shutil.rmtree(aside, ignore_errors=True)
        log.warning("%s: an interrupted --overwrite had already produced outputs; removed the "
                    "previous run it had set aside", out)
    else:
        _restore(out, aside)
        log.warning("%s: restored the previous run that an interrupted --overwrite had set "
                    "aside", out)


def prepare(out: Path, resume: bool, overwrite: bool, inputs=()) -> None:
    """Check, lock and (with ``overwrite``) clear the output folder ``out``.

    Refuses (:class:`OutputError`): ``resume`` with ``overwrite``; ``out`` a file or not
    writable; another run holding ``out``; ``overwrite`` when ``out`` holds one of ``inputs``
    (or a path protected by :func:`guard`); a non-empty ``out`` without ``resume`` or
    ``overwrite``; ``resume`` without ``out/checkpoints``.
    """
    if resume and overwrite:
        raise OutputError("--resume and --overwrite exclude each other")
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    _check_writable(out, overwrite)
    if overwrite:
        refuse_deleting_inputs(out, [*inputs, *_protected])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the folder ({e.strerror})") from None
    _lock(out)
    try:
        if out in _pending:  # an earlier call of this process on the same folder
            commit(out) if any((out / n).exists() for n in _PRODUCTS) else rollback(out)
        elif (out / ASIDE_NAME).exists():
            _recover(out)
        entries = _entries(out)
        if resume:
            if not (out / "checkpoints").is_dir():
                raise OutputError(f"{out}: --resume given but the folder holds no checkpoints/")
            return
        if {p.name for p in entries} <= _REUSABLE:
            return
        if not overwrite:
            raise OutputError(f"{out}: folder exists and is not empty; pass --resume to continue "
                              "that run or --overwrite to replace it")
        _set_aside(out, entries)
    except BaseException:
        release(out)
        raise


def _set_aside(out: Path, entries: list[Path]) -> None:
    aside = out / ASIDE_NAME
    aside.mkdir()
    moved = []
    try:
        for p in entries:
            os.rename(p, aside / p.name)
            moved.append(p)
    except OSError as e:
        for p in moved:
            os.rename(aside / p.name, p)
        aside.rmdir()
        raise OutputError(f"{out}: --overwrite cannot move the old run aside ({e})") from None
    _pending[out] = aside


def commit(out: Path) -> None:
    """The new run in ``out`` stands: delete the old contents it set aside (if any)."""
    aside = _pending.pop(Path(out).resolve(), None)
    if aside is not None and aside.exists():
        shutil.rmtree(aside, onerror=lambda f, p, e: log.warning(
            "could not delete %s of the replaced run (%s)", p, e[1]))


def rollback(out: Path) -> None:
    """The new run in ``out`` failed: put back the old contents it set aside (if any)."""
    out = Path(out).resolve()
    aside = _pending.pop(out, None)
    if aside is not None and aside.exists():
        _restore(out, aside)


def finish(out: Path) -> None:
    """The run in ``out`` ended well: :func:`commit` and :func:`release`."""
    commit(out)
    release(out)


@contextlib.contextmanager
def guard(protect=()):
    """Within the block, ``protect`` (e.g. the config file) counts as an input of every run;
    at its end every pending overwrite is committed (success) or rolled back (any exception,
    Ctrl-C included), and every lock this process holds is released."""
    _protected[:] = [Path(p) for p in protect]
    ok = False
    try:
        yield
        ok = True
    finally:
        _protected.clear()
        for out in list(_pending):
            commit(out) if ok else rollback(out)
        for out in list(_locks):
            release(out)
