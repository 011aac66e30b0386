"""Durable background jobs: the runner that claims them from the catalog, and the work each kind does."""

from . import ingest, maintenance
from .runner import Handler, JobContext, JobError, JobRunner, JobStopped

HANDLERS: dict[str, Handler] = {ingest.KIND: ingest.run, maintenance.KIND: maintenance.run}

__all__ = ["HANDLERS", "JobContext", "JobError", "JobRunner", "JobStopped"]
