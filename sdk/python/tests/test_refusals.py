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
