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


class Unavailable(CharnnError):
    """Something this job needs could not be reached in time (a Ray cluster that does not answer or
    did not start); exit 75, so a scheduler tries again later."""

    exit_status = 75


def root_cause(exc: BaseException) -> BaseException:
    """The exception behind Ray's wrappers: a task's ``RayTaskError`` (``.cause``), Ray Train's
    ``WorkerGroupError`` (``.worker_failures``: the first rank that raised one of charnn's own
    errors, else the lowest rank) and ``ControllerError`` (``.controller_failure``).  Duck-typed, so
    that this base module needs no Ray."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            causes = [root_cause(failures[rank]) for rank in sorted(failures)]
            return next((c for c in causes if isinstance(c, CharnnError)), causes[0])
        inner = getattr(exc, "controller_failure", None) or getattr(exc, "cause", None)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def last_line(exc: BaseException, limit: int = 300) -> str:
    """The last non-blank line of an exception's text (where a traceback ends with the error itself),
    without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[-limit:]


def as_charnn_error(exc: BaseException, what: str) -> CharnnError:
    """charnn's own error behind ``exc`` (one line, its own exit status), else a ``TrainingError``
    saying ``what`` failed, with the cause's last line."""
    cause = root_cause(exc)
    if isinstance(cause, CharnnError):
        if type(cause).__module__.startswith("charnn."):
            return cause
        # Ray's "RayTaskError(X)" subclass, whose text is a whole traceback: the plain X, its last line
        kind = next(c for c in type(cause).__mro__ if c.__module__.startswith("charnn."))
        return kind(last_line(cause))
    return TrainingError(f"{what}: {type(cause).__name__}: {last_line(cause)}")
