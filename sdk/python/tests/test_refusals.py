"""How a proxy refusal on the wire becomes a typed exception's fields (no sidecar needed)."""

from __future__ import annotations

import spendguard
from spendguard.errors import refusal_from_parts

EVIDENCE = "6f1c2a3b-0000-4000-8000-000000000001"


def test_a_stop_carries_its_evidence_id_from_the_body() -> None:
    body = {
        "error": {
            "type": "spendguard_budget_exceeded",
            "code": "BUDGET_EXHAUSTED",
            "message": "SpendGuard: STOP (BUDGET_EXHAUSTED)",
            "evidence_id": EVIDENCE,
        }
    }
    refusal = refusal_from_parts(402, {"x-spendguard-code": "BUDGET_EXHAUSTED"}, body)
    assert refusal is not None
    cls, fields = refusal
    assert cls is spendguard.BudgetExceeded
    assert fields["evidence_id"] == EVIDENCE


def test_the_evidence_header_stands_in_for_a_rewritten_body() -> None:
    # A proxy in between replaced the body; the SpendGuard headers survived.
    headers = {"x-spendguard-code": "MODEL_DENIED", "x-spendguard-evidence-id": EVIDENCE}
    refusal = refusal_from_parts(402, headers, {"error": {"message": "payment required"}})
    assert refusal is not None
    cls, fields = refusal
    assert cls is spendguard.BudgetExceeded
    assert fields["reason"] == "MODEL_DENIED"
    assert fields["evidence_id"] == EVIDENCE
    err = cls(fields.pop("message"), **fields)
    assert err.evidence_id == EVIDENCE


def test_resolved_approvals_map_to_their_own_exceptions() -> None:
    # The codes a resumed call gets once its approval was denied or expired (S16).
    cases = (("APPROVAL_DENIED", spendguard.ApprovalDenied), ("APPROVAL_EXPIRED", spendguard.ApprovalExpired))
    for code, cls in cases:
        body = {"error": {"type": "spendguard_budget_exceeded", "code": code, "approval_id": "a-1"}}
        refusal = refusal_from_parts(402, {"x-spendguard-code": code}, body)
        assert refusal is not None
        found, fields = refusal
        assert found is cls
        assert fields["approval_id"] == "a-1"
        assert not issubclass(cls, spendguard.BudgetExceeded), "not a budget STOP"


def test_an_unavailable_guard_is_not_a_refusal_of_the_call() -> None:
    body = {"error": {"type": "spendguard_unavailable", "code": "DEPENDENCY_UNAVAILABLE"}}
    refusal = refusal_from_parts(503, {}, body)
    assert refusal is not None
    cls, fields = refusal
    assert cls is spendguard.GuardUnavailable
    assert fields["decision"] is None and fields["reason"] is None
    # Something answered in the ledger's place: the guard could not decide either (502).
    unreadable = {"error": {"type": "spendguard_unavailable", "code": "LEDGER_ANSWER_UNREADABLE"}}
    refusal = refusal_from_parts(502, {}, unreadable)
    assert refusal is not None and refusal[0] is spendguard.GuardUnavailable
    # ... also from the decision API, whose error body has no type.
    refusal = refusal_from_parts(502, {}, {"error": {"code": "LEDGER_ANSWER_UNREADABLE"}})
    assert refusal is not None and refusal[0] is spendguard.GuardUnavailable
    # A provider's own 502 stays the provider's error.
    assert refusal_from_parts(502, {}, {"error": {"type": "api_error", "code": "bad_gateway"}}) is None
    # A provider's own 503 (no SpendGuard type or code) stays the provider's error.
    assert refusal_from_parts(503, {}, {"error": {"type": "overloaded_error"}}) is None
