"""Constants and helpers shared by the tests (imported by conftest and the test modules)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

import spendguard

T = TypeVar("T")

RUN_HINT = "run through `cargo test -p spendguard-sidecar --test python_sdk` or `make test`"
REQUIRED_ENV = (
    "SPENDGUARD_URL",
    "SPENDGUARD_TIGHT_URL",
    "SPENDGUARD_SOFTCAP_URL",
    "SPENDGUARD_DOWN_URL",
    "SPENDGUARD_MOCK_URL",
)

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
DENIED_MODEL = "gpt-4-denied"
CONTRACT_MAX_OUTPUT_TOKENS = 4096
# The sidecar (or upstream) holds the real key; these only satisfy the client libraries.
OPENAI_KEY = "sk-spendguard-test"
ANTHROPIC_KEY = "sk-ant-spendguard-test"


@dataclass(frozen=True)
class Stack:
    url: str
    tight_url: str
    softcap_url: str
    down_url: str
    mock_url: str


class MockUpstream:
    """Reads what the mock provider received, to check what the sidecar forwarded (or did not)."""

    def __init__(self, urls: list[str]) -> None:
        # Every stack's sidecar has a mock of its own: a refusal by the tight or soft-capped one
        # must be looked for at its mock, so every mock is read.
        self.urls = urls

    def requests(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for url in self.urls:
            response = httpx.get(f"{url}/_mock/requests", timeout=10)
            response.raise_for_status()
            data = response.json()
            assert isinstance(data, list), f"/_mock/requests must be a list, got {data!r}"
            found.extend(data)
        return found

    @staticmethod
    def body(request: dict[str, Any]) -> Any:
        body = request.get("body")
        if isinstance(body, str):
            try:
                return json.loads(body)
            except ValueError:
                return body
        return body

    def with_marker(self, marker: str) -> list[dict[str, Any]]:
        """Requests whose body contains `marker` (each test puts a fresh one in its prompt)."""
        return [r for r in self.requests() if marker in json.dumps(r.get("body"))]

    def one_with_marker(self, marker: str, path: str) -> dict[str, Any]:
        found = self.with_marker(marker)
        assert len(found) == 1, f"expected exactly one upstream request carrying {marker}, got {len(found)}"
        assert found[0].get("path") == path, f"upstream path {found[0].get('path')!r} != {path!r}"
        body = self.body(found[0])
        assert isinstance(body, dict), f"upstream body is not a JSON object: {body!r}"
        return body

    def assert_never_saw(self, marker: str) -> None:
        found = self.with_marker(marker)
        assert not found, f"a refused call reached the upstream: {found!r}"


def decided_call_id(decision: str) -> str:
    """A call id the harness's approver decides (`approve` or `deny`) once it asks for approval."""
    return f"{decision}-{uuid.uuid4().hex}"


def when_decided(call: Callable[[], T], timeout: float = 10.0) -> T:
    """Retries `call` while it raises ApprovalRequired (the harness's approver decides within
    ~50 ms); returns what it returns then, or lets what it raises then through."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except spendguard.ApprovalRequired:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
