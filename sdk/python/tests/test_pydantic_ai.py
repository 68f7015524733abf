"""A Pydantic-AI agent on its OpenAI model through the sidecar."""

from __future__ import annotations

import pytest
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

import spendguard
import spendguard.pydantic_ai

from support import DENIED_MODEL, OPENAI_KEY, OPENAI_MODEL, MockUpstream, Stack, decided_call_id, when_decided


def plain_agent(url: str) -> Agent:
    model = OpenAIChatModel(OPENAI_MODEL, provider=OpenAIProvider(base_url=f"{url}/v1", api_key=OPENAI_KEY))
    return Agent(model)


def guarded_agent(url: str, model: str = OPENAI_MODEL) -> Agent:
    return Agent(spendguard.pydantic_ai.openai_model(model, sidecar_url=url, api_key=OPENAI_KEY))


def test_run_sync(stack: Stack, mock: MockUpstream, marker: str) -> None:
    result = plain_agent(stack.url).run_sync(f"say hi {marker}")
    assert isinstance(result.output, str) and result.output
    assert result.usage.input_tokens > 0
    assert mock.one_with_marker(marker, "/v1/chat/completions")["model"] == OPENAI_MODEL


async def test_run_stream(stack: Stack, mock: MockUpstream, marker: str) -> None:
    async with plain_agent(stack.url).run_stream(f"count {marker}") as result:
        text = await result.get_output()
    assert isinstance(text, str) and text
    assert mock.one_with_marker(marker, "/v1/chat/completions")["stream"] is True


def test_guarded_agent_succeeds(stack: Stack, marker: str) -> None:
    result = guarded_agent(stack.url).run_sync(f"say hi {marker}")
    assert result.output


def test_tight_budget_run_sync(stack: Stack, mock: MockUpstream, marker: str) -> None:
    with pytest.raises(spendguard.BudgetExceeded) as info:
        guarded_agent(stack.tight_url).run_sync(f"hi {marker}")
    assert info.value.reason == "BUDGET_EXHAUSTED"
    # pydantic-ai's own exception stays attached for debugging.
    assert isinstance(info.value.__cause__, ModelHTTPError)
    mock.assert_never_saw(marker)


async def test_tight_budget_run_stream(stack: Stack) -> None:
    with pytest.raises(spendguard.BudgetExceeded) as info:
        async with guarded_agent(stack.tight_url).run_stream("hi") as result:
            await result.get_output()
    assert info.value.reason == "BUDGET_EXHAUSTED"


def test_plain_agent_under_typed_errors(stack: Stack) -> None:
    with pytest.raises(spendguard.BudgetExceeded) as info, spendguard.typed_errors():
        plain_agent(stack.tight_url).run_sync("hi")
    assert info.value.reason == "BUDGET_EXHAUSTED"


def test_soft_cap_and_denied_model(stack: Stack) -> None:
    with pytest.raises(spendguard.ApprovalRequired) as info:
        guarded_agent(stack.softcap_url).run_sync("hi")
    assert info.value.reason == "SOFT_CAP_REACHED"

    with pytest.raises(spendguard.BudgetExceeded) as denied:
        guarded_agent(stack.url, model=DENIED_MODEL).run_sync("hi")
    assert denied.value.reason == "MODEL_DENIED"


def test_approval_outcomes_are_not_hidden(stack: Stack) -> None:
    # S16: the agent surfaces the approver's answer as SpendGuard's exception; an approved call
    # goes through on the retry. The harness's approver decides `approve-*` and `deny-*` calls.
    def agent(decision: str) -> Agent:
        headers = {"x-spendguard-call-id": decided_call_id(decision)}
        model = spendguard.pydantic_ai.openai_model(
            OPENAI_MODEL,
            sidecar_url=stack.softcap_url,
            api_key=OPENAI_KEY,
            client_kwargs={"default_headers": headers},
        )
        return Agent(model)

    denying = agent("deny")
    with pytest.raises(spendguard.ApprovalRequired):
        denying.run_sync("hi")
    with pytest.raises(spendguard.ApprovalDenied) as denied:
        when_decided(lambda: denying.run_sync("hi"))
    assert denied.value.reason == "APPROVAL_DENIED"

    approving = agent("approve")
    with pytest.raises(spendguard.ApprovalRequired):
        approving.run_sync("hi")
    assert when_decided(lambda: approving.run_sync("hi")).output
