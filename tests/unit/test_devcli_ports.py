"""`dev up` starts its parts on their preferred ports, or elsewhere when one is taken."""

from __future__ import annotations

import socket

import pytest

from services.runtime import devcli
from services.runtime.devstack import StackError, free_port


@pytest.fixture
def preferred(monkeypatch: pytest.MonkeyPatch) -> int:
    port = free_port()
    monkeypatch.setitem(devcli.PREFERRED_PORTS, "postgres", port)
    return port


def test_a_free_preferred_port_is_used(preferred: int) -> None:
    assert devcli._start_on_port("postgres", lambda port: port) == preferred


def test_a_port_held_without_a_listener_is_not_used(preferred: int) -> None:
    # A bound socket that accepts nothing (as a client's local end would) answers no
    # connect probe, yet a server cannot listen there.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", preferred))
        port = devcli._start_on_port("postgres", lambda port: port)
    assert port != preferred


def test_a_port_taken_between_probe_and_bind_falls_back(preferred: int) -> None:
    tried: list[int] = []

    def start(port: int) -> int:
        tried.append(port)
        if port == preferred:
            raise StackError("postgres exited with 1 before listening\nAddress already in use")
        return port

    assert devcli._start_on_port("postgres", start) != preferred
    assert tried[0] == preferred and len(tried) == 2


def test_other_start_failures_are_not_hidden(preferred: int) -> None:
    def start(port: int) -> int:
        raise StackError("initdb failed: disk full")

    with pytest.raises(StackError, match="disk full"):
        devcli._start_on_port("postgres", start)
