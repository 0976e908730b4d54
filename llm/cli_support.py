"""What every LLM subcommand shares: strict argument parsing (no abbreviations; an unknown
option named with the closest real one), the output-folder guard, quiet progress bars, and the
one-line error of a user mistake (llm/cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
import typing
from dataclasses import fields


def fail(msg: str) -> int:
    print(f"scalebio: error: {msg}", file=sys.stderr)
    return 2


def parser(**kw) -> argparse.ArgumentParser:
    """An argument parser that takes no abbreviation of an option."""
    return argparse.ArgumentParser(allow_abbrev=False, **kw)


def output_flags(p: argparse.ArgumentParser, resume: bool = False) -> None:
    """The flags every writing subcommand shares (an existing output folder is never reused
    silently)."""
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint "
                       "(refused if the config changed, except the run length, checkpointing, "
                       "threads, caches and the layout over ranks: world size, torch engine kind)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (the old one is kept until the new "
                   "run has a checkpoint or its outputs, and put back if it fails)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars at all")


def dataclass_flags(p: argparse.ArgumentParser, cls) -> None:
    """One ``--name`` flag per field of the dataclass ``cls`` (``proj_dim`` -> ``--proj-dim``):
    its default, its type (``X | None`` -> X), and the help and choices in its metadata."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                    if t is not type(None))
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       help=f.metadata.get("help"), choices=f.metadata.get("choices"))


def known_and_overrides(p: argparse.ArgumentParser, argv: list[str]):
    """(parsed options, ``--section.key value`` overrides); an unknown ``--option`` that is not a
    config key is refused here, with the closest real option."""
    args, extra = p.parse_known_args(argv)
    for flag in extra[::2]:
        if flag.startswith("--") and "." not in flag:
            options = sorted(p._option_string_actions)
            close = [o for o in options if o.startswith(flag)] or difflib.get_close_matches(
                flag, options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UnknownOption(f"{p.prog}: unknown option {flag}{hint}; config values are "
                                "given as --section.key value")
    return args, extra


class UnknownOption(ValueError):
    """An ``--option`` the command does not have (abbreviations included)."""


@contextlib.contextmanager
def bars(progress: bool):
    """With ``progress`` off, silence the progress bars of transformers (loading, saving),
    datasets and huggingface_hub too, for the block only."""
    if progress:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf_logging

    was = (datasets.is_progress_bar_enabled(), hub.are_progress_bars_disabled(),
           hf_logging.is_progress_bar_enabled())
    datasets.disable_progress_bars()
    hub.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            datasets.enable_progress_bars()
        if not was[1]:
            hub.enable_progress_bars()
        if was[2]:
            hf_logging.enable_progress_bar()


def guarded(call, *, protect=(), progress: bool = True, errors: tuple = ()):
    """``(call(), 0)``, or ``(None, 2)`` after one error line for a user error (a bad config,
    data file or output folder, a diverged run, an OS error such as a permission denied), or
    ``(None, 130)`` on Ctrl-C. Inside :func:`run_folder.guard`: the config file (in
    ``protect``) counts as an input, a failed ``--overwrite`` puts the old run back, and the
    locks are released."""
    from scalebio.llm import run_folder
    from scalebio.llm.config import ConfigError
    from scalebio.llm.data.sources import DataError

    user_errors = (ConfigError, DataError, run_folder.OutputError, FloatingPointError, OSError,
                   UnknownOption, *errors)
    try:
        with run_folder.guard([p for p in protect if p is not None]), bars(progress):
            return call(), 0
    except user_errors as e:
        return None, fail(str(e))
    except KeyboardInterrupt:
        print("scalebio: interrupted", file=sys.stderr)
        return None, 130
