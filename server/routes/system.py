"""Health, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param

from kvstore.bank import BankStore
from kvstore.errors import KVRagError

from ..auth import Admin, get_principal
from ..errors import error_response, request_id_of
from ..schemas import ErrorOut, Status

router = APIRouter(tags=["system"])


@router.get("/healthz", operation_id="healthz", response_model=Status)
def healthz() -> Status:
    """The process is up (it may still be loading the model)."""
    return Status(status="ok")


def _is_admin(request: Request, store: BankStore) -> bool:
    """Whether the request carries the admin key (or an admin key over every bank); a missing or wrong key
    is no error here: /readyz stays open."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme.lower() == "bearer" else None
    try:
        principal = get_principal(request, store, bearer, request.headers.get("x-api-key"))
    except KVRagError:
        return False
    return principal.has_role("admin") and principal.all_banks


def integrity_summary(report: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The integrity report as counts, naming no bank: banks affected, snapshot problems, and the sum of each
    counter (``corrupt_blocks``, ``rebuilt_blocks``, ...)."""
    summary = {"banks": len(report), "index_problems": sum(1 for e in report.values() if e.get("index"))}
    for entry in report.values():
        for name, value in entry.items():
            if isinstance(value, int):
                summary[name] = summary.get(name, 0) + value
    return summary


@router.get("/readyz", operation_id="readyz", responses={503: {"model": ErrorOut}})
def readyz(request: Request) -> JSONResponse:
    """Ready once the model, catalog and indexes are loaded; 503 before that. ``integrity_summary`` counts the
    damage found and repaired since the start (a damaged bank never keeps the others from serving); with the
    admin key, ``integrity`` gives it per bank. Open: without a key it names no bank."""
    state = request.app.state
    store = getattr(state, "store", None)
    if store is None:
        failed = getattr(state, "load_error", None)
        detail = f"loading failed: {failed}" if failed else "loading the model, catalog and indexes"
        return error_response(503, "unavailable", detail, request_id_of(request), state.settings.retry_after_s)
    report = store.integrity_report()
    body: dict[str, Any] = {"status": "ready", "model": store.llm.name, "queue_depth": state.worker.depth,
                            "integrity_summary": integrity_summary(report)}
    if _is_admin(request, store):
        body["integrity"] = report
    return JSONResponse(body)


@router.get("/metrics", operation_id="metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, _admin: Admin) -> Response:
    """Prometheus text: requests and latency per route, model queue depth, hot-tier hits and misses."""
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
