"""`typed_errors()`: surface SpendGuard refusals from inside any framework as typed exceptions.

Frameworks wrap provider exceptions (pydantic-ai raises `ModelHTTPError` from the openai
`APIStatusError`; LangChain re-wraps some statuses). Rather than teach every framework about
SpendGuard, this context manager looks through the raised exception's cause/context chain
and, if a SpendGuard refusal is in it, raises the typed exception `from` the original, so the
framework's exception stays attached for debugging.
"""

from __future__ import annotations

from types import TracebackType

from .errors import SpendGuardError, find_refusal

__all__ = ["translate", "typed_errors"]


def translate(exc: BaseException) -> SpendGuardError | None:
    """The typed exception to raise instead of `exc`, or None to let `exc` propagate.

    A SpendGuard exception raised directly (e.g. by the guarded clients) is left alone.
    """
    if isinstance(exc, SpendGuardError) or not isinstance(exc, Exception):
        return None
    found = find_refusal(exc)
    if found is None:
        return None
    return found.plain()


class typed_errors:
    """Context manager (sync `with` and `async with`) re-raising refusals as typed exceptions.

    Also usable around generators: wrap the `for` loop that consumes a stream.
    """

    def __enter__(self) -> typed_errors:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is not None:
            typed = translate(exc)
            if typed is not None:
                raise typed from exc
        return False

    async def __aenter__(self) -> typed_errors:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self.__exit__(exc_type, exc, tb)
