"""Direct clients of the sidecar's decision API: decide, commit, release, and `guard()`.

Use these when the SDK is not in the request path (your own HTTP stack, a provider the proxy
does not speak, batch jobs): reserve before the call, commit the provider's usage after it.
The sync and async clients share request building and answer parsing, so they cannot drift.

Refusals are exceptions, not return values, by default: code that forgets to check a STOP
would spend money the budget did not allow. Pass `check=False` to `decide` to get the
`Decision` back whatever it says.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx

from ._config import new_call_id, sidecar_url
from .errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalRequired,
    BudgetExceeded,
    CallAlreadyResolved,
    CallNotFound,
    Conflict,
    GuardUnavailable,
    InvalidRequest,
    SpendGuardError,
    refusal_from_parts,
)
from .types import CommitResult, Decision, Provider, ReleaseResult, UsageFormat

__all__ = ["AsyncGuardedCall", "AsyncSpendGuard", "GuardedCall", "SpendGuard", "usage_to_json"]

DECIDE_PATH = "/v1/spendguard/decide"
COMMIT_PATH = "/v1/spendguard/commit"
RELEASE_PATH = "/v1/spendguard/release"

DEFAULT_TIMEOUT = 10.0


def usage_to_json(usage: Any) -> Any:
    """The provider's usage object as JSON, keeping the provider's own field names.

    Accepts a dict or an openai/anthropic pydantic model; for models only the fields the
    provider actually sent are kept (`exclude_unset`), so the sidecar prices exactly what came back.
    """
    if usage is None or isinstance(usage, Mapping):
        return usage
    to_dict = getattr(usage, "to_dict", None)
    if callable(to_dict):
        return to_dict(mode="json")
    dump = getattr(usage, "model_dump", None)
    if callable(dump):
        return dump(mode="json", by_alias=True, exclude_unset=True)
    raise TypeError(f"cannot send usage of type {type(usage).__name__}; pass a dict")


def _decide_body(
    *,
    call_id: str,
    provider: Provider,
    model: str,
    input_tokens_upper_bound: int,
    max_output_tokens: int | None,
    choices: int | None,
    run_id: str | None,
    workflow_id: str | None,
) -> dict[str, Any]:
    # No local range checks: the sidecar is the one authority on what is valid, and a
    # local check that drifted from it would hide its answer. Unset fields are left out, so a
    # sidecar older than a field (it refuses unknown ones) still answers calls that do not use it.
    body = {
        "call_id": call_id,
        "provider": provider,
        "model": model,
        "input_tokens_upper_bound": input_tokens_upper_bound,
        "max_output_tokens": max_output_tokens,
        "choices": choices,
        "run_id": run_id,
        "workflow_id": workflow_id,
    }
    return {key: value for key, value in body.items() if value is not None}


def _raise_for_error(response: httpx.Response) -> None:
    """Map a non-2xx decision-API answer to the typed exception."""
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    code = err.get("code") if isinstance(err.get("code"), str) else None
    message = err.get("message") if isinstance(err.get("message"), str) else None
    field = err.get("field") if isinstance(err.get("field"), str) else None
    status = response.status_code
    message = message or f"SpendGuard answered HTTP {status}"

    refusal = refusal_from_parts(status, response.headers, body)
    if refusal is not None:
        cls, fields = refusal
        del fields["message"]
        raise cls(message, **fields)
    cls_by: type[SpendGuardError]
    if status == 503 or code in ("DEPENDENCY_UNAVAILABLE", "LEASE_UNAVAILABLE"):
        cls_by = GuardUnavailable
    elif code == "INVALID_ARGUMENT" or status in (400, 413, 422):
        cls_by = InvalidRequest
    elif code == "CALL_NOT_FOUND" or status == 404:
        cls_by = CallNotFound
    elif code == "CALL_ALREADY_RESOLVED":
        cls_by = CallAlreadyResolved
    elif status == 409:
        cls_by = Conflict
    else:
        cls_by = SpendGuardError
    raise cls_by(message, code=code, status_code=status, field=field)


def _json(response: httpx.Response) -> Mapping[str, Any]:
    _raise_for_error(response)
    try:
        data = response.json()
    except ValueError as exc:
        raise SpendGuardError(
            "SpendGuard sent a non-JSON answer",
            code="UNEXPECTED_RESPONSE",
            status_code=response.status_code,
        ) from exc
    if not isinstance(data, dict):
        raise SpendGuardError(
            "SpendGuard sent a non-object answer",
            code="UNEXPECTED_RESPONSE",
            status_code=response.status_code,
        )
    return data


def _check_decision(decision: Decision) -> Decision:
    """Turn STOP / REQUIRE_APPROVAL into exceptions carrying the whole decision."""
    common: dict[str, Any] = {
        "code": decision.reason,
        "reason": decision.reason,
        "decision": decision.decision,
        "status_code": 200,
        "approval_id": decision.approval_id,
        "call_id": decision.call_id,
        "decision_response": decision,
        "evidence_id": decision.evidence_id,
    }
    message = decision.detail or decision.reason
    # A call retried after its approval was decided (S16): the approver's answer, not a budget.
    if decision.decision == "STOP" and decision.reason == "APPROVAL_DENIED":
        raise ApprovalDenied(message, **common)
    if decision.decision == "STOP" and decision.reason == "APPROVAL_EXPIRED":
        raise ApprovalExpired(message, **common)
    if decision.decision == "STOP":
        raise BudgetExceeded(message, **common)
    if decision.decision == "REQUIRE_APPROVAL":
        raise ApprovalRequired(message, **common)
    return decision


def _unavailable(exc: httpx.HTTPError, url: str) -> GuardUnavailable:
    return GuardUnavailable(
        f"SpendGuard sidecar at {url} unreachable: {exc}",
        code="CONNECTION_ERROR",
    )


class SpendGuard:
    """Synchronous client of the decision API.

    `base_url` defaults to $SPENDGUARD_URL (then http://127.0.0.1:8787). Pass `http_client` to
    share a connection pool; the SDK closes only clients it created.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = sidecar_url(base_url)
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    def close(self) -> None:
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> SpendGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        url = self.base_url + path
        try:
            response = self._http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise _unavailable(exc, self.base_url) from exc
        return _json(response)

    def decide(
        self,
        *,
        provider: Provider,
        model: str,
        input_tokens_upper_bound: int,
        max_output_tokens: int | None = None,
        choices: int | None = None,
        call_id: str | None = None,
        run_id: str | None = None,
        workflow_id: str | None = None,
        check: bool = True,
    ) -> Decision:
        """Reserve the worst-case cost of one call. Raises on STOP/REQUIRE_APPROVAL unless `check=False`.

        `choices` is the number of completions asked for (OpenAI chat `n`); `max_output_tokens`
        applies to each.
        """
        body = _decide_body(
            call_id=call_id or new_call_id(),
            provider=provider,
            model=model,
            input_tokens_upper_bound=input_tokens_upper_bound,
            max_output_tokens=max_output_tokens,
            choices=choices,
            run_id=run_id,
            workflow_id=workflow_id,
        )
        decision = Decision.from_json(self._post(DECIDE_PATH, body))
        return _check_decision(decision) if check else decision

    def commit(self, call_id: str, *, usage_format: UsageFormat, usage: Any) -> CommitResult:
        """Settle a call with the provider's usage exactly as returned; idempotent per call id."""
        body = {"call_id": call_id, "usage_format": usage_format, "usage": usage_to_json(usage)}
        return CommitResult.from_json(self._post(COMMIT_PATH, body))

    def release(self, call_id: str, *, reason: str) -> ReleaseResult:
        """Give back a reservation the call will not use; idempotent per call id."""
        return ReleaseResult.from_json(self._post(RELEASE_PATH, {"call_id": call_id, "reason": reason}))

    @contextlib.contextmanager
    def guard(
        self,
        *,
        provider: Provider,
        model: str,
        input_tokens_upper_bound: int,
        max_output_tokens: int | None = None,
        choices: int | None = None,
        call_id: str | None = None,
        run_id: str | None = None,
        workflow_id: str | None = None,
    ) -> Iterator[GuardedCall]:
        """Decide, run the body, and never leave a reservation dangling.

        Yields a `GuardedCall` (`.decision`, `.commit(...)`). If the body raises, the reservation
        is released (reason "exception") and the body's exception propagates. If the body
        returns without committing, it is released with reason "not_committed".
        """
        decision = self.decide(
            provider=provider,
            model=model,
            input_tokens_upper_bound=input_tokens_upper_bound,
            max_output_tokens=max_output_tokens,
            choices=choices,
            call_id=call_id,
            run_id=run_id,
            workflow_id=workflow_id,
        )
        handle = GuardedCall(self, decision)
        try:
            yield handle
        except BaseException as exc:
            if not handle.resolved:
                _release_quietly(lambda: handle.release("exception"), exc)
            raise
        if not handle.resolved:
            handle.release("not_committed")


class GuardedCall:
    """One decided call inside `SpendGuard.guard()`; remembers whether it was settled."""

    def __init__(self, client: SpendGuard, decision: Decision) -> None:
        self.decision = decision
        self.call_id = decision.call_id
        self._client = client
        self.committed: CommitResult | None = None
        self.released: ReleaseResult | None = None

    @property
    def resolved(self) -> bool:
        return self.committed is not None or self.released is not None

    def commit(self, *, usage_format: UsageFormat, usage: Any) -> CommitResult:
        self.committed = self._client.commit(self.call_id, usage_format=usage_format, usage=usage)
        return self.committed

    def release(self, reason: str) -> ReleaseResult | None:
        try:
            self.released = self._client.release(self.call_id, reason=reason)
        except CallAlreadyResolved:
            # Committed through the client directly rather than this handle: nothing to give back.
            return None
        return self.released


def _release_quietly(release: Any, original: BaseException) -> None:
    """Release after the body failed, without masking the body's exception."""
    try:
        release()
    except SpendGuardError as exc:
        original.add_note(f"spendguard: releasing the reservation failed too: {exc!r}")


async def _arelease_quietly(release: Any, original: BaseException) -> None:
    try:
        await release()
    except SpendGuardError as exc:
        original.add_note(f"spendguard: releasing the reservation failed too: {exc!r}")


class AsyncSpendGuard:
    """Asynchronous client of the decision API; same methods as `SpendGuard`, awaited."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = sidecar_url(base_url)
        self._owns_client = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncSpendGuard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _post(self, path: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        url = self.base_url + path
        try:
            response = await self._http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise _unavailable(exc, self.base_url) from exc
        return _json(response)

    async def decide(
        self,
        *,
        provider: Provider,
        model: str,
        input_tokens_upper_bound: int,
        max_output_tokens: int | None = None,
        choices: int | None = None,
        call_id: str | None = None,
        run_id: str | None = None,
        workflow_id: str | None = None,
        check: bool = True,
    ) -> Decision:
        """Reserve the worst-case cost of one call. Raises on STOP/REQUIRE_APPROVAL unless `check=False`.

        `choices` is the number of completions asked for (OpenAI chat `n`); `max_output_tokens`
        applies to each.
        """
        body = _decide_body(
            call_id=call_id or new_call_id(),
            provider=provider,
            model=model,
            input_tokens_upper_bound=input_tokens_upper_bound,
            max_output_tokens=max_output_tokens,
            choices=choices,
            run_id=run_id,
            workflow_id=workflow_id,
        )
        decision = Decision.from_json(await self._post(DECIDE_PATH, body))
        return _check_decision(decision) if check else decision

    async def commit(self, call_id: str, *, usage_format: UsageFormat, usage: Any) -> CommitResult:
        body = {"call_id": call_id, "usage_format": usage_format, "usage": usage_to_json(usage)}
        return CommitResult.from_json(await self._post(COMMIT_PATH, body))

    async def release(self, call_id: str, *, reason: str) -> ReleaseResult:
        return ReleaseResult.from_json(await self._post(RELEASE_PATH, {"call_id": call_id, "reason": reason}))

    @contextlib.asynccontextmanager
    async def guard(
        self,
        *,
        provider: Provider,
        model: str,
        input_tokens_upper_bound: int,
        max_output_tokens: int | None = None,
        choices: int | None = None,
        call_id: str | None = None,
        run_id: str | None = None,
        workflow_id: str | None = None,
    ) -> AsyncIterator[AsyncGuardedCall]:
        """Async `guard()`: same release rules as `SpendGuard.guard`."""
        decision = await self.decide(
            provider=provider,
            model=model,
            input_tokens_upper_bound=input_tokens_upper_bound,
            max_output_tokens=max_output_tokens,
            choices=choices,
            call_id=call_id,
            run_id=run_id,
            workflow_id=workflow_id,
        )
        handle = AsyncGuardedCall(self, decision)
        try:
            yield handle
        except BaseException as exc:
            if not handle.resolved:
                await _arelease_quietly(lambda: handle.release("exception"), exc)
            raise
        if not handle.resolved:
            await handle.release("not_committed")


class AsyncGuardedCall:
    """One decided call inside `AsyncSpendGuard.guard()`."""

    def __init__(self, client: AsyncSpendGuard, decision: Decision) -> None:
        self.decision = decision
        self.call_id = decision.call_id
        self._client = client
        self.committed: CommitResult | None = None
        self.released: ReleaseResult | None = None

    @property
    def resolved(self) -> bool:
        return self.committed is not None or self.released is not None

    async def commit(self, *, usage_format: UsageFormat, usage: Any) -> CommitResult:
        self.committed = await self._client.commit(self.call_id, usage_format=usage_format, usage=usage)
        return self.committed

    async def release(self, reason: str) -> ReleaseResult | None:
        try:
            self.released = await self._client.release(self.call_id, reason=reason)
        except CallAlreadyResolved:
            return None
        return self.released
