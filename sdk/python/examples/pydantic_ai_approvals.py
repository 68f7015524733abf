"""A Pydantic-AI agent through SpendGuard, with approvals (S16): a run past the budget's soft cap
waits for a human, then goes on (approved) or is skipped (denied or expired).

The model is Pydantic-AI's OpenAIChatModel, guarded (`spendguard.pydantic_ai.openai_model`),
so SpendGuard's refusals surface as SpendGuard's exceptions. A run keeps its call id across
retries (`x-spendguard-call-id`): the retry of a call waiting for approval is the same call,
resumed once the approver said yes. (One call id per run suits a run of one model request; a
multi-step run would set one per request.)

    SPENDGUARD_URL=http://127.0.0.1:8787 python pydantic_ai_approvals.py
"""

from __future__ import annotations

import os
import sys
import time
import uuid

from pydantic_ai import Agent

import spendguard
import spendguard.pydantic_ai

APPROVAL_WAIT_SECONDS = 120


def run_step(sidecar_url: str, prompt: str, call_id: str | None = None) -> str | None:
    """One agent run: its output, or None when a human denied it (or let it expire).

    Raises `spendguard.BudgetExceeded` when the budget stops the run, and
    `spendguard.ApprovalRequired` when nobody decided within APPROVAL_WAIT_SECONDS.
    """
    headers = {"x-spendguard-call-id": call_id or f"run-{uuid.uuid4().hex}"}
    agent = Agent(
        spendguard.pydantic_ai.openai_model(
            "gpt-4o-mini", sidecar_url=sidecar_url, client_kwargs={"default_headers": headers}
        )
    )
    deadline = time.monotonic() + APPROVAL_WAIT_SECONDS
    while True:
        try:
            return str(agent.run_sync(prompt).output)
        except spendguard.ApprovalRequired as ask:
            if time.monotonic() > deadline:
                raise
            print(f"waiting for approval {ask.approval_id} ({ask.reason})", file=sys.stderr)
            time.sleep(0.5)
        except (spendguard.ApprovalDenied, spendguard.ApprovalExpired) as refused:
            print(f"run skipped: {refused.reason} (approval {refused.approval_id})", file=sys.stderr)
            return None


if __name__ == "__main__":
    output = run_step(os.environ.get("SPENDGUARD_URL", "http://127.0.0.1:8787"), "Summarise the findings.")
    print(output if output is not None else "(skipped)")
