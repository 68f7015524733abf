"""A small agent for `make demo`: it keeps asking its model for work until SpendGuard stops it.

The OpenAI client is the real `openai` package; the only change is where it points (the
sidecar) and that SpendGuard refusals raise `spendguard.BudgetExceeded`.
"""

from __future__ import annotations

import os
import sys

import spendguard
import spendguard.openai


def main() -> int:
    client = spendguard.openai.OpenAI(
        sidecar_url=os.environ["SPENDGUARD_URL"], api_key="sk-demo", max_retries=0
    )
    for call in range(1, 100):
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-5",
                messages=[{"role": "user", "content": f"Research step {call}: summarise the findings."}],
            )
        except spendguard.BudgetExceeded as stop:
            print(f"call {call}: STOP      {stop.reason} — {stop.message}")
            return 0
        completion = raw.parse()
        usage = completion.usage
        print(
            f"call {call}: {raw.headers.get('x-spendguard-decision', '?'):<9} "
            f"{usage.prompt_tokens} input + {usage.completion_tokens} output tokens "
            f"(reservation {raw.headers.get('x-spendguard-reservation-id', '-')[:8]}…)"
        )
    print("the budget never stopped the agent", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
