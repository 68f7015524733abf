"""OpenAI clients pointed at the sidecar whose refusals raise SpendGuard's typed exceptions.

How: the openai library turns every non-2xx answer into an exception in one overridable
method, `_make_status_error(err_msg, *, body, response)` (verified on openai 3.57). Our
override returns, for SpendGuard refusals only, an exception class that is BOTH an
`openai.APIStatusError` and e.g. `spendguard.BudgetExceeded`. So existing `except
openai.APIStatusError` code keeps working, `except spendguard.BudgetExceeded` works too, and
frameworks that re-raise provider errors untouched (LangChain on a 402) surface it as is.

The mixed classes derive from plain `APIStatusError`, not from the status-specific subclass
(`PermissionDeniedError`, `InternalServerError`): a budget refusal is not an auth or server
fault, and frameworks translate those subclasses into their own errors.

Other errors (including the proxy's 400/413 `invalid_request_error`) stay openai's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import openai as _openai
    from openai._utils import is_mapping as _is_mapping
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("spendguard.openai needs the `openai` extra: pip install 'spendguard[openai]'") from exc

from . import errors as _errors
from ._config import proxy_headers
from ._config import sidecar_url as _sidecar_root

__all__ = [
    "AsyncOpenAI",
    "OpenAI",
    "OpenAIApprovalDenied",
    "OpenAIApprovalExpired",
    "OpenAIApprovalRequired",
    "OpenAIBudgetExceeded",
    "OpenAIGuardUnavailable",
    "openai_base_url",
]

PLACEHOLDER_API_KEY = "spendguard-sidecar"


class OpenAIBudgetExceeded(_openai.APIStatusError, _errors.BudgetExceeded):  # pyright: ignore[reportIncompatibleVariableOverride]
    """A STOP from the proxy, as both openai.APIStatusError (HTTP 402) and BudgetExceeded."""


class OpenAIApprovalRequired(_openai.APIStatusError, _errors.ApprovalRequired):  # pyright: ignore[reportIncompatibleVariableOverride]
    """A REQUIRE_APPROVAL from the proxy (HTTP 402)."""


class OpenAIApprovalDenied(_openai.APIStatusError, _errors.ApprovalDenied):  # pyright: ignore[reportIncompatibleVariableOverride]
    """An approval was denied (HTTP 402/403)."""


class OpenAIApprovalExpired(_openai.APIStatusError, _errors.ApprovalExpired):  # pyright: ignore[reportIncompatibleVariableOverride]
    """An approval expired (HTTP 402/403)."""


class OpenAIGuardUnavailable(_openai.APIStatusError, _errors.GuardUnavailable):  # pyright: ignore[reportIncompatibleVariableOverride]
    """The guard could not decide (HTTP 503, or 502 `LEDGER_ANSWER_UNREADABLE`); fail-closed."""


_MIXED: dict[type[_errors.SpendGuardError], type[_openai.APIStatusError]] = {
    _errors.BudgetExceeded: OpenAIBudgetExceeded,
    _errors.ApprovalRequired: OpenAIApprovalRequired,
    _errors.ApprovalDenied: OpenAIApprovalDenied,
    _errors.ApprovalExpired: OpenAIApprovalExpired,
    _errors.GuardUnavailable: OpenAIGuardUnavailable,
}


def _typed_status_error(err_msg: str, body: object, response: Any) -> _openai.APIStatusError | None:
    found = _errors.refusal_from_parts(response.status_code, response.headers, body)
    if found is None:
        return None
    cls, fields = found
    message = fields.pop("message")
    # openai stores the inner error object as `.body`; keep that convention.
    data = body.get("error", body) if _is_mapping(body) else body
    exc = _MIXED[cls](
        err_msg if message in err_msg else f"{err_msg} - {message}", response=response, body=data
    )
    exc._fill(**fields)  # type: ignore[attr-defined]
    return exc


def openai_base_url(base_url: str | None = None) -> str:
    """The OpenAI-compatible base URL of the sidecar (`{sidecar}/v1`)."""
    return _sidecar_root(base_url) + "/v1"


def _client_kwargs(
    sidecar: str | None,
    base_url: str | None,
    api_key: Any,
    run_id: str | None,
    workflow_id: str | None,
    default_headers: Mapping[str, str] | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    import os

    headers = {**proxy_headers(run_id=run_id, workflow_id=workflow_id), **(default_headers or {})}
    return {
        **kwargs,
        # An explicit base_url is the full OpenAI base (as with openai.OpenAI); else the sidecar's /v1.
        "base_url": base_url if base_url is not None else openai_base_url(sidecar),
        # The sidecar may hold the provider key itself; openai refuses to build a client without one.
        "api_key": api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", PLACEHOLDER_API_KEY),
        "default_headers": headers or None,
    }


class OpenAI(_openai.OpenAI):
    """`openai.OpenAI` against the sidecar.

    `sidecar_url` is the sidecar root (default `$SPENDGUARD_URL`); the client's `base_url` becomes
    `{sidecar_url}/v1`. An explicit `base_url` is used as is, as with `openai.OpenAI`.

    `run_id` / `workflow_id` become `x-spendguard-*` default headers for attribution.
    """

    def __init__(
        self,
        *,
        sidecar_url: str | None = None,
        base_url: str | None = None,
        api_key: Any = None,
        run_id: str | None = None,
        workflow_id: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            **_client_kwargs(sidecar_url, base_url, api_key, run_id, workflow_id, default_headers, kwargs)
        )

    def _make_status_error(self, err_msg: str, *, body: object, response: Any) -> _openai.APIStatusError:
        return _typed_status_error(err_msg, body, response) or super()._make_status_error(
            err_msg, body=body, response=response
        )


class AsyncOpenAI(_openai.AsyncOpenAI):
    """`openai.AsyncOpenAI` against the sidecar; see `OpenAI`."""

    def __init__(
        self,
        *,
        sidecar_url: str | None = None,
        base_url: str | None = None,
        api_key: Any = None,
        run_id: str | None = None,
        workflow_id: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            **_client_kwargs(sidecar_url, base_url, api_key, run_id, workflow_id, default_headers, kwargs)
        )

    def _make_status_error(self, err_msg: str, *, body: object, response: Any) -> _openai.APIStatusError:
        return _typed_status_error(err_msg, body, response) or super()._make_status_error(
            err_msg, body=body, response=response
        )
