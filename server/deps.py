"""Shared dependencies: the loaded store and the model worker, and dataclass -> JSON helpers."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request

from kvstore.bank import BankStore
from kvstore.errors import Unavailable

from .worker import ModelWorker


def get_store(request: Request) -> BankStore:
    """The loaded store; 503 while the model and catalog are still loading."""
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise Unavailable("the server is still starting")
    return store


def get_worker(request: Request) -> ModelWorker:
    return request.app.state.worker


Store = Annotated[BankStore, Depends(get_store)]
Worker = Annotated[ModelWorker, Depends(get_worker)]


def _aware(value: Any) -> Any:
    """A naive datetime is UTC (the catalog stores UTC; SQLite drops the offset). Sent without one it
    would not be an RFC 3339 ``date-time``, which the OpenAPI schema promises."""
    return value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value


def plain(value: Any) -> dict[str, Any]:
    """A dataclass as a dict (nested dataclasses too), ready for a response model; datetimes carry UTC."""
    return dataclasses.asdict(value, dict_factory=lambda items: {k: _aware(v) for k, v in items})
