from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from services.runtime.devstack import SERVICES, Stack
from tests.conftest import Infra
from tests.e2e.harness import Deployment

DeploymentFactory = Callable[..., Awaitable[Deployment]]


@pytest.fixture
async def deploy(
    infra: Infra,
    local_stack: Stack,
    database_url: str,
    kafka_bootstrap: str,
    request: pytest.FixtureRequest,
) -> AsyncIterator[DeploymentFactory]:
    """Start a deployment: ``await deploy(clock_speed=86400)``."""
    started: list[Deployment] = []

    async def start(
        clock_speed: float = 86400,
        services: tuple[str, ...] = SERVICES,
        smtp: tuple[str, int] | None = None,
        **kwargs: Any,
    ) -> Deployment:
        deployment = Deployment(
            local_stack,
            database_url=database_url,
            kafka=kafka_bootstrap,
            smtp=smtp or infra.smtp,
            clock_speed=clock_speed,
            **kwargs,
        )
        started.append(deployment)
        await deployment.start(services)
        return deployment

    yield start
    for deployment in started:
        if request.node.stash.get(_failed_key, False):
            print(deployment.dump_logs())
        await deployment.close()


_failed_key = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_failed_key] = True
    return report
