"""LangChain `ChatOpenAI` against the sidecar, with refusals as SpendGuard's typed exceptions.

How (verified on langchain-openai 1.7): `ChatOpenAI.validate_environment` builds
`openai.OpenAI` / `openai.AsyncOpenAI` into `root_client` / `root_async_client` only when no
`client` / `async_client` was given, and every request goes through those four fields. We hand
it our guarded clients (`spendguard.openai`), so a STOP (HTTP 402, a plain `APIStatusError` to
LangChain) comes out of `invoke`/`stream`/`ainvoke`/`astream` as `BudgetExceeded` untouched.

LangChain re-wraps some statuses into its own classes (403 -> OpenAIPermissionDeniedError,
5xx -> OpenAIAPIError, `raise ... from e`), which would hide an ApprovalDenied or a
GuardUnavailable; the generate/stream hooks therefore also run under `typed_errors()`.

`stream_usage` defaults to True: a non-default base URL turns LangChain's default off, and the
sidecar commits from the final usage chunk anyway, so the caller may as well see it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

try:
    from langchain_openai import ChatOpenAI as _ChatOpenAI
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "spendguard.langchain needs the `langchain` extra: pip install 'spendguard[langchain]'"
    ) from exc

from pydantic import Field, model_validator

from . import openai as _guarded
from ._config import proxy_headers
from ._typed import typed_errors

__all__ = ["ChatOpenAI"]

# Field name -> alias in langchain-openai; users may pass either.
_ALIASES = {"openai_api_base": "base_url", "openai_api_key": "api_key", "request_timeout": "timeout"}


def _pop(data: dict[str, Any], name: str) -> Any:
    alias = _ALIASES.get(name)
    value = data.pop(name, None)
    if alias is not None:
        alias_value = data.pop(alias, None)
        value = value if value is not None else alias_value
    return value


class ChatOpenAI(_ChatOpenAI):
    """`langchain_openai.ChatOpenAI` whose requests go through the SpendGuard sidecar.

    Extra arguments: `sidecar_url` (default `$SPENDGUARD_URL`), `run_id`, `workflow_id`.
    An explicit `base_url` is used as is; passing your own `client`s opts out of the guarded ones.
    """

    stream_usage: bool | None = True
    sidecar_url: str | None = Field(default=None, exclude=True)
    """Sidecar root URL (default `$SPENDGUARD_URL`); requests go to `{sidecar_url}/v1`."""
    run_id: str | None = Field(default=None, exclude=True)
    """Sent as `x-spendguard-run-id` on every request."""
    workflow_id: str | None = Field(default=None, exclude=True)
    """Sent as `x-spendguard-workflow-id` on every request."""

    @model_validator(mode="before")
    @classmethod
    def _spendguard_clients(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        sidecar = data.get("sidecar_url")
        run_id = data.get("run_id")
        workflow_id = data.get("workflow_id")
        if any(
            data.get(k) is not None for k in ("client", "root_client", "async_client", "root_async_client")
        ):
            return data
        base_url = _pop(data, "openai_api_base")
        api_key = _pop(data, "openai_api_key")
        if hasattr(api_key, "get_secret_value"):
            api_key = api_key.get_secret_value()
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or _guarded.PLACEHOLDER_API_KEY
        timeout = _pop(data, "request_timeout")
        common: dict[str, Any] = {
            "sidecar_url": sidecar,
            "base_url": base_url,
            "api_key": api_key,
            "default_headers": {
                **proxy_headers(run_id=run_id, workflow_id=workflow_id),
                **(data.get("default_headers") or {}),
            },
        }
        if data.get("default_query") is not None:
            common["default_query"] = data["default_query"]
        if timeout is not None:
            common["timeout"] = timeout
        if data.get("max_retries") is not None:
            common["max_retries"] = data["max_retries"]
        if data.get("organization") is not None or data.get("openai_organization") is not None:
            common["organization"] = data.get("organization") or data.get("openai_organization")
        # LangChain's own http_client / http_async_client fields, if given, carry over.
        sync_extra = {"http_client": data["http_client"]} if data.get("http_client") is not None else {}
        async_extra = (
            {"http_client": data["http_async_client"]} if data.get("http_async_client") is not None else {}
        )
        root = _guarded.OpenAI(**common, **sync_extra)
        aroot = _guarded.AsyncOpenAI(**common, **async_extra)
        data.update(
            root_client=root,
            client=root.chat.completions,
            root_async_client=aroot,
            async_client=aroot.chat.completions,
            # Keep the fields truthful for anything that reads them (tracing, serialisation).
            openai_api_base=str(root.base_url),
            openai_api_key=api_key,
        )
        if timeout is not None:
            data["request_timeout"] = timeout
        return data

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        with typed_errors():
            return super()._generate(*args, **kwargs)

    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        async with typed_errors():
            return await super()._agenerate(*args, **kwargs)

    def _stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with typed_errors():
            yield from super()._stream(*args, **kwargs)

    async def _astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with typed_errors():
            async for chunk in super()._astream(*args, **kwargs):
                yield chunk
