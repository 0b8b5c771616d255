"""The environment the tests run under.  tests/conftest.py puts SESSION_ENV into os.environ in
``pytest_configure``, before any test module is imported and so before any Ray worker, job or
moto server starts: they all inherit it."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped."""
    pairs = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            key, equals, value = line.partition("=")
            if not equals or not key.isidentifier() or value != value.strip():
                raise ValueError(f"{path}:{number}: not a KEY=VALUE line: {line!r}")
            pairs[key] = value
    return pairs


# Every byte on 127.0.0.1 (loopback.env at the repository root is the one copy).
LOOPBACK_ENV = read_env_file(REPO / "loopback.env")
# Fake credentials for moto.
FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SESSION_ENV = {**LOOPBACK_ENV, **FAKE_AWS_ENV}
# Ray Train's controller polls its workers every 2 s; the tests' runs are seconds long, so they
# spend much of their time waiting on that poll.  Its preemption watcher is one more actor process
# per worker group (3 s of a loaded core here), for the spot nodes that tests never have.  Ray
# Train propagates both to its actors.
FAST_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
