"""What every entry point shares: Ray start-up, one-line errors, the JSON result line."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Callable

from charnn.config import Spec
from charnn.spec_loader import add_spec_arguments, expand_path, spec_from_args
from charnn.errors import Busy, CharnnError, Unavailable, UserError, as_charnn_error, last_line
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


CONNECT_TIMEOUT_S = 120.0  # cluster.connect_timeout_s when a caller has no spec
RETRY = "check RAY_ADDRESS and that the cluster is up, then run the job again"


def init_ray(timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Join the cluster in RAY_ADDRESS (or the job's own), else start an embedded local Ray, within
    ``timeout_s`` or one line and exit 75 (a scheduler tries again later); returns whether Ray is
    embedded (no other nodes will ever join).

    Ray's own waits are long (a GCS that does not answer is retried for about 14 minutes) and run in
    C++, where neither an exception nor SIGTERM reaches them: a watchdog ends the process instead.
    Nothing has been written yet at this point (jobs take leases and write only after it)."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return not address
    where = f"the Ray cluster at {address}" if address else "an embedded local Ray"
    deadline = time.monotonic() + timeout_s
    watchdog = None
    try:
        if address:
            _wait_for_gcs(address, deadline)
        # ray.init itself gets what is left, and at least the seconds a healthy cluster takes to join
        watchdog = threading.Timer(max(10.0, deadline - time.monotonic()), _give_up,
                                   (f"could not start or reach {where} within {timeout_s:g} s (cluster.connect_timeout_s)",))
        watchdog.daemon = True
        watchdog.start()
        ray.init(**_init_options(address))
    except Exception as exc:  # noqa: BLE001 - ConnectionError, "the GCS has become overloaded", ...
        raise RayUnavailable(f"could not start or reach {where}: {last_line(exc)}; {RETRY}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
    protect_token()
    fold_worker_tracebacks()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return not address


def fold_worker_tracebacks() -> None:
    """Print the tracebacks in the logs Ray forwards from its workers and actors as their last line.
    A lost node or an elastic resize makes Ray Train's workers and controller log a traceback or
    four, which the job's log would show as a crash; the run goes on, and says so in its own lines.
    The full text stays in the Ray session's log files (and the dashboard);
    CHARNN_WORKER_TRACEBACKS=1 prints it on the driver too."""
    try:  # Ray's own hook (2.60): without it, the logs are printed as they come
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if os.environ.get("CHARNN_WORKER_TRACEBACKS") == "1":
        return
    for name, handle in list(getattr(dispatcher, "handlers", ())):
        if name == "ray_print_logs":  # the handler ray.init(log_to_driver=True) adds
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, lambda batch, handle=handle: handle(
                {**batch, "lines": fold_tracebacks(batch.get("lines", []))}))


def fold_tracebacks(lines: list[str]) -> list[str]:
    """``lines`` with each Python traceback cut to its last line (the exception)."""
    kept, inside = [], False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        else:
            inside = False
            kept.append(line)
    return kept


class RayUnavailable(Unavailable):
    """A Ray cluster that could not be started or reached in time."""


def _give_up(why: str) -> None:
    print(f"charnn: error: {why}; {RETRY}", file=sys.stderr, flush=True)
    os._exit(RayUnavailable.exit_status)


def _wait_for_gcs(address: str, deadline: float) -> None:
    """Wait until something listens at a host:port address (the GCS), so that a cluster that is not
    there is told in seconds, not after Ray's own retries."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # "auto", ray:// (Ray Client): Ray resolves those itself
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"nothing answers at {address} ({exc.strerror or exc})") from None
            time.sleep(1)


# Ray Train's settings for an embedded Ray, where no node is a spot node and runs are often seconds
# long: the preemption watcher is one more actor process per worker group, and the controller's
# poll of its workers (2 s) is what a short run waits on after its last step.  Set beforehand, a
# variable keeps its value.
EMBEDDED_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def _init_options(address: str) -> dict:
    """ray.init's arguments.  Ray Train's placement-group cleaner asks whether its controller lives
    through Ray's state API, and a worker process with no RAY_ADDRESS asks the newest cluster on the
    machine (/tmp/ray/ray_current_cluster), which may be another one that says "dead" and so has our
    placement group removed: our workers are told which cluster is theirs."""
    if not address:
        port = _free_port()  # the embedded dashboard's port, chosen here so that workers can be told it
        own = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
               **{k: v for k, v in EMBEDDED_TRAIN_ENV.items() if k not in os.environ}}
        # dashboard on 127.0.0.1: Ray Train needs its state API
        return {"address": "local", "dashboard_port": port, "log_to_driver": True, "runtime_env": {"env_vars": own}}
    own = {} if "://" in address else {"RAY_ADDRESS": _resolved(address)}
    # faults injected on this driver's command line reach the cluster's workers (an embedded Ray's
    # workers inherit the driver's environment anyway)
    own |= {k: v for k, v in os.environ.items() if k.startswith("CHARNN_FAULT")}
    own = {k: v for k, v in own.items() if k not in _job_env_vars()}  # ray.init refuses to merge those
    return {"log_to_driver": True, **({"runtime_env": {"env_vars": own}} if own else {})}


