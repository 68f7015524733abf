"""Anthropic clients pointed at the sidecar whose refusals raise SpendGuard's typed exceptions.

Same mechanism as `spendguard.openai`: the anthropic library builds every status exception in
`_make_status_error(err_msg, *, body, response)` (verified on anthropic 2.14; it is marked
`@final` for type checkers only, and is also called for `error` events inside a stream). Our
override returns, for SpendGuard refusals, a class that is both `anthropic.APIStatusError` and
the SpendGuard exception. Anthropic keeps the whole body (`{"type": "error", "error": {...}}`)
as `.body`, so we do too.

The Anthropic API lives at the sidecar root (`/v1/messages`), so `base_url` is the sidecar URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

try:
    import anthropic as _anthropic
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "spendguard.anthropic needs the `anthropic` extra: pip install 'spendguard[anthropic]'"
    ) from exc

from . import errors as _errors
from ._config import proxy_headers
from ._config import sidecar_url as _sidecar_root

__all__ = [
    "Anthropic",
    "AnthropicApprovalDenied",
    "AnthropicApprovalExpired",
    "AnthropicApprovalRequired",
    "AnthropicBudgetExceeded",
    "AnthropicGuardUnavailable",
    "AsyncAnthropic",
]

PLACEHOLDER_API_KEY = "spendguard-sidecar"


class AnthropicBudgetExceeded(_anthropic.APIStatusError, _errors.BudgetExceeded):  # pyright: ignore[reportIncompatibleVariableOverride]
    """A STOP from the proxy, as both anthropic.APIStatusError (HTTP 402) and BudgetExceeded."""


class AnthropicApprovalRequired(_anthropic.APIStatusError, _errors.ApprovalRequired):  # pyright: ignore[reportIncompatibleVariableOverride]
    """A REQUIRE_APPROVAL from the proxy (HTTP 402)."""


class AnthropicApprovalDenied(_anthropic.APIStatusError, _errors.ApprovalDenied):  # pyright: ignore[reportIncompatibleVariableOverride]
    """An approval was denied (HTTP 402/403)."""


class AnthropicApprovalExpired(_anthropic.APIStatusError, _errors.ApprovalExpired):  # pyright: ignore[reportIncompatibleVariableOverride]
    """An approval expired (HTTP 402/403)."""


class AnthropicGuardUnavailable(_anthropic.APIStatusError, _errors.GuardUnavailable):  # pyright: ignore[reportIncompatibleVariableOverride]
    """The guard could not decide (HTTP 503, or 502 `LEDGER_ANSWER_UNREADABLE`); fail-closed."""


_MIXED: dict[type[_errors.SpendGuardError], type[_anthropic.APIStatusError]] = {
    _errors.BudgetExceeded: AnthropicBudgetExceeded,
    _errors.ApprovalRequired: AnthropicApprovalRequired,
    _errors.ApprovalDenied: AnthropicApprovalDenied,
    _errors.ApprovalExpired: AnthropicApprovalExpired,
    _errors.GuardUnavailable: AnthropicGuardUnavailable,
}


def _typed_status_error(err_msg: str, body: object, response: Any) -> _anthropic.APIStatusError | None:
    found = _errors.refusal_from_parts(response.status_code, response.headers, body)
    if found is None:
        return None
    cls, fields = found
    fields.pop("message")
    exc = _MIXED[cls](err_msg, response=response, body=body)
    exc._fill(**fields)  # type: ignore[attr-defined]
    return exc


def _client_kwargs(
    sidecar: str | None,
    base_url: str | None,
    api_key: str | None,
    run_id: str | None,
    workflow_id: str | None,
    default_headers: Mapping[str, str] | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    headers = {**proxy_headers(run_id=run_id, workflow_id=workflow_id), **(default_headers or {})}
    if api_key is None and kwargs.get("auth_token") is None:
        # The sidecar may hold the provider key itself; anthropic wants some credential.
        api_key = os.environ.get("ANTHROPIC_API_KEY", PLACEHOLDER_API_KEY)
    return {
        **kwargs,
        "base_url": base_url if base_url is not None else _sidecar_root(sidecar),
        "api_key": api_key,
        "default_headers": headers or None,
    }


class Anthropic(_anthropic.Anthropic):
    """`anthropic.Anthropic` against the sidecar (`sidecar_url` defaults to `$SPENDGUARD_URL`).

    `run_id` / `workflow_id` become `x-spendguard-*` default headers for attribution.
    """

    def __init__(
        self,
        *,
        sidecar_url: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        run_id: str | None = None,
        workflow_id: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            **_client_kwargs(sidecar_url, base_url, api_key, run_id, workflow_id, default_headers, kwargs)
        )

    def _make_status_error(  # type: ignore[misc]  # @final is advisory; see module docstring
        self, err_msg: str, *, body: object, response: Any
    ) -> _anthropic.APIStatusError:
        return _typed_status_error(err_msg, body, response) or super()._make_status_error(
            err_msg, body=body, response=response
        )


class AsyncAnthropic(_anthropic.AsyncAnthropic):
    """`anthropic.AsyncAnthropic` against the sidecar; see `Anthropic`."""

    def __init__(
        self,
        *,
        sidecar_url: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        run_id: str | None = None,
        workflow_id: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            **_client_kwargs(sidecar_url, base_url, api_key, run_id, workflow_id, default_headers, kwargs)
        )

    def _make_status_error(  # type: ignore[misc]
        self, err_msg: str, *, body: object, response: Any
    ) -> _anthropic.APIStatusError:
        return _typed_status_error(err_msg, body, response) or super()._make_status_error(
            err_msg, body=body, response=response
        )
