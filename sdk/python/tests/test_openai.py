"""The real `openai` client through the sidecar's proxy: only the base URL changes."""

from __future__ import annotations

from typing import Any

import openai
import pytest

import spendguard
import spendguard.openai

from support import (
    CONTRACT_MAX_OUTPUT_TOKENS,
    DENIED_MODEL,
    OPENAI_KEY,
    OPENAI_MODEL,
    MockUpstream,
    Stack,
    decided_call_id,
    when_decided,
)


def plain(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=OPENAI_KEY)


def output_cap(body: dict) -> int:
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    assert isinstance(cap, int), f"sidecar forwarded no output-token cap: {body!r}"
    return cap


def test_chat_completion(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = plain(stack.url)
    completion = client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": f"say hi {marker}"}]
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0

    forwarded = mock.one_with_marker(marker, "/v1/chat/completions")
    assert forwarded["model"] == OPENAI_MODEL
    # The caller set no cap; the sidecar must bound the output to the contract's.
    assert 0 < output_cap(forwarded) <= CONTRACT_MAX_OUTPUT_TOKENS


def test_chat_completion_keeps_callers_cap_and_reports_decision(
    stack: Stack, mock: MockUpstream, marker: str, call_id: str
) -> None:
    client = plain(stack.url)
    raw = client.chat.completions.with_raw_response.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": f"say hi {marker}"}],
        max_tokens=64,
        extra_headers=spendguard.proxy_headers(run_id="pytest-run", workflow_id="pytest-wf", call_id=call_id),
    )
    assert raw.headers.get("x-spendguard-decision") == "CONTINUE"
    assert raw.headers.get("x-spendguard-call-id") == call_id
    assert raw.headers.get("x-spendguard-reservation-id")
    assert raw.parse().choices[0].message.content
    assert output_cap(mock.one_with_marker(marker, "/v1/chat/completions")) == 64


def test_several_choices(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = plain(stack.url)
    completion = client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": f"two ways {marker}"}], n=2, max_tokens=8
    )
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage is not None and completion.usage.completion_tokens == 16
    assert mock.one_with_marker(marker, "/v1/chat/completions")["n"] == 2

    stream = client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": f"two ways {marker}"}], n=2, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(texts)


def test_chat_completion_stream(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = plain(stack.url)
    stream = client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": f"count {marker}"}], stream=True
    )
    chunks = list(stream)
    # What an unchanged client reads: every chunk has a choice. The usage chunk the sidecar asked
    # for on its behalf (it needs it to commit) is not shown to a client that did not ask.
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    assert all(c.usage is None for c in chunks)

    forwarded = mock.one_with_marker(marker, "/v1/chat/completions")
    assert forwarded["stream"] is True
    # The sidecar needs the final usage chunk to commit, so it asks for it even if the caller did not.
    assert forwarded.get("stream_options", {}).get("include_usage") is True
    assert 0 < output_cap(forwarded) <= CONTRACT_MAX_OUTPUT_TOKENS


