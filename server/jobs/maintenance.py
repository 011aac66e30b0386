"""The ``maintenance`` job: the engine's maintenance of one bank, a step at a time.

Each step (expire, idempotency purge, re-encode, merge, evict, gc, rebuild) is its own model-worker call, in
the engine's order, so queries interleave between steps, progress is ``done``/``total`` steps with the current
``step``, and a job stopped at shutdown resumes after the last finished step (each step is idempotent: a step
cut short by a crash is simply run again). The report is the one a single ``BankStore.maintain`` call makes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from kvstore.bank import BankStore
from kvstore.storage import idempotency

from .runner import JobContext

KIND = "maintenance"
ENGINE_STEPS = ("expire", "reencode", "merge", "evict", "gc")  # BankStore.maintain's order and flags
# The report keys each engine step writes; other keys a run reports are taken from whichever step set them.
OWNED = {"expire": ("expired_documents",), "reencode": ("rebound_model", "reencoded"), "merge": ("merged",),
         "evict": ("evicted", "over_budget"), "gc": ("orphan_blobs_removed", "session_orphan_blobs_removed")}


def plan(options: dict[str, bool]) -> list[str]:
    """The steps a request asks for, in the order they run (the idempotency purge goes with expiry, as the
    synchronous route did; the checksum rebuild comes last)."""
    steps = []
    for step in ENGINE_STEPS:
        if options.get(step, True):
            steps.append(step)
            if step == "expire":
                steps.append("idempotency")
    if options.get("rebuild", False):
        steps.append("rebuild")
    return steps


def run_step(store: BankStore, bank: str, step: str, idempotency_ttl_s: float) -> dict[str, Any]:
    """One step's part of the report (a model-worker call); idempotency records older than the TTL are purged."""
    if step == "idempotency":
        return {"idempotency_expired": idempotency.purge_expired(store.sessions, bank, idempotency_ttl_s)}
    if step == "rebuild":
        return {"verify": store.verify(bank)}
    return store.maintain(bank, **{name: name == step for name in ENGINE_STEPS})


def merge_report(report: dict[str, Any], step: str, part: dict[str, Any]) -> None:
    """Fold one step's report into the run's: the step's own keys win; another key keeps a set value."""
    owned = OWNED.get(step, tuple(part))
    for key, value in part.items():
        if key in owned or key not in report or (not report[key] and value):
            report[key] = value


async def run(ctx: JobContext) -> dict[str, Any]:
    bank = ctx.job.bank
    steps = plan(ctx.job.input.get("options", {}))
    report: dict[str, Any] = dict(ctx.job.state.get("report", {"bank": bank}))
    done = int(ctx.job.state.get("done", 0))
    for index in range(done, len(steps)):
        step = steps[index]
        await ctx.progress(done=index, total=len(steps), step=step, force=True)
        merge_report(report, step, await ctx.model(partial(run_step, ctx.store, bank, step,
                                                                    ctx.settings.idempotency_ttl_s)))
        await ctx.progress(done=index + 1, state={"report": report, "done": index + 1}, force=True)
    return report
