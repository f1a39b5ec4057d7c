"""`dev up` starts its parts on their preferred ports, or elsewhere when one is taken;
the stack retries a free port taken between choosing it and the server's bind."""

from __future__ import annotations

import socket

import pytest

from services.runtime import devcli
from services.runtime.devstack import StackError, free_port, on_a_free_port

IN_USE = "postgres exited with 1 before listening\nAddress already in use"


@pytest.fixture
def preferred(monkeypatch: pytest.MonkeyPatch) -> int:
    port = free_port()
    monkeypatch.setitem(devcli.PREFERRED_PORTS, "postgres", port)
    return port


def started_on(port: int | None) -> int:
    """A part that starts wherever it is told (None: a free port)."""
    return free_port() if port is None else port


def test_a_free_preferred_port_is_used(preferred: int) -> None:
    assert devcli._start_on_port("postgres", started_on) == preferred


def test_a_port_held_without_a_listener_is_not_used(preferred: int) -> None:
    # A bound socket that accepts nothing (as a client's local end would) answers no
    # connect probe, yet a server cannot listen there.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", preferred))
        port = devcli._start_on_port("postgres", started_on)
    assert port != preferred


def test_a_port_taken_between_probe_and_bind_falls_back(preferred: int) -> None:
    tried: list[int | None] = []

    def start(port: int | None) -> int:
        tried.append(port)
        if port == preferred:
            raise StackError(IN_USE)
        return started_on(port)

    assert devcli._start_on_port("postgres", start) != preferred
    assert tried == [preferred, None]


def test_other_start_failures_are_not_hidden(preferred: int) -> None:
    def start(port: int | None) -> int:
        raise StackError("initdb failed: disk full")

    with pytest.raises(StackError, match="disk full"):
        devcli._start_on_port("postgres", start)


def test_a_free_port_taken_before_the_bind_is_replaced() -> None:
    tried: list[int] = []

    def start(port: int) -> int:
        tried.append(port)
        if len(tried) < 3:
            raise StackError(IN_USE)
        return port

    assert on_a_free_port(start) == tried[-1] and len(tried) == 3
    tried.clear()
    with pytest.raises(StackError, match="already in use"):
        on_a_free_port(start, attempts=2)  # both taken: the second failure is raised


def test_a_free_port_start_failure_of_another_kind_is_raised_at_once() -> None:
    calls: list[int] = []

    def start(port: int) -> int:
        calls.append(port)
        raise StackError("initdb failed: disk full")

    with pytest.raises(StackError, match="disk full"):
        on_a_free_port(start)
    assert len(calls) == 1
