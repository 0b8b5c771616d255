"""What every entry point shares: Ray start-up, one-line errors, the JSON result line."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Callable

from charnn.config import Spec, add_spec_arguments, expand_path, spec_from_args
from charnn.errors import Busy, CharnnError, UserError
from charnn.storage import redact


class ClusterError(UserError):
    """A cluster that cannot place the spec's workers."""


def job_spec(description: str) -> Spec:
    """The spec named by --spec and --set on the command line, its storage paths made absolute
    (Ray's workers do not share the driver's working directory)."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_arguments(parser)
    spec = spec_from_args(parser.parse_args())
    spec.data.dataset_root = expand_path(spec.data.dataset_root)
    spec.run.storage = expand_path(spec.run.storage)
    return spec


def init_ray() -> bool:
    """Join the cluster in RAY_ADDRESS (or the job's own), else start an embedded local Ray;
    returns whether Ray is embedded (no other nodes will ever join)."""
    import ray

    embedded = not os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return embedded
    if embedded:
        ray.init(address="local", log_to_driver=True)  # dashboard on 127.0.0.1: Ray Train needs its state API
    else:
        ray.init(log_to_driver=True)
    protect_token()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return embedded


def protect_token() -> None:
    """Ray writes its auth token (~/.ray/auth_token, made by the first local ``ray.init``) with the
    umask and no chmod: 0644 in a 0755 ~/.ray, so any local user could submit jobs as this one.
    Make ~/.ray 0700 and the token 0600 (and RAY_AUTH_TOKEN_PATH's file, if set), where they exist
    and are this user's to change."""
    import contextlib
    from pathlib import Path

    home = Path.home() / ".ray"
    for path, mode in ((home, 0o700), (home / "auth_token", 0o600),
                       *(((Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser(), 0o600),)
                         if os.environ.get("RAY_AUTH_TOKEN_PATH") else ())):
        with contextlib.suppress(OSError):  # absent, or not ours (a mounted Secret): left as it is
            if path.exists() and (path.stat().st_mode & 0o777) != mode:
                path.chmod(mode)


def require_workers(cluster, embedded: bool) -> None:
    """Fail fast when the cluster cannot place the spec's workers, where Ray Train would wait
    for them forever; a remote cluster may autoscale, so it gets cluster.resource_timeout_s."""
    import ray

    need = {"CPU": cluster.num_workers * cluster.cpus_per_worker, "GPU": cluster.num_workers if cluster.use_gpu else 0}
    deadline = time.monotonic() + (0 if embedded else cluster.resource_timeout_s)
    while True:
        have = ray.cluster_resources()
        short = {k: v for k, v in need.items() if v and have.get(k, 0) < v}
        if not short:
            return
        wants = ", ".join(f"{v} {k} (it has {have.get(k, 0):g})" for k, v in short.items())
        if time.monotonic() >= deadline:
            fix = "set cluster.use_gpu=false or use a cluster with GPUs" if "GPU" in short else \
                "lower cluster.num_workers or cluster.cpus_per_worker"
            raise ClusterError(f"the cluster cannot place {cluster.num_workers} workers: they need {wants}; {fix}")
        logging.getLogger("charnn").info("waiting for the cluster to offer %s", wants)
        time.sleep(5)


def print_result(result: dict) -> None:
    """The last stdout line: one JSON object that schedulers read."""
    print(redact(json.dumps(result, sort_keys=True)), flush=True)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `ray job stop` sends SIGTERM: unwind, so leases and temp files are released


def execute(run: Callable[[], dict | None]) -> None:
    """Run a command: one-line errors and their exit codes, the JSON result line last."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RedactingFormatter("%(name)s: %(message)s"))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run()
    except CharnnError as exc:  # one line, and the exit status its kind decides
        print(f"charnn: {'busy' if isinstance(exc, Busy) else 'error'}: {redact(str(exc))}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_status)
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