def test_chat_completion_stream_with_usage(stack: Stack, marker: str) -> None:
    client = plain(stack.url)
    chunks = list(
        client.chat.completions.create(
            model=OPENAI_MODEL,
            messages=[{"role": "user", "content": f"count {marker}"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].total_tokens > 0


def test_responses_api(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = plain(stack.url)
    response = client.responses.create(model=OPENAI_MODEL, input=f"say hi {marker}")
    assert response.output_text
    assert response.usage is not None and response.usage.total_tokens > 0

    forwarded = mock.one_with_marker(marker, "/v1/responses")
    cap = forwarded.get("max_output_tokens")
    assert isinstance(cap, int) and 0 < cap <= CONTRACT_MAX_OUTPUT_TOKENS


def test_guarded_client_succeeds(stack: Stack, marker: str) -> None:
    client = spendguard.openai.OpenAI(sidecar_url=stack.url, api_key=OPENAI_KEY)
    assert str(client.base_url).rstrip("/") == f"{stack.url}/v1"
    completion = client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": f"say hi {marker}"}]
    )
    assert completion.choices[0].message.content


# -- refusals ---------------------------------------------------------------------------------


def chat(client: openai.OpenAI, marker: str, model: str = OPENAI_MODEL, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"hi {marker}"}], **kwargs
    )


def test_tight_budget_raises_budget_exceeded(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = spendguard.openai.OpenAI(sidecar_url=stack.tight_url, api_key=OPENAI_KEY)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        chat(client, marker)
    err = info.value
    assert err.reason == "BUDGET_EXHAUSTED"
    assert err.code == "BUDGET_EXHAUSTED"
    assert err.decision == "STOP"
    # Still the provider's own exception type, for code that already catches it.
    assert isinstance(err, openai.APIStatusError)
    assert err.status_code == 402
    assert err.type == "spendguard_budget_exceeded"
    # The refusal's signed evidence is published under this id.
    assert err.evidence_id is not None and len(err.evidence_id) == 36
    mock.assert_never_saw(marker)


def test_tight_budget_stream_and_responses(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = spendguard.openai.OpenAI(sidecar_url=stack.tight_url, api_key=OPENAI_KEY)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        for _ in chat(client, marker, stream=True):
            pass
    assert info.value.reason == "BUDGET_EXHAUSTED"

    with pytest.raises(spendguard.BudgetExceeded) as info:
        client.responses.create(model=OPENAI_MODEL, input=f"hi {marker}")
    assert info.value.reason == "BUDGET_EXHAUSTED"
    mock.assert_never_saw(marker)


def test_plain_client_under_typed_errors(stack: Stack, marker: str) -> None:
    with pytest.raises(spendguard.BudgetExceeded) as info, spendguard.typed_errors():
        chat(plain(stack.tight_url), marker)
    assert info.value.reason == "BUDGET_EXHAUSTED"
    assert info.value.status_code == 402
    assert isinstance(info.value.__cause__, openai.APIStatusError)


def test_soft_cap_raises_approval_required(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = spendguard.openai.OpenAI(sidecar_url=stack.softcap_url, api_key=OPENAI_KEY)
    with pytest.raises(spendguard.ApprovalRequired) as info:
        chat(client, marker)
    assert info.value.reason == "SOFT_CAP_REACHED"
    assert info.value.decision == "REQUIRE_APPROVAL"
    assert isinstance(info.value, openai.APIStatusError)
    assert info.value.type == "spendguard_approval_required"
    assert info.value.approval_id is not None and len(info.value.approval_id) == 36
    mock.assert_never_saw(marker)


def test_a_denied_approval_raises_approval_denied(stack: Stack, mock: MockUpstream, marker: str) -> None:
    # An unchanged call retried under its own call id (`x-spendguard-call-id`) once a human decided
    # (S16); the harness's approver denies approvals of calls named `deny-*`.
    client = spendguard.openai.OpenAI(sidecar_url=stack.softcap_url, api_key=OPENAI_KEY)
    headers = {"x-spendguard-call-id": decided_call_id("deny")}
    with pytest.raises(spendguard.ApprovalRequired) as asked:
        chat(client, marker, extra_headers=headers)
    with pytest.raises(spendguard.ApprovalDenied) as denied:
        when_decided(lambda: chat(client, marker, extra_headers=headers))
    assert denied.value.reason == "APPROVAL_DENIED"
    assert denied.value.decision == "STOP"
    assert denied.value.approval_id == asked.value.approval_id
    assert isinstance(denied.value, openai.APIStatusError)
    assert denied.value.status_code == 402
    mock.assert_never_saw(marker)


def test_denied_model(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = spendguard.openai.OpenAI(sidecar_url=stack.url, api_key=OPENAI_KEY)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        chat(client, marker, model=DENIED_MODEL)
    assert info.value.reason == "MODEL_DENIED"
    mock.assert_never_saw(marker)


async def test_async_clients(stack: Stack, marker: str) -> None:
    ok = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=OPENAI_KEY)
    completion = await ok.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": f"hi {marker}"}]
    )
    assert completion.choices[0].message.content

    tight = spendguard.openai.AsyncOpenAI(sidecar_url=stack.tight_url, api_key=OPENAI_KEY)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        await tight.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.reason == "BUDGET_EXHAUSTED"
