"""The tests' own helpers (tests/support/), where a mistake in them would fail other tests at random."""
from __future__ import annotations

from support.servers import free_port


def test_free_port_never_gives_a_port_twice():
    """A cluster's ports come from free_port one after another: two equal ones fail `ray start`."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
