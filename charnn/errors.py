"""charnn's own errors: one base class, and the kinds that decide a job's exit status.

Every message is one line that names the problem and the fix.  ``UserError`` is the user's to
fix (a spec, a path, a corpus, a checkpoint: exit 2); ``Busy`` means another job holds what this
one needs (exit 75, EX_TEMPFAIL: a scheduler may simply try later); ``TrainingError`` is a run
that Ray Train gave up on (exit 1).  The command line maps them in one place
(``charnn.cli.runtime.execute``), whichever side of Ray they were raised on.
"""
from __future__ import annotations

import re


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped: log lines and the one-line
    error must stay one line whatever a value or path holds."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: {"\n": "\\n", "\r": "\\r", "\t": " "}.get(m.group(), f"\\x{ord(m.group()):02x}"),
                  text)


class CharnnError(Exception):
    """Base of charnn's errors; the message is one line."""

    exit_status = 1

    def __init__(self, message: str = ""):
        super().__init__(one_line(str(message)))


class UserError(CharnnError):
    """Bad input the user can fix; exit 2."""

    exit_status = 2


class Busy(CharnnError):
    """Another job holds what this one needs (the model registry's lease); exit 75."""

    exit_status = 75


class TrainingError(CharnnError):
    """Ray Train gave up on a run; the message is the first worker's error, in one line."""
