"""A small agent for `make demo`: it keeps asking its model for work until SpendGuard stops it.

The OpenAI client is the real `openai` package; the only change is where it points (the
sidecar) and that SpendGuard refusals raise `spendguard.BudgetExceeded`. Past the budget's soft
cap a call needs a human's approval (`spendguard.ApprovalRequired`): the agent retries it under
its own call id until the approver decided; approved, the call goes through; denied, the agent
skips that step (S16).
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import spendguard
import spendguard.openai

# How long a call waits for a human before the agent gives up on it.
APPROVAL_WAIT_SECONDS = 120


def main() -> int:
    client = spendguard.openai.OpenAI(
        sidecar_url=os.environ["SPENDGUARD_URL"], api_key="sk-demo", max_retries=0
    )
    for call in range(1, 100):
        # One call id per call: a retry of it after approval is the same call, resumed.
        call_id = f"demo-call-{call}-{uuid.uuid4().hex[:8]}"
        waiting_since = None
        while True:
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-5",
                    messages=[{"role": "user", "content": f"Research step {call}: summarise the findings."}],
                    extra_headers={"x-spendguard-call-id": call_id},
                )
                break
            except spendguard.ApprovalRequired as ask:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    print(f"call {call}: {ask.decision} {ask.reason}: approval {ask.approval_id} pending; retrying until decided")
                    sys.stdout.flush()
                elif time.monotonic() - waiting_since > APPROVAL_WAIT_SECONDS:
                    print(f"call {call}: nobody decided approval {ask.approval_id}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            except (spendguard.ApprovalDenied, spendguard.ApprovalExpired) as refused:
                # A human said no to this step (or nobody answered): skip it, go on with the next.
                print(f"call {call}: STOP      {refused.reason} (approval {refused.approval_id}): skipping this step")
                sys.stdout.flush()
                raw = None
                break
            except spendguard.BudgetExceeded as stop:
                print(f"call {call}: STOP      {stop.reason} — {stop.message}")
                return 0
        if raw is None:
            continue
        completion = raw.parse()
        usage = completion.usage
        decision = raw.headers.get("x-spendguard-decision", "?")
        approved = " (approved)" if waiting_since is not None else ""
        print(
            f"call {call}: {decision:<9} {usage.prompt_tokens} input + {usage.completion_tokens} output tokens "
            f"(reservation {raw.headers.get('x-spendguard-reservation-id', '-')[:8]}…){approved}"
        )
        sys.stdout.flush()
    print("the budget never stopped the agent", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
