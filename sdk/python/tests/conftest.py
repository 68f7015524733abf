"""Fixtures for the SDK tests, which run against a REAL sidecar, ledger and mock upstream.

The Rust integration test `python_sdk` (crate spendguard-sidecar) starts them and passes:

- SPENDGUARD_URL          sidecar with an ample budget (gpt-4o-mini, claude-sonnet-4-5 priced;
                          gpt-4-denied denied by the contract; contract max_output_tokens 4096)
- SPENDGUARD_TIGHT_URL    sidecar whose budget is too small for any call (STOP BUDGET_EXHAUSTED)
- SPENDGUARD_SOFTCAP_URL  sidecar whose soft cap is crossed (REQUIRE_APPROVAL SOFT_CAP_REACHED)
- SPENDGUARD_DOWN_URL     sidecar whose ledger is gone (fails closed: 503)
- SPENDGUARD_MOCK_URL     the mock provider; GET /_mock/requests lists what it received; a comma-
                          separated list of every stack's mock (the main one first)

Without them every test FAILS (never skips): a green run must mean the SDK met a real sidecar.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from support import REQUIRED_ENV, RUN_HINT, MockUpstream, Stack


@pytest.fixture(scope="session", autouse=True)
def stack() -> Stack:
    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not set. These tests need a real SpendGuard sidecar, ledger and "
            f"mock upstream: {RUN_HINT}.",
            pytrace=False,
        )
    env = {name: os.environ[name].rstrip("/") for name in REQUIRED_ENV}
    return Stack(
        url=env["SPENDGUARD_URL"],
        tight_url=env["SPENDGUARD_TIGHT_URL"],
        softcap_url=env["SPENDGUARD_SOFTCAP_URL"],
        down_url=env["SPENDGUARD_DOWN_URL"],
        mock_url=env["SPENDGUARD_MOCK_URL"],
    )


@pytest.fixture(scope="session")
def mock(stack: Stack) -> MockUpstream:
    return MockUpstream(stack.mock_url.split(","))


@pytest.fixture
def marker() -> str:
    """A unique token to put in a prompt so the test can find its request at the upstream."""
    return f"sgtest-{uuid.uuid4().hex}"


@pytest.fixture
def call_id() -> str:
    return f"pytest-{uuid.uuid4().hex}"


@pytest.fixture
def sg(stack: Stack) -> Iterator[Any]:
    import spendguard

    with spendguard.SpendGuard(stack.url) as client:
        yield client
