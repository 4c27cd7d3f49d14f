"""Fixtures for multi-host tests: a fresh namespace network per test, or a skip saying why."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from tests.netns import Network, unavailable_reason


@pytest.fixture
def make_network() -> Iterator[Callable[[int], Network]]:
    """`net = make_network(2)`: a bridge and 2 hosts, torn down after the test."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"skipping multi-host test: {reason}")
        pytest.skip(reason)
    with ExitStack() as stack:
        yield lambda hosts: stack.enter_context(Network(hosts))
