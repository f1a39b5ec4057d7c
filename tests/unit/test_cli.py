"""The ``touchstream`` command's error handling (services/runtime/cli.py), without a
broker: failures become a clear message on stderr and exit code 2, not a traceback."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

from services.runtime import cli, dlq


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError("replay of leads-dlq did not finish in 60s"),
        KafkaTimeoutError(),
    ],
    ids=["replay deadline", "broker request timeout"],
)
def test_dlq_replay_reports_a_broker_timeout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    async def timing_out(*args: Any, **kwargs: Any) -> int:
        raise error

    monkeypatch.setattr(dlq, "replay", timing_out)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dlq", "replay", "leads"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("touchstream: replay of leads-dlq stopped: the broker did not answer")
    assert "run the command again" in err
    assert "Traceback" not in err
