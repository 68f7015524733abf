"""Typed SpendGuard exceptions and the one place that recognises a refusal on the wire.

Why one module: the direct client, the guarded provider clients and `typed_errors()` all
see the same refusal in different wrappers (a decision-API error body, an OpenAI or Anthropic
error body, a framework exception). They all funnel through `refusal_from_parts`, so a given
HTTP answer maps to the same exception class whichever way it reached the caller.

Every exception carries:

- `code`: the stable wire code (`BUDGET_EXHAUSTED`, `DEPENDENCY_UNAVAILABLE`, `INVALID_ARGUMENT`, ...);
- `reason`: the decision reason code for refusals (equal to `code` for proxy refusals), else None;
- `decision`: `"STOP"` or `"REQUIRE_APPROVAL"` for refusals, else None;
- `status_code`: the HTTP status, when there was one;
- `evidence_id`: for a STOP, the id of the ledger's signed record of the refusal
  (`decision.stopped`), else None; for `ApprovalDenied` / `ApprovalExpired`, `approval_id` also
  names the approval whose own event records who decided.

Attribute names deliberately avoid the ones the provider exceptions use for something else
(`type`, `body`, `response`, `request`), because the guarded clients raise classes that are both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import Decision

__all__ = [
    "SPENDGUARD_CODE_HEADER",
    "ApprovalDenied",
    "ApprovalExpired",
    "ApprovalRequired",
    "BudgetExceeded",
    "CallAlreadyResolved",
    "CallNotFound",
    "Conflict",
    "GuardUnavailable",
    "InvalidRequest",
    "SpendGuardError",
    "find_refusal",
    "refusal_from_parts",
]

SPENDGUARD_CODE_HEADER = "x-spendguard-code"

# The guard could not decide. All are 503 but LEDGER_ANSWER_UNREADABLE (502: something answered
# in the ledger's place).
_UNAVAILABLE_CODES = frozenset(
    {
        "DEPENDENCY_UNAVAILABLE",
        "LEASE_UNAVAILABLE",
        "EVIDENCE_BACKLOG",
        "SIGNING_UNAVAILABLE",
        "LEDGER_ANSWER_UNREADABLE",
    }
)


class SpendGuardError(Exception):
    """Base of every SpendGuard exception.

    The constructor takes the message positionally and everything else by keyword with
    defaults: the guarded provider clients raise classes that inherit from both a provider's
    `APIStatusError` and one of these, and the provider's `__init__` chains to ours with only
    the message (through the MRO). Fields are then filled in by `_fill`.
    """

    code: str | None
    reason: str | None
    decision: str | None
    status_code: int | None
    approval_id: str | None
    call_id: str | None
    field: str | None
    decision_response: Decision | None
    # STOP: the id of the ledger's signed record of the refusal (`decision.stopped`).
    evidence_id: str | None

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        reason: str | None = None,
        decision: str | None = None,
        status_code: int | None = None,
        approval_id: str | None = None,
        call_id: str | None = None,
        field: str | None = None,
        decision_response: Decision | None = None,
        evidence_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self._fill(
            code=code,
            reason=reason,
            decision=decision,
            status_code=status_code,
            approval_id=approval_id,
            call_id=call_id,
            field=field,
            decision_response=decision_response,
            evidence_id=evidence_id,
        )

    def _fill(
        self,
        *,
        code: str | None = None,
        reason: str | None = None,
        decision: str | None = None,
        status_code: int | None = None,
        approval_id: str | None = None,
        call_id: str | None = None,
        field: str | None = None,
        decision_response: Decision | None = None,
        evidence_id: str | None = None,
    ) -> None:
        self.code = code
        self.reason = reason
        self.decision = decision
        self.status_code = status_code
        self.approval_id = approval_id
        self.call_id = call_id
        self.field = field
        self.decision_response = decision_response
        self.evidence_id = evidence_id

    def plain(self) -> SpendGuardError:
        """A copy as the public SpendGuard class only (drops any provider base class).

        `typed_errors()` raises this copy `from` the framework's exception instead of re-raising
        the original object, which would make the exception chain cyclic.
        """
        cls = _public_class(type(self))
        copy = cls(str(getattr(self, "message", "") or self))
        copy._fill(
            code=self.code,
            reason=self.reason,
            decision=self.decision,
            status_code=self.status_code,
            approval_id=self.approval_id,
            call_id=self.call_id,
            field=self.field,
            decision_response=self.decision_response,
            evidence_id=self.evidence_id,
        )
        return copy

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, reason={self.reason!r}, "
            f"decision={self.decision!r}, status_code={self.status_code!r})"
        )


class BudgetExceeded(SpendGuardError):
    """The guard said STOP: the call would exceed a budget or break the contract (see `.reason`)."""


class ApprovalRequired(SpendGuardError):
    """The guard said REQUIRE_APPROVAL (e.g. a soft cap was crossed); `.approval_id` names the request."""


class ApprovalDenied(SpendGuardError):
    """A human denied the approval this call was waiting on."""


class ApprovalExpired(SpendGuardError):
    """The approval this call was waiting on expired before anyone decided."""


class GuardUnavailable(SpendGuardError):
    """The guard could not decide (ledger unreachable, no fencing lease, sidecar down): fail-closed."""


class InvalidRequest(SpendGuardError, ValueError):
    """The decision API rejected the arguments (`INVALID_ARGUMENT`); `.field` names the culprit."""


class CallNotFound(SpendGuardError, LookupError):
    """Commit or release named a call id the sidecar has no reservation for (`CALL_NOT_FOUND`)."""


class Conflict(SpendGuardError):
    """HTTP 409 from the decision API: the call id's state forbids this (see `.code`:
    `CALL_ID_REUSED`, `IDEMPOTENCY_CONFLICT`, `NO_RESERVATION`, `RESERVATION_EXPIRED`, ...)."""


class CallAlreadyResolved(Conflict):
    """The call was already committed or released differently (`CALL_ALREADY_RESOLVED`)."""


_PUBLIC: tuple[type[SpendGuardError], ...] = (
    BudgetExceeded,
    ApprovalRequired,
    ApprovalDenied,
    ApprovalExpired,
    GuardUnavailable,
    InvalidRequest,
    CallNotFound,
    CallAlreadyResolved,
    Conflict,
    SpendGuardError,
)


def _public_class(cls: type[SpendGuardError]) -> type[SpendGuardError]:
    for klass in cls.__mro__:
        if klass in _PUBLIC:
            return klass  # type: ignore[return-value]
    return SpendGuardError


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    try:
        value = headers.get(name)
        if value is None and isinstance(headers, Mapping):
            lowered = {str(k).lower(): v for k, v in headers.items()}
            value = lowered.get(name)
    except Exception:
        return None
    return str(value) if value is not None else None


def _error_object(body: Any) -> Mapping[str, Any] | None:
    """The error object of an OpenAI body (`{"error": {...}}` or, as openai passes it, the inner
    object itself) or of an Anthropic body (`{"type": "error", "error": {...}}`)."""
    if isinstance(body, str):
        import json

        try:
            body = json.loads(body)
        except ValueError:
            return None
    if not isinstance(body, Mapping):
        return None
    inner = body.get("error")
    if isinstance(inner, Mapping):
        return inner
    if "code" in body or "type" in body:
        return body
    return None


def refusal_from_parts(
    status_code: int | None,
    headers: Any,
    body: Any,
) -> tuple[type[SpendGuardError], dict[str, Any]] | None:
    """Classify an HTTP error answer from the sidecar's provider proxy.

    Returns the SpendGuard class to raise and the keyword fields for it, or None when the
    answer is not a SpendGuard refusal (provider errors and bad-input 400/413s, which stay the
    provider library's own exceptions). The `x-spendguard-code` header wins over the body's
    `code`; the body's `type` (`spendguard_*`) decides the class.
    """
    err = _error_object(body) or {}
    etype = err.get("type") if isinstance(err.get("type"), str) else None
    body_code = err.get("code") if isinstance(err.get("code"), str) else None
    code = _header(headers, SPENDGUARD_CODE_HEADER) or body_code
    message = err.get("message") if isinstance(err.get("message"), str) else None
    approval_id = err.get("approval_id") if isinstance(err.get("approval_id"), str) else None
    evidence_id = err.get("evidence_id") if isinstance(err.get("evidence_id"), str) else None
    # The header survives a proxy in between that rewrote the body.
    evidence_id = evidence_id or _header(headers, "x-spendguard-evidence-id")

    cls: type[SpendGuardError] | None = None
    decision: str | None = None
    if code == "APPROVAL_DENIED":
        cls, decision = ApprovalDenied, "STOP"
    elif code == "APPROVAL_EXPIRED":
        cls, decision = ApprovalExpired, "STOP"
    elif etype == "spendguard_budget_exceeded":
        cls, decision = BudgetExceeded, "STOP"
    elif etype == "spendguard_approval_required":
        cls, decision = ApprovalRequired, "REQUIRE_APPROVAL"
    elif etype == "spendguard_unavailable" or (
        code in _UNAVAILABLE_CODES and status_code in (502, 503)
    ):
        cls = GuardUnavailable
    elif (
        code is not None
        and _header(headers, SPENDGUARD_CODE_HEADER) is not None
        and status_code in (402, 503)
    ):
        # A SpendGuard refusal whose body a proxy in between rewrote: trust the header.
        cls, decision = (GuardUnavailable, None) if status_code == 503 else (BudgetExceeded, "STOP")
    if cls is None:
        return None
    return cls, {
        "message": message or f"SpendGuard refused the call: {code}",
        "code": code,
        "reason": code if cls is not GuardUnavailable else None,
        "decision": decision,
        "status_code": status_code,
        "approval_id": approval_id,
        "call_id": _header(headers, "x-spendguard-call-id"),
        "evidence_id": evidence_id,
    }


def _from_exception(exc: BaseException) -> SpendGuardError | None:
    """A SpendGuard exception for one link of a chain, or None.

    Recognises, without importing the libraries: provider `APIStatusError`s (have `.response`
    with headers and `.body`) and pydantic-ai's `ModelHTTPError` (has `.status_code`, `.body`
    and lower-cased `.headers`).
    """
    if isinstance(exc, SpendGuardError):
        return exc
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        return None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) if response is not None else None
    if headers is None:
        headers = getattr(exc, "headers", None)
    found = refusal_from_parts(status, headers, getattr(exc, "body", None))
    if found is None:
        return None
    cls, fields = found
    message = fields.pop("message")
    return cls(message, **fields)


def find_refusal(exc: BaseException) -> SpendGuardError | None:
    """Walk `exc` and its `__cause__`/`__context__` chain for a SpendGuard refusal.

    Frameworks wrap provider errors (pydantic-ai raises ModelHTTPError from the APIStatusError,
    LangChain re-wraps some statuses); the refusal is somewhere in the chain.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        found = _from_exception(current)
        if found is not None:
            return found
        for nxt in (current.__cause__, current.__context__):
            if nxt is not None:
                todo.append(nxt)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
    return None
