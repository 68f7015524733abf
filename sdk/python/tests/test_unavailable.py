"""A sidecar whose ledger is gone fails closed (503), and every client surfaces GuardUnavailable."""

from __future__ import annotations

import anthropic
import openai
import pytest

import spendguard
import spendguard.anthropic
import spendguard.openai

from support import ANTHROPIC_KEY, ANTHROPIC_MODEL, OPENAI_KEY, OPENAI_MODEL, Stack

UNAVAILABLE = {"DEPENDENCY_UNAVAILABLE", "LEASE_UNAVAILABLE"}


def test_the_decision_client_raises_guard_unavailable(stack: Stack, call_id: str) -> None:
    with spendguard.SpendGuard(stack.down_url) as sg:
        with pytest.raises(spendguard.GuardUnavailable) as raised:
            sg.decide(
                provider="openai",
                model=OPENAI_MODEL,
                input_tokens_upper_bound=100,
                max_output_tokens=10,
                call_id=call_id,
            )
    assert raised.value.code in UNAVAILABLE
    assert raised.value.status_code == 503
    assert raised.value.decision is None


def test_the_guarded_openai_client_raises_guard_unavailable(stack: Stack) -> None:
    client = spendguard.openai.OpenAI(sidecar_url=stack.down_url, api_key=OPENAI_KEY, max_retries=0)
    with pytest.raises(spendguard.GuardUnavailable) as raised:
        client.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])
    # Still the library's own status error, for code that catches those.
    assert isinstance(raised.value, openai.APIStatusError)
    assert raised.value.code in UNAVAILABLE


def test_the_guarded_anthropic_client_raises_guard_unavailable(stack: Stack) -> None:
    client = spendguard.anthropic.Anthropic(
        sidecar_url=stack.down_url, api_key=ANTHROPIC_KEY, max_retries=0
    )
    with pytest.raises(spendguard.GuardUnavailable) as raised:
        client.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(raised.value, anthropic.APIStatusError)
    assert raised.value.code in UNAVAILABLE
