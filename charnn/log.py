"""What charnn says: ``say`` for its own progress lines, ``print0`` for those one rank says for all,
and module-named loggers (``logger``) for warnings, which the command line's handler redacts."""
from __future__ import annotations

import logging
import sys


def say(message: str) -> None:
    """A progress line, written past Ray Train's print patch (which would echo it twice)."""
    print(message, file=sys.__stdout__, flush=True)


def print0(message: str, rank: int) -> None:
    """``say``, on rank 0 only: a line about the whole run, which every rank knows."""
    if rank == 0:
        say(message)


def logger(module: str) -> logging.Logger:
    """The logger of a charnn module, named after it (``charnn.checkpoint``, ...)."""
    return logging.getLogger(module)
