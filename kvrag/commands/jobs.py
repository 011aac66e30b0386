"""``kvrag jobs``: ls, get, wait (with a progress bar), cancel."""

from __future__ import annotations

from typing import Annotated

import typer
from kvrag_client import Job, JobFailed, KVRag
from tqdm import tqdm

from .common import DEFAULT_URL, ApiKey, Bank, JsonOut, Url, connect, fail, print_json

app = typer.Typer(help="Background jobs (large batch ingests, maintenance): list, show, wait for, cancel.",
                  no_args_is_help=True)
JobId = Annotated[str, typer.Argument(help="The job's id (as the batch answer or `jobs ls` gave it).",
                                      show_default=False)]


def _line(job: Job) -> str:
    made = job.created_at.isoformat(timespec="seconds") if job.created_at else "-"
    error = f"\t{job.error}" if job.error else ""
    step = f"\t{job.step}" if job.step and not job.finished else ""
    return f"{job.id}\t{job.kind}\t{job.status}\t{job.done}/{job.total}\t{made}{step}{error}"


def wait_with_bar(kv: KVRag, job_id: str, *, poll_interval: float = 0.5, timeout: float = 3600.0) -> Job:
    """Wait for a job with a progress bar on stderr (documents of an ingest, steps of a maintenance run, the
    current step shown); a failed job is returned like any other, for the caller to report."""
    bars: list[tqdm[None]] = []  # opened at the first answer, so a failure to connect prints only its error

    def progress(job: Job) -> None:
        if not bars:
            unit = "step" if job.kind == "maintenance" else "doc"
            bars.append(tqdm(total=job.total, unit=unit, desc=f"job {job_id[:8]}", dynamic_ncols=True))
        bar = bars[0]
        bar.total = job.total or bar.total
        bar.n = job.done or 0
        bar.set_postfix_str(f"{job.status} {job.step}" if job.step and not job.finished else job.status)
        bar.refresh()

    try:
        return kv.jobs.wait(job_id, poll_interval=poll_interval, timeout=timeout, progress=progress)
    except JobFailed:
        return kv.jobs.get(job_id)
    finally:
        for bar in bars:
            bar.close()


@app.command("ls")
def jobs_ls(bank: Bank,
            limit: Annotated[int | None, typer.Option(min=1, max=1000, help="Jobs fetched per request (all are "
                                                      "listed).", show_default=False)] = None,
            json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List a bank's jobs, newest first: id, kind, status, done/total, started."""
    with connect(url, api_key) as kv:
        jobs = list(kv.jobs.list(bank, limit=limit))
    if json_out:
        print_json([j.model_dump(mode="json") for j in jobs])
        return
    for job in jobs:
        typer.echo(_line(job))


@app.command("get")
def jobs_get(job_id: JobId, json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show a job's status and progress."""
    with connect(url, api_key) as kv:
        job = kv.jobs.get(job_id)
    if json_out:
        print_json(job.model_dump(mode="json"))
        return
    typer.echo(_line(job))


@app.command("wait")
def jobs_wait(job_id: JobId,
              poll_interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls.")] = 0.5,
              timeout: Annotated[float, typer.Option(min=0.0, help="Give up after this many seconds.")] = 3600.0,
              json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Wait for a job to finish, with a progress bar on stderr; exits 1 unless the job succeeded."""
    with connect(url, api_key) as kv:
        job = wait_with_bar(kv, job_id, poll_interval=poll_interval, timeout=timeout)
    if json_out:
        print_json(job.model_dump(mode="json"))
    else:
        typer.echo(_line(job))
    if job.status != "succeeded":
        raise fail(f"job {job.id} {job.status}")


@app.command("cancel")
def jobs_cancel(job_id: JobId, json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a job: a queued one at once, a running one at its next step (a write key on the job's bank)."""
    with connect(url, api_key) as kv:
        job = kv.jobs.cancel(job_id)
    if json_out:
        print_json(job.model_dump(mode="json"))
        return
    typer.echo(_line(job) + ("\tcancel requested" if job.status == "running" else ""))
