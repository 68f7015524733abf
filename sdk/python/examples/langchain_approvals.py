"""LangChain through SpendGuard, with approvals (S16): a step past the budget's soft cap waits
for a human, then goes on (approved) or is skipped (denied or expired).

The model is LangChain's own ChatOpenAI, guarded (`spendguard.langchain.ChatOpenAI`), so
SpendGuard's refusals surface as SpendGuard's exceptions. A step keeps its call id across
retries (`x-spendguard-call-id`): the retry of a call waiting for approval is the same call,
resumed once the approver said yes.

    SPENDGUARD_URL=http://127.0.0.1:8787 python langchain_approvals.py
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import spendguard
import spendguard.langchain

APPROVAL_WAIT_SECONDS = 120


def run_step(sidecar_url: str, prompt: str, call_id: str | None = None) -> str | None:
    """One agent step: the model's answer, or None when a human denied it (or let it expire).

    Raises `spendguard.BudgetExceeded` when the budget stops the step, and
    `spendguard.ApprovalRequired` when nobody decided within APPROVAL_WAIT_SECONDS.
    """
    model = spendguard.langchain.ChatOpenAI(
        model="gpt-4o-mini",
        sidecar_url=sidecar_url,
        default_headers={"x-spendguard-call-id": call_id or f"step-{uuid.uuid4().hex}"},
    )
    deadline = time.monotonic() + APPROVAL_WAIT_SECONDS
    while True:
        try:
            return str(model.invoke(prompt).content)
        except spendguard.ApprovalRequired as ask:
            if time.monotonic() > deadline:
                raise
            print(f"waiting for approval {ask.approval_id} ({ask.reason})", file=sys.stderr)
            time.sleep(0.5)
        except (spendguard.ApprovalDenied, spendguard.ApprovalExpired) as refused:
            print(f"step skipped: {refused.reason} (approval {refused.approval_id})", file=sys.stderr)
            return None


if __name__ == "__main__":
    answer = run_step(os.environ.get("SPENDGUARD_URL", "http://127.0.0.1:8787"), "Summarise the findings.")
    print(answer if answer is not None else "(skipped)")
