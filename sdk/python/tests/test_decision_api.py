"""The direct decision-API clients against a real sidecar: decide / commit / release / guard()."""

from __future__ import annotations

import dataclasses
import re

import pytest

import spendguard

from support import CONTRACT_MAX_OUTPUT_TOKENS, DENIED_MODEL, OPENAI_MODEL, Stack, decided_call_id, when_decided

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Well inside the worst case reserved below (1000 input tokens, 100 output tokens).
CHAT_USAGE = {"prompt_tokens": 400, "completion_tokens": 40, "total_tokens": 440}


def decide_ample(sg: spendguard.SpendGuard, call_id: str) -> spendguard.Decision:
    return sg.decide(
        provider="openai",
        model=OPENAI_MODEL,
        input_tokens_upper_bound=1000,
        max_output_tokens=100,
        call_id=call_id,
        # Run ids are lowercase names; one per call keeps any per-run budget fresh.
        run_id=f"run-{call_id}",
        workflow_id="pytest-workflow",
    )


def assert_continue(decision: spendguard.Decision, call_id: str) -> None:
    assert decision.decision == "CONTINUE"
    assert decision.reason == "WITHIN_BUDGET"
    assert decision.call_id == call_id
    assert decision.reservation_id
    assert decision.reserved_nano_usd > 0
    assert decision.max_output_tokens == 100
    assert SHA256.match(decision.pricing_sha256), decision.pricing_sha256
    assert SHA256.match(decision.bundle_sha256), decision.bundle_sha256
    assert decision.contract_version and decision.pricing_version
    assert decision.fail_open is False
    assert decision.pricing_stale is False


def test_decide_commit_and_replayed_commit(sg: spendguard.SpendGuard, call_id: str) -> None:
    decision = decide_ample(sg, call_id)
    assert_continue(decision, call_id)
    assert decision.replayed is False

    again = decide_ample(sg, call_id)
    assert again.replayed is True
    assert again.reservation_id == decision.reservation_id
    assert again.reserved_nano_usd == decision.reserved_nano_usd

    first = sg.commit(call_id, usage_format="openai_chat", usage=CHAT_USAGE)
    assert first.call_id == call_id
    assert first.replayed is False
    assert 0 < first.actual_nano_usd <= decision.reserved_nano_usd
    assert first.committed_nano_usd == first.actual_nano_usd
    assert first.overrun_nano_usd == 0
    assert first.released_nano_usd == decision.reserved_nano_usd - first.committed_nano_usd

    second = sg.commit(call_id, usage_format="openai_chat", usage=CHAT_USAGE)
    assert second.replayed is True
    assert dataclasses.replace(second, replayed=False) == first


def test_decide_release_and_replayed_release(sg: spendguard.SpendGuard, call_id: str) -> None:
    decision = decide_ample(sg, call_id)
    assert_continue(decision, call_id)

    first = sg.release(call_id, reason="pytest_abandoned")
    assert first.call_id == call_id
    assert first.replayed is False
    assert first.released_nano_usd == decision.reserved_nano_usd

    second = sg.release(call_id, reason="pytest_abandoned")
    assert second.replayed is True
    assert second.released_nano_usd == first.released_nano_usd

    with pytest.raises(spendguard.CallAlreadyResolved) as info:
        sg.commit(call_id, usage_format="openai_chat", usage=CHAT_USAGE)
    assert info.value.code == "CALL_ALREADY_RESOLVED"
    assert info.value.status_code == 409


def test_commit_of_unknown_call_is_not_found(sg: spendguard.SpendGuard, call_id: str) -> None:
    with pytest.raises(spendguard.CallNotFound) as info:
        sg.commit(call_id, usage_format="openai_chat", usage=CHAT_USAGE)
    assert info.value.code == "CALL_NOT_FOUND"
    assert info.value.status_code == 404


def test_negative_max_output_tokens_is_invalid(sg: spendguard.SpendGuard, call_id: str) -> None:
    with pytest.raises(spendguard.InvalidRequest) as info:
        sg.decide(
            provider="openai",
            model=OPENAI_MODEL,
            input_tokens_upper_bound=10,
            max_output_tokens=-1,
            call_id=call_id,
        )
    assert isinstance(info.value, ValueError)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.field == "max_output_tokens"
    assert info.value.status_code == 400


def test_guard_commits_or_releases(sg: spendguard.SpendGuard) -> None:
    with sg.guard(
        provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=1000, max_output_tokens=100
    ) as g:
        assert g.decision.decision == "CONTINUE"
        committed = g.commit(usage_format="openai_chat", usage=CHAT_USAGE)
    assert committed.actual_nano_usd > 0
    assert g.released is None

    with sg.guard(
        provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=1000, max_output_tokens=100
    ) as g:
        pass
    assert g.released is not None
    assert g.released.released_nano_usd == g.decision.reserved_nano_usd

    class Boom(Exception):
        pass

    with (
        pytest.raises(Boom),
        sg.guard(
            provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=1000, max_output_tokens=100
        ) as g,
    ):
        raise Boom
    # The body's failure released the reservation: releasing again is a replay.
    assert sg.release(g.call_id, reason="pytest_check").replayed is True


def test_tight_budget_stops(stack: Stack, call_id: str) -> None:
    tight = spendguard.SpendGuard(stack.tight_url)
    with pytest.raises(spendguard.BudgetExceeded) as info:
        tight.decide(provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100, call_id=call_id)
    tight.close()
    err = info.value
    assert err.reason == "BUDGET_EXHAUSTED"
    assert err.decision == "STOP"
    assert err.call_id == call_id
    assert err.decision_response is not None
    assert err.decision_response.reservation_id is None
    assert err.decision_response.reserved_nano_usd == 0
    # The refusal's signed evidence is published under this id (a UUID).
    evidence_id = err.decision_response.evidence_id
    assert evidence_id is not None and len(evidence_id) == 36
    assert err.evidence_id == evidence_id


