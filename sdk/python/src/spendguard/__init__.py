"""SpendGuard Python SDK: talk to the SpendGuard sidecar, and get its refusals as typed exceptions.

Three ways in (see README.md):

- point a provider client at the sidecar: `spendguard.openai.OpenAI()`, `spendguard.anthropic.Anthropic()`,
  `spendguard.langchain.ChatOpenAI(...)`, `spendguard.pydantic_ai.openai_model(...)`;
- wrap any framework call in `with spendguard.typed_errors():`;
- call the decision API yourself: `SpendGuard().guard(...)` / `decide` / `commit` / `release`.

Provider and framework integrations live in submodules so that importing `spendguard` needs only httpx.
"""

from __future__ import annotations

from ._config import DEFAULT_URL, new_call_id, proxy_headers, sidecar_url
from ._typed import translate, typed_errors
from .client import AsyncGuardedCall, AsyncSpendGuard, GuardedCall, SpendGuard, usage_to_json
from .errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalRequired,
    BudgetExceeded,
    CallAlreadyResolved,
    CallNotFound,
    Conflict,
    GuardUnavailable,
    InvalidRequest,
    SpendGuardError,
    find_refusal,
)
from .types import NANO_USD_PER_USD, CommitResult, Decision, ReleaseResult, to_decimal_usd

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "NANO_USD_PER_USD",
    "ApprovalDenied",
    "ApprovalExpired",
    "ApprovalRequired",
    "AsyncGuardedCall",
    "AsyncSpendGuard",
    "BudgetExceeded",
    "CallAlreadyResolved",
    "CallNotFound",
    "CommitResult",
    "Conflict",
    "Decision",
    "GuardUnavailable",
    "GuardedCall",
    "InvalidRequest",
    "ReleaseResult",
    "SpendGuard",
    "SpendGuardError",
    "find_refusal",
    "new_call_id",
    "proxy_headers",
    "sidecar_url",
    "to_decimal_usd",
    "translate",
    "typed_errors",
    "usage_to_json",
]
