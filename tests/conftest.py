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
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """Runs of the smoke model over short documents: 24 steps an epoch, so 30 steps cross an epoch boundary."""
    root = tmp_path_factory.mktemp("smoke")
    write_corpus(root / "corpus", documents=6, lines=14, seed=5)
    return root


@pytest.fixture(scope="session")
def two_workers(smoke_root) -> dict:
    """The uninterrupted reference: 2 workers x 4 rows, 30 steps (run "two-workers")."""
    _, result = train_smoke(smoke_root, "two-workers", 2, 30)
    return result


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
