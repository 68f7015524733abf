"""A Pydantic-AI OpenAI model against the sidecar, with refusals as SpendGuard's typed exceptions.

How (verified on pydantic-ai-slim 2.68): `OpenAIChatModel` (the old `OpenAIModel` name is
removed in v2) sends through the `AsyncOpenAI` its `OpenAIProvider(openai_client=...)` holds,
and its `map_api_errors` turns any `openai.APIStatusError` into `ModelHTTPError` (`raise ...
from e`, body = the inner OpenAI error object, headers kept). We give the provider our guarded
`AsyncOpenAI`, and override `request` / `request_stream` to re-raise the refusal found in the
cause chain as the typed SpendGuard exception (`typed_errors()`), with the ModelHTTPError
attached as `__cause__`.

Agents built on any other model still get typed errors with `with spendguard.typed_errors():`
around `agent.run_sync(...)`: it recognises a ModelHTTPError whose body carries our code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

try:
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "spendguard.pydantic_ai needs the `pydantic-ai` extra: pip install 'spendguard[pydantic-ai]'"
    ) from exc

from . import openai as _guarded
from ._typed import typed_errors

__all__ = ["SpendGuardChatModel", "openai_model", "provider"]


def provider(
    *,
    sidecar_url: str | None = None,
    api_key: str | None = None,
    run_id: str | None = None,
    workflow_id: str | None = None,
    **client_kwargs: Any,
) -> OpenAIProvider:
    """An `OpenAIProvider` whose client is the guarded `AsyncOpenAI` pointed at the sidecar."""
    client = _guarded.AsyncOpenAI(
        sidecar_url=sidecar_url,
        api_key=api_key,
        run_id=run_id,
        workflow_id=workflow_id,
        **client_kwargs,
    )
    return OpenAIProvider(openai_client=client)


class SpendGuardChatModel(OpenAIChatModel):
    """`OpenAIChatModel` whose refusals surface as BudgetExceeded / ApprovalRequired / ... ."""

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        async with typed_errors():
            return await super().request(*args, **kwargs)

    @asynccontextmanager
    async def request_stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with typed_errors(), super().request_stream(*args, **kwargs) as stream:
            yield stream


def openai_model(
    model_name: str,
    *,
    sidecar_url: str | None = None,
    api_key: str | None = None,
    run_id: str | None = None,
    workflow_id: str | None = None,
    client_kwargs: Mapping[str, Any] | None = None,
    **model_kwargs: Any,
) -> SpendGuardChatModel:
    """A ready model for `Agent(openai_model("gpt-4o-mini"))`, guarded by the sidecar.

    `client_kwargs` go to the guarded `AsyncOpenAI` (timeout, max_retries, http_client, ...);
    `model_kwargs` to `OpenAIChatModel` (profile, settings).
    """
    return SpendGuardChatModel(
        model_name,
        provider=provider(
            sidecar_url=sidecar_url,
            api_key=api_key,
            run_id=run_id,
            workflow_id=workflow_id,
            **dict(client_kwargs or {}),
        ),
        **model_kwargs,
    )
