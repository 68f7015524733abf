"""Where the sidecar is and what the SDK sends it: one place for defaults and proxy headers."""

from __future__ import annotations

import os
import uuid

DEFAULT_URL = "http://127.0.0.1:8787"
ENV_URL = "SPENDGUARD_URL"

HEADER_RUN_ID = "x-spendguard-run-id"
HEADER_WORKFLOW_ID = "x-spendguard-workflow-id"
HEADER_CALL_ID = "x-spendguard-call-id"
HEADER_DECISION = "x-spendguard-decision"
HEADER_RESERVATION_ID = "x-spendguard-reservation-id"


def sidecar_url(base_url: str | None = None) -> str:
    """The sidecar base URL: the argument, else $SPENDGUARD_URL, else the local default.

    Trailing slashes are dropped so callers can append `/v1/...` paths.
    """
    url = base_url or os.environ.get(ENV_URL) or DEFAULT_URL
    return url.rstrip("/")


def new_call_id() -> str:
    """A fresh call id in the sidecar's alphabet ([A-Za-z0-9._:-], at most 128 chars)."""
    return f"sg-{uuid.uuid4().hex}"


def proxy_headers(
    *,
    run_id: str | None = None,
    workflow_id: str | None = None,
    call_id: str | None = None,
) -> dict[str, str]:
    """Request headers that attribute a proxied provider call to a run, workflow and call id.

    Run and workflow ids can go in a client's `default_headers=`; a call id must be fresh per
    call (`extra_headers=` on that call): the proxy forwards a call id once and answers a reused
    one with 409 CALL_ID_REUSED, which the openai client even retries.
    """
    headers: dict[str, str] = {}
    if run_id is not None:
        headers[HEADER_RUN_ID] = run_id
    if workflow_id is not None:
        headers[HEADER_WORKFLOW_ID] = workflow_id
    if call_id is not None:
        headers[HEADER_CALL_ID] = call_id
    return headers