def test_tight_budget_unchecked_returns_stop(stack: Stack, call_id: str) -> None:
    with spendguard.SpendGuard(stack.tight_url) as tight:
        decision = tight.decide(
            provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100, call_id=call_id, check=False
        )
    assert decision.decision == "STOP"
    assert decision.reason == "BUDGET_EXHAUSTED"
    assert not decision.allowed
    assert decision.evidence_id is not None


def test_soft_cap_requires_approval(stack: Stack, call_id: str) -> None:
    soft = spendguard.SpendGuard(stack.softcap_url)
    with pytest.raises(spendguard.ApprovalRequired) as info:
        soft.decide(provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100, call_id=call_id)
    soft.close()
    assert info.value.decision == "REQUIRE_APPROVAL"
    assert info.value.reason == "SOFT_CAP_REACHED"
    # The ledger holds a pending approval under this id (a UUID).
    assert info.value.approval_id is not None and len(info.value.approval_id) == 36


def test_a_denied_approval_raises_approval_denied(stack: Stack) -> None:
    # The harness's approver denies approvals of calls named `deny-*` (S16).
    call_id = decided_call_id("deny")
    with spendguard.SpendGuard(stack.softcap_url) as soft:

        def decide() -> spendguard.Decision:
            return soft.decide(provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100, call_id=call_id)

        with pytest.raises(spendguard.ApprovalRequired) as asked:
            decide()
        with pytest.raises(spendguard.ApprovalDenied) as info:
            when_decided(decide)
    assert info.value.reason == "APPROVAL_DENIED"
    assert info.value.decision == "STOP"
    assert info.value.approval_id == asked.value.approval_id
    assert not isinstance(info.value, spendguard.BudgetExceeded)


def test_an_approved_call_resumes_and_settles(stack: Stack) -> None:
    # The harness's approver approves approvals of calls named `approve-*` (S16).
    call_id = decided_call_id("approve")
    with spendguard.SpendGuard(stack.softcap_url) as soft:

        def decide() -> spendguard.Decision:
            return soft.decide(provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100, call_id=call_id)

        with pytest.raises(spendguard.ApprovalRequired) as asked:
            decide()
        decision = when_decided(decide)
        assert decision.decision == "CONTINUE"
        assert decision.reason == "APPROVED"
        assert decision.approval_id == asked.value.approval_id
        assert decision.reservation_id is not None
        committed = soft.commit(call_id, usage={"prompt_tokens": 10, "completion_tokens": 10}, usage_format="openai_chat")
    assert committed.actual_nano_usd == 10 * 150 + 10 * 600


def test_denied_model_stops(sg: spendguard.SpendGuard, call_id: str) -> None:
    with pytest.raises(spendguard.BudgetExceeded) as info:
        sg.decide(provider="openai", model=DENIED_MODEL, input_tokens_upper_bound=100, call_id=call_id)
    assert info.value.reason == "MODEL_DENIED"
    assert info.value.decision == "STOP"


def test_contract_cap_applies_when_no_max_output_tokens(sg: spendguard.SpendGuard, call_id: str) -> None:
    decision = sg.decide(provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100, call_id=call_id)
    try:
        assert decision.max_output_tokens is not None
        assert 0 < decision.max_output_tokens <= CONTRACT_MAX_OUTPUT_TOKENS
    finally:
        sg.release(call_id, reason="pytest_done")


def test_choices_reserve_each_output(sg: spendguard.SpendGuard, call_id: str) -> None:
    def reserve(suffix: str, **kwargs: int) -> spendguard.Decision:
        return sg.decide(
            provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100, call_id=f"{call_id}-{suffix}", **kwargs
        )

    one = reserve("one", max_output_tokens=50)
    three = reserve("three", max_output_tokens=50, choices=3)
    long = reserve("long", max_output_tokens=150)
    try:
        # The input is reserved once and 50 output tokens per choice: the same worst case as one
        # choice of 150 tokens, while the limit the upstream enforces stays 50 per choice.
        assert three.reserved_nano_usd == long.reserved_nano_usd > one.reserved_nano_usd
        assert three.max_output_tokens == 50
    finally:
        for suffix in ("one", "three", "long"):
            sg.release(f"{call_id}-{suffix}", reason="pytest_done")
    with pytest.raises(spendguard.InvalidRequest) as refused:
        sg.decide(provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100, choices=0, call_id=call_id)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert refused.value.field == "choices"


async def test_async_client_round_trip(stack: Stack, call_id: str) -> None:
    async with spendguard.AsyncSpendGuard(stack.url) as asg:
        decision = await asg.decide(
            provider="openai",
            model=OPENAI_MODEL,
            input_tokens_upper_bound=1000,
            max_output_tokens=100,
            call_id=call_id,
        )
        assert_continue(decision, call_id)
        committed = await asg.commit(call_id, usage_format="openai_chat", usage=CHAT_USAGE)
        assert committed.actual_nano_usd > 0
        replay = await asg.commit(call_id, usage_format="openai_chat", usage=CHAT_USAGE)
        assert replay.replayed is True
        assert replay.committed_nano_usd == committed.committed_nano_usd

        async with asg.guard(provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=1000) as g:
            pass
        assert g.released is not None
        assert g.released.released_nano_usd == g.decision.reserved_nano_usd

    async with spendguard.AsyncSpendGuard(stack.tight_url) as tight:
        with pytest.raises(spendguard.BudgetExceeded) as info:
            await tight.decide(provider="openai", model=OPENAI_MODEL, input_tokens_upper_bound=100)
    assert info.value.reason == "BUDGET_EXHAUSTED"
