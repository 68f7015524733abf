"""The S16 examples in sdk/python/examples, run against the soft-capped sidecar: every call
there needs approval, which the harness's approver grants to `approve-*` calls and refuses to
`deny-*` calls. An example that no longer works fails here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import spendguard

from support import OPENAI_KEY, Stack, decided_call_id

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["langchain_approvals", "pydantic_ai_approvals"])
def test_approval_examples_resume_approved_steps_and_skip_denied_ones(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    module = example(name)
    answer = module.run_step(stack.softcap_url, "Summarise the findings.", decided_call_id("approve"))
    assert isinstance(answer, str) and answer
    assert module.run_step(stack.softcap_url, "Summarise the findings.", decided_call_id("deny")) is None
    # Beyond the budget, the step is stopped, not waited on.
    with pytest.raises(spendguard.BudgetExceeded):
        module.run_step(stack.tight_url, "Summarise the findings.")
