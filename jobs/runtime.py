"""What every entry point shares: Ray start-up, one-line errors, the JSON result line."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Callable

from jobs.spec import SpecError
from pipeline.alphabet import AlphabetError
from pipeline.build import PipelineError
from pipeline.layout import LayoutError
from pipeline.reader import DatasetError
from pipeline.storage import StorageError
from train.checkpoint import CheckpointError
from train.generate import GenerateError
from train.registry import RegistryBusy, RegistryError
from train import TrainingError

# Errors that the user can fix: one line on stderr and exit 2, no traceback.
USER_ERRORS = (SpecError, AlphabetError, PipelineError, LayoutError, DatasetError, StorageError, CheckpointError,
               GenerateError, RegistryError)
BUSY_EXIT = 75  # EX_TEMPFAIL: another job holds the model registry; a scheduler may simply try later


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (or the job's own), else start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", log_to_driver=True)  # dashboard on 127.0.0.1: Ray Train needs its state API
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def print_result(result: dict) -> None:
    """The last stdout line: one JSON object that schedulers read."""
    print(json.dumps(result, sort_keys=True), flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `ray job stop` sends SIGTERM: unwind, so leases and temp files are released


def main(run: Callable[[], dict | None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run()
    except RegistryBusy as exc:
        print(f"charnn: busy: {exc}", file=sys.stderr, flush=True)
        sys.exit(BUSY_EXIT)
    except USER_ERRORS as exc:
        print(f"charnn: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingError as exc:
        print(f"charnn: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("charnn: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    if result is not None:
        _stop_ray()  # workers' forwarded log lines would otherwise land after the result line
        print_result(result)


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
