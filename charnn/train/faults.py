"""Fault injection for the reliability tests: failures at exact points of a real run.

    CHARNN_FAULTS="kill@15:1,kill-in-checkpoint@20,raise@21"  CHARNN_FAULT_DIR=/some/dir

``kill@S[:R]`` SIGKILLs the worker of rank R (any rank if omitted) after step S;
``kill-in-checkpoint@S[:R]`` does so while it writes the checkpoint of step S, after its
files are saved and before Ray Train has them; ``raise@S[:R]`` raises an error after step S;
``pause@S[:R]`` sleeps CHARNN_FAULT_PAUSE_S seconds (default: an hour) once step S is done,
checkpoint included, so that a test can stop the job, the store or the worker's node at a known
point.  Each fault fires once: a marker in CHARNN_FAULT_DIR remembers it across worker restarts;
it holds the pid of the worker that fired it (a test finds the paused worker's node by it).
Unset, this costs one dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal
import time


class InjectedFault(RuntimeError):
    pass


def inject(point: str, step: int, rank: int) -> None:
    faults = os.environ.get("CHARNN_FAULTS")
    if not faults:
        return
    for fault in faults.split(","):
        kind, _, where = fault.strip().partition("@")
        at_step, _, at_rank = where.partition(":")
        if kind != point or int(at_step) != step or (at_rank and int(at_rank) != rank):
            continue
        marker = os.path.join(os.environ["CHARNN_FAULT_DIR"], fault.strip().replace("@", "-").replace(":", "-"))
        try:
            with open(marker, "x") as f:
                f.write(str(os.getpid()))
        except FileExistsError:
            continue  # fired before this restart
        if kind == "raise":
            raise InjectedFault(f"injected fault {fault} on rank {rank}")
        if kind == "pause":
            time.sleep(float(os.environ.get("CHARNN_FAULT_PAUSE_S", 3600)))
            return
        os.kill(os.getpid(), signal.SIGKILL)
