"""LangChain's ChatOpenAI through the sidecar: plain (base URL only) and spendguard.langchain."""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI

import spendguard
import spendguard.langchain

from support import DENIED_MODEL, OPENAI_KEY, OPENAI_MODEL, MockUpstream, Stack, decided_call_id, when_decided


def plain(url: str) -> ChatOpenAI:
    return ChatOpenAI(model=OPENAI_MODEL, base_url=f"{url}/v1", api_key=OPENAI_KEY)


def guarded(url: str, model: str = OPENAI_MODEL) -> spendguard.langchain.ChatOpenAI:
    return spendguard.langchain.ChatOpenAI(model=model, sidecar_url=url, api_key=OPENAI_KEY)


def test_invoke(stack: Stack, mock: MockUpstream, marker: str) -> None:
    reply = plain(stack.url).invoke(f"say hi {marker}")
    assert isinstance(reply.content, str) and reply.content
    assert mock.one_with_marker(marker, "/v1/chat/completions")["model"] == OPENAI_MODEL


def test_stream(stack: Stack, marker: str) -> None:
    text = "".join(str(chunk.content) for chunk in plain(stack.url).stream(f"count {marker}"))
    assert text


def test_guarded_invoke_and_stream_report_usage(stack: Stack, marker: str) -> None:
    model = guarded(stack.url)
    reply = model.invoke(f"say hi {marker}")
    assert reply.content
    assert reply.usage_metadata is not None and reply.usage_metadata["total_tokens"] > 0

    merged = None
    for chunk in model.stream(f"count {marker}"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None and merged.content
    # stream_usage defaults on in spendguard.langchain, so the final usage chunk arrives.
    assert merged.usage_metadata is not None and merged.usage_metadata["total_tokens"] > 0


def test_tight_budget_invoke_stream_ainvoke(stack: Stack, mock: MockUpstream, marker: str) -> None:
    model = guarded(stack.tight_url)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        model.invoke(f"hi {marker}")
    assert info.value.reason == "BUDGET_EXHAUSTED"

    with pytest.raises(spendguard.BudgetExceeded) as info:
        for _ in model.stream(f"hi {marker}"):
            pass
    assert info.value.reason == "BUDGET_EXHAUSTED"
    mock.assert_never_saw(marker)


async def test_tight_budget_ainvoke_astream(stack: Stack) -> None:
    model = guarded(stack.tight_url)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        await model.ainvoke("hi")
    assert info.value.reason == "BUDGET_EXHAUSTED"

    with pytest.raises(spendguard.BudgetExceeded):
        async for _ in model.astream("hi"):
            pass


def test_plain_model_under_typed_errors(stack: Stack) -> None:
    with pytest.raises(spendguard.BudgetExceeded) as info, spendguard.typed_errors():
        plain(stack.tight_url).invoke("hi")
    assert info.value.reason == "BUDGET_EXHAUSTED"


def test_soft_cap_and_denied_model(stack: Stack) -> None:
    with pytest.raises(spendguard.ApprovalRequired) as info:
        guarded(stack.softcap_url).invoke("hi")
    assert info.value.reason == "SOFT_CAP_REACHED"

    with pytest.raises(spendguard.BudgetExceeded) as denied:
        guarded(stack.url, model=DENIED_MODEL).invoke("hi")
    assert denied.value.reason == "MODEL_DENIED"


def test_approval_outcomes_are_not_hidden(stack: Stack) -> None:
    # S16: LangChain surfaces the approver's answer as SpendGuard's exception; an approved call
    # goes through on the retry. The harness's approver decides `approve-*` and `deny-*` calls.
    def model(decision: str) -> spendguard.langchain.ChatOpenAI:
        return spendguard.langchain.ChatOpenAI(
            model=OPENAI_MODEL,
            sidecar_url=stack.softcap_url,
            api_key=OPENAI_KEY,
            default_headers={"x-spendguard-call-id": decided_call_id(decision)},
        )

    denying = model("deny")
    with pytest.raises(spendguard.ApprovalRequired):
        denying.invoke("hi")
    with pytest.raises(spendguard.ApprovalDenied) as denied:
        when_decided(lambda: denying.invoke("hi"))
    assert denied.value.reason == "APPROVAL_DENIED"

    approving = model("approve")
    with pytest.raises(spendguard.ApprovalRequired):
        approving.invoke("hi")
    reply = when_decided(lambda: approving.invoke("hi"))
    assert reply.content
