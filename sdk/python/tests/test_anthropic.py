"""The real `anthropic` client through the sidecar's proxy: only the base URL changes."""

from __future__ import annotations

import anthropic
import pytest

import spendguard
import spendguard.anthropic

from support import ANTHROPIC_KEY, ANTHROPIC_MODEL, MockUpstream, Stack


def plain(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=ANTHROPIC_KEY)


def test_messages(stack: Stack, mock: MockUpstream, marker: str) -> None:
    message = plain(stack.url).messages.create(
        model=ANTHROPIC_MODEL, max_tokens=128, messages=[{"role": "user", "content": f"say hi {marker}"}]
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    assert text
    assert message.usage.input_tokens > 0

    forwarded = mock.one_with_marker(marker, "/v1/messages")
    assert forwarded["model"] == ANTHROPIC_MODEL
    assert forwarded["max_tokens"] == 128


def test_messages_stream(stack: Stack, mock: MockUpstream, marker: str) -> None:
    with plain(stack.url).messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=128, messages=[{"role": "user", "content": f"count {marker}"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    assert final.usage.output_tokens > 0

    forwarded = mock.one_with_marker(marker, "/v1/messages")
    assert forwarded["stream"] is True


def test_messages_raw_stream_events(stack: Stack, marker: str) -> None:
    events = list(
        plain(stack.url).messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=128,
            messages=[{"role": "user", "content": f"count {marker}"}],
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds


def test_guarded_client_succeeds(stack: Stack, marker: str) -> None:
    client = spendguard.anthropic.Anthropic(sidecar_url=stack.url, api_key=ANTHROPIC_KEY)
    message = client.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=[{"role": "user", "content": f"hi {marker}"}]
    )
    assert message.content


# -- refusals ---------------------------------------------------------------------------------


def test_tight_budget_raises_budget_exceeded(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = spendguard.anthropic.Anthropic(sidecar_url=stack.tight_url, api_key=ANTHROPIC_KEY)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        client.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=64, messages=[{"role": "user", "content": f"hi {marker}"}]
        )
    err = info.value
    assert err.reason == "BUDGET_EXHAUSTED"
    assert err.decision == "STOP"
    assert isinstance(err, anthropic.APIStatusError)
    assert err.status_code == 402
    assert isinstance(err.body, dict) and err.body.get("type") == "error"
    mock.assert_never_saw(marker)


def test_tight_budget_stream(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = spendguard.anthropic.Anthropic(sidecar_url=stack.tight_url, api_key=ANTHROPIC_KEY)
    with (
        pytest.raises(spendguard.BudgetExceeded) as info,
        client.messages.stream(
            model=ANTHROPIC_MODEL, max_tokens=64, messages=[{"role": "user", "content": f"hi {marker}"}]
        ) as stream,
    ):
        stream.until_done()
    assert info.value.reason == "BUDGET_EXHAUSTED"
    mock.assert_never_saw(marker)


def test_plain_client_under_typed_errors(stack: Stack, marker: str) -> None:
    with pytest.raises(spendguard.BudgetExceeded) as info, spendguard.typed_errors():
        plain(stack.tight_url).messages.create(
            model=ANTHROPIC_MODEL, max_tokens=64, messages=[{"role": "user", "content": f"hi {marker}"}]
        )
    assert info.value.reason == "BUDGET_EXHAUSTED"
    assert isinstance(info.value.__cause__, anthropic.APIStatusError)


def test_soft_cap_raises_approval_required(stack: Stack, mock: MockUpstream, marker: str) -> None:
    client = spendguard.anthropic.Anthropic(sidecar_url=stack.softcap_url, api_key=ANTHROPIC_KEY)
    with pytest.raises(spendguard.ApprovalRequired) as info:
        client.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=64, messages=[{"role": "user", "content": f"hi {marker}"}]
        )
    assert info.value.reason == "SOFT_CAP_REACHED"
    assert info.value.decision == "REQUIRE_APPROVAL"
    assert info.value.approval_id is not None and len(info.value.approval_id) == 36
    mock.assert_never_saw(marker)


async def test_async_clients(stack: Stack, marker: str) -> None:
    ok = anthropic.AsyncAnthropic(base_url=stack.url, api_key=ANTHROPIC_KEY)
    message = await ok.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=[{"role": "user", "content": f"hi {marker}"}]
    )
    assert message.content

    tight = spendguard.anthropic.AsyncAnthropic(sidecar_url=stack.tight_url, api_key=ANTHROPIC_KEY)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        await tight.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.reason == "BUDGET_EXHAUSTED"