def _resolved(address: str) -> str:
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address_or_die  # what ray.init itself does

    return canonicalize_bootstrap_address_or_die(address)


def _job_env_vars() -> set[str]:
    """The variables that a submitted job's own runtime env sets (``ray job submit --runtime-env-json``)."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return set((config.get("runtime_env") or {}).get("env_vars") or {})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def require_cluster(spec: Spec, embedded: bool) -> None:
    """Refuse, before any work, a cluster that cannot run the spec's training job."""
    require_workers(spec.cluster, embedded)
    require_shared_storage(spec, embedded)


def require_workers(cluster, embedded: bool) -> None:
    """Fail fast when the cluster cannot place the spec's workers (the fewest, for an elastic run),
    where Ray Train would wait for them forever; a remote cluster may autoscale, so it gets
    cluster.resource_timeout_s."""
    import ray

    workers = cluster.workers_range[0]
    need = {"CPU": workers * cluster.cpus_per_worker, "GPU": workers if cluster.use_gpu else 0}
    deadline = time.monotonic() + (0 if embedded else cluster.resource_timeout_s)
    while True:
        have = ray.cluster_resources()
        short = {k: v for k, v in need.items() if v and have.get(k, 0) < v}
        if not short:
            return
        wants = ", ".join(f"{v} {k} (it has {have.get(k, 0):g})" for k, v in short.items())
        if time.monotonic() >= deadline:
            fix = "set cluster.use_gpu=false or use a cluster with GPUs" if "GPU" in short else \
                "lower cluster.num_workers (or cluster.min_workers) or cluster.cpus_per_worker"
            raise ClusterError(f"the cluster cannot place {workers} workers: they need {wants}; {fix}")
        logging.getLogger("charnn").info("waiting for the cluster to offer %s", wants)
        time.sleep(5)


def require_shared_storage(spec: Spec, embedded: bool) -> None:
    """Refuse local paths for what every node reads or writes (the run, the dataset, the corpus) on
    a cluster of more than one node, unless the spec says they are on storage every node mounts:
    they would fail late, as files missing on another node."""
    import ray

    if embedded or spec.storage.shared_path:
        return
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes < 2:
        return
    paths = [("run.storage", spec.run.storage), ("data.dataset_root", spec.data.dataset_root),
             *(("data.sources", source) for source in spec.data.sources)]
    for key, url in paths:
        if "://" not in url or url.startswith("file://"):
            raise ClusterError(f"{key}={redact(url)} is a local path, but the cluster has {nodes} nodes, which cannot "
                               f"read each other's disks; use an s3:// or gs:// URL, or --set storage.shared_path=true "
                               f"if every node mounts it at the same path")


def print_result(result: dict) -> None:
    """The last stdout line: one JSON object that schedulers read (a figure that is not finite is
    null: NaN is not JSON)."""
    finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    print(redact(json.dumps(finite, sort_keys=True, allow_nan=False)), flush=True)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `ray job stop` sends SIGTERM: unwind, so leases and temp files are released


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread (again, after something replaced it)."""
    signal.signal(signal.SIGTERM, _interrupt)


def execute(run: Callable[[], dict | None]) -> None:
    """Run a command: one-line errors and their exit codes, the JSON result line last."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RedactingFormatter("%(name)s: %(message)s"))
    interrupt_on_sigterm()
    try:
        result = run()
    except KeyboardInterrupt:
        print("charnn: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - charnn's own errors, also as Ray hands them back
        error = _one_line_error(exc)
        if error is None:
            raise  # a bug: its traceback is what a developer needs
        print(f"charnn: {'busy' if isinstance(error, Busy) else 'error'}: {redact(str(error))}", file=sys.stderr,
              flush=True)
        _skip_collections_at_exit()
        sys.exit(error.exit_status)
    if result is not None:
        _stop_ray()  # workers' forwarded log lines would otherwise land after the result line
        print_result(result)
    _skip_collections_at_exit()


def _skip_collections_at_exit() -> None:
    """The command is done: what it holds goes back to the OS when the process ends.  Python's
    collections at exit would walk every object of torch, Ray and pandas first (0.5 to 3 s of a
    loaded core, measured: bench/fixed_cost.py); frozen objects are left out of them."""
    import gc

    gc.freeze()


def _one_line_error(exc: Exception) -> CharnnError | None:
    """charnn's own error, or the one a Ray task or Ray Train worker raised (Ray wraps it in an
    error whose text is a coloured traceback); any other Ray failure (a dead worker, out of memory)
    as one line; None for anything else."""
    if isinstance(exc, CharnnError) and type(exc).__module__.startswith("charnn."):
        return exc
    ray = sys.modules.get("ray")
    if ray is not None and isinstance(exc, ray.exceptions.RayError):
        return as_charnn_error(exc, "a Ray task failed")
    return None


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
