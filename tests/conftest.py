"""Fixtures (generated corpora, a real local Ray, moto's S3, a `ray start` cluster, the smoke
runs), the loopback environment for the whole session, and the fault table.  The helpers the
fixtures and tests share live in tests/support/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.env import SESSION_ENV
from support.jobs import train_smoke, write_corpus
from support.servers import MotoServer, RayCluster

_ENV_BEFORE: dict[str, str | None] = {}


def pytest_configure(config):
    """The loopback settings and moto's fake AWS credentials, for the whole session.  This runs
    before any test module is imported, so before any Ray worker, job or moto server starts:
    each inherits os.environ."""
    _ENV_BEFORE.update({key: os.environ.get(key) for key in SESSION_ENV})
    os.environ.update(SESSION_ENV)
    make_ray_token()


def make_ray_token() -> None:
    """The first Ray to start writes ~/.ray/auth_token when there is none, without O_EXCL: two
    pytest workers starting Rays at once on a fresh machine would each write their own and one
    cluster would refuse the other's clients.  So the token is made here, before any worker, as
    Ray makes it (64 hex digits)."""
    import secrets

    token = Path.home() / ".ray" / "auth_token"
    token.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def pytest_unconfigure(config):
    """Give the process its environment back (for pytest run in-process, e.g. by pytester)."""
    for key, value in _ENV_BEFORE.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def corpus(tmp_path) -> Path:
    directory = tmp_path / "corpus"
    write_corpus(directory, documents=8, lines=120)
    return directory


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for in-process pipeline tests, shut down with the module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto_s3, request) -> str:
    name = "charnn-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    moto_s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster():
    """A `ray start --head` cluster for the session.  Its temp dir is short: Ray's socket paths in it
    must stay under 108 bytes, and pytest-xdist's basetemp (.../pytest-N/popen-gwK/) is too deep."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="charnn-ray-", ignore_cleanup_errors=True) as temp_dir:
        cluster = RayCluster(Path(temp_dir)).start()
        yield cluster
        cluster.stop()


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """Runs of the smoke model over short documents: 24 steps an epoch, so 30 steps cross an epoch boundary."""
    root = tmp_path_factory.mktemp("smoke")
    write_corpus(root / "corpus", documents=6, lines=14, seed=5)
    return root


@pytest.fixture(scope="session")
def two_workers(smoke_root, ray_cluster) -> dict:
    """The uninterrupted reference: 2 workers x 4 rows, 30 steps (run "two-workers")."""
    _, result = train_smoke(smoke_root, "two-workers", 2, 30, cluster=ray_cluster)
    return result


# each starts a Ray or a server (or needs one started): seconds before the test begins
SLOW_TIER_FIXTURES = {"ray_local", "ray_cluster", "two_workers", "moto_s3"}


# The files of minutes each, longest first (seconds in a `make test` of 2026-12-05, 2 cores).  They
# run first: pytest-xdist hands files to its workers in collection order (with
# --no-loadscope-reorder; by default it orders them by their count of tests, and these have few),
# so the quick files fill in beside them, where one of them started last leaves the other worker
# idle for minutes.
LONG_FILES = ("test_faults.py",  # 429
              "test_retrain.py",  # 237
              "test_multinode.py",  # 231
              "test_train_e2e.py",  # 174
              "test_resume.py",  # 143
              "test_train_resume.py",  # 111
              "test_pipeline_ray_data.py",  # 102
              "test_elastic_rows.py")  # 87


def pytest_collection_modifyitems(config, items):
    """A test that uses a Ray or server fixture, itself or through another fixture, is in the slow
    tier (the ``ray`` marker), whether or not its module says so: ``-m "not ray"`` (``make check``)
    leaves it out.  (A fixture that asks for one by ``request.getfixturevalue`` marks its own
    parameter.)  ``LONG_FILES`` go first, each file's tests in their own order."""
    for item in items:
        if SLOW_TIER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    first = {name: rank for rank, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


FAULT_REPORT: list[dict] = []


def pytest_runtest_logreport(report):
    """Collect the fault tests' rows, which each test records as its "fault" property."""
    if report.when == "call":
        FAULT_REPORT.extend(value for name, value in report.user_properties if name == "fault")


def pytest_terminal_summary(terminalreporter):
    """`pytest -m faults` ends with one table of what was injected and what it cost."""
    if not FAULT_REPORT:
        return
    columns = ("fault", "injected", "recoveries", "steps recomputed", "final loss vs uninterrupted")
    rows = [[str(r[c]) for c in columns] for r in FAULT_REPORT]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    terminalreporter.section("fault injection")
    for row in [list(columns), ["-" * w for w in widths], *rows]:
        terminalreporter.write_line(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
