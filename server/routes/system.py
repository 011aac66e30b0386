"""Health, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..auth import Admin
from ..errors import error_response, request_id_of
from ..schemas import ErrorOut, Status

router = APIRouter(tags=["system"])


@router.get("/healthz", operation_id="healthz", response_model=Status)
def healthz() -> Status:
    """The process is up (it may still be loading the model)."""
    return Status(status="ok")


@router.get("/readyz", operation_id="readyz", responses={503: {"model": ErrorOut}})
def readyz(request: Request) -> JSONResponse:
    """Ready once the model, catalog and indexes are loaded; 503 before that. ``integrity`` reports damage
    found and repaired since the start, per bank (a damaged bank never keeps the others from serving)."""
    state = request.app.state
    store = getattr(state, "store", None)
    if store is None:
        failed = getattr(state, "load_error", None)
        detail = f"loading failed: {failed}" if failed else "loading the model, catalog and indexes"
        return error_response(503, "unavailable", detail, request_id_of(request), state.settings.retry_after_s)
    return JSONResponse({"status": "ready", "model": store.llm.name, "queue_depth": state.worker.depth,
                         "integrity": store.integrity_report()})


@router.get("/metrics", operation_id="metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, _admin: Admin) -> Response:
    """Prometheus text: requests and latency per route, model queue depth, hot-tier hits and misses."""
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
