"""Typed results of the decision API, and nano-USD helpers.

Money stays an `int` of nano-USD (1 USD = 1_000_000_000) end to end, as the ledger stores it:
a float would round, and a budget guard that rounds can overspend. `to_decimal_usd` exists for
display only.

Parsing is tolerant of extra fields (a newer sidecar may add some) but strict about the
fields the SDK acts on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

__all__ = [
    "NANO_USD_PER_USD",
    "CommitResult",
    "Decision",
    "DecisionKind",
    "Provider",
    "ReleaseResult",
    "UsageFormat",
    "to_decimal_usd",
]

NANO_USD_PER_USD = 1_000_000_000

DecisionKind = Literal["CONTINUE", "STOP", "REQUIRE_APPROVAL"]
Provider = Literal["openai", "anthropic"]
UsageFormat = Literal["openai_chat", "openai_responses", "anthropic"]


def to_decimal_usd(nano_usd: int) -> Decimal:
    """Exact USD value of an integer nano-USD amount (for display and reports)."""
    if not isinstance(nano_usd, int) or isinstance(nano_usd, bool):
        raise TypeError("nano_usd must be an int")
    return Decimal(nano_usd).scaleb(-9)


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key, 0)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"sidecar sent non-integer {key}: {value!r}")
    return value


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Decision:
    """The guard's answer to POST /v1/spendguard/decide.

    `reserved_nano_usd` is the worst-case amount held against the budget until commit or release.
    `max_output_tokens` is the cap the caller must send to the provider (the contract may lower it).
    """

    decision: DecisionKind
    reason: str
    detail: str
    call_id: str
    reservation_id: str | None
    reserved_nano_usd: int
    max_output_tokens: int | None
    budget_id: str | None
    approval_id: str | None
    contract_version: str
    pricing_version: str
    pricing_sha256: str
    bundle_sha256: str
    fail_open: bool
    replayed: bool
    # Priced from a snapshot older than the contract accepts, which lets such calls continue
    # (a contract that stops them answers STOP with reason PRICING_STALE instead).
    pricing_stale: bool = False
    # STOP: the id of the ledger's signed record of this refusal (`decision.stopped`), which the
    # sidecar publishes in the background; None for other decisions.
    evidence_id: str | None = None

    @property
    def allowed(self) -> bool:
        return self.decision == "CONTINUE"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decision:
        decision = data.get("decision")
        if decision not in ("CONTINUE", "STOP", "REQUIRE_APPROVAL"):
            raise ValueError(f"sidecar sent unknown decision {decision!r}")
        return cls(
            decision=decision,
            reason=str(data.get("reason", "")),
            detail=str(data.get("detail", "")),
            call_id=str(data.get("call_id", "")),
            reservation_id=_opt_str(data, "reservation_id"),
            reserved_nano_usd=_int(data, "reserved_nano_usd"),
            max_output_tokens=_opt_int(data, "max_output_tokens"),
            budget_id=_opt_str(data, "budget_id"),
            approval_id=_opt_str(data, "approval_id"),
            contract_version=str(data.get("contract_version", "")),
            pricing_version=str(data.get("pricing_version", "")),
            pricing_sha256=str(data.get("pricing_sha256", "")),
            bundle_sha256=str(data.get("bundle_sha256", "")),
            fail_open=bool(data.get("fail_open", False)),
            replayed=bool(data.get("replayed", False)),
            pricing_stale=bool(data.get("pricing_stale", False)),
            evidence_id=_opt_str(data, "evidence_id"),
        )


@dataclass(frozen=True, slots=True)
class CommitResult:
    """Answer to POST /v1/spendguard/commit: what the call really cost and what went back."""

    call_id: str
    actual_nano_usd: int
    committed_nano_usd: int
    released_nano_usd: int
    overrun_nano_usd: int
    replayed: bool
    # The call outlived its reservation's TTL: all of its usage was booked as an overrun.
    late: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CommitResult:
        return cls(
            call_id=str(data.get("call_id", "")),
            actual_nano_usd=_int(data, "actual_nano_usd"),
            committed_nano_usd=_int(data, "committed_nano_usd"),
            released_nano_usd=_int(data, "released_nano_usd"),
            overrun_nano_usd=_int(data, "overrun_nano_usd"),
            replayed=bool(data.get("replayed", False)),
            late=bool(data.get("late", False)),
        )


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    """Answer to POST /v1/spendguard/release."""

    call_id: str
    released_nano_usd: int
    replayed: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReleaseResult:
        return cls(
            call_id=str(data.get("call_id", "")),
            released_nano_usd=_int(data, "released_nano_usd"),
            replayed=bool(data.get("replayed", False)),
        )
