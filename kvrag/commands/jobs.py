"""``kvrag jobs``: ls, get, wait (with a progress bar)."""

from __future__ import annotations

from typing import Annotated

import typer
from kvrag_client import Job
from tqdm import tqdm

from .common import DEFAULT_URL, ApiKey, Bank, JsonOut, Url, connect, fail, print_json

app = typer.Typer(help="Background jobs (large batch ingests): list, show, wait for one.", no_args_is_help=True)
JobId = Annotated[str, typer.Argument(help="The job's id (as the batch answer or `jobs ls` gave it).",
                                      show_default=False)]


def _line(job: Job) -> str:
    made = job.created_at.isoformat(timespec="seconds") if job.created_at else "-"
    error = f"\t{job.error}" if job.error else ""
    return f"{job.id}\t{job.kind}\t{job.status}\t{job.done}/{job.total}\t{made}{error}"


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
    """Wait for a job to finish, with a progress bar on stderr; exits 1 if the job failed."""
    bars: list[tqdm[None]] = []  # opened at the first answer, so a failure to connect prints only its error

    def progress(job: Job) -> None:
        if not bars:
            bars.append(tqdm(total=job.total, unit="doc", desc=f"job {job_id[:8]}", dynamic_ncols=True))
        bars[0].n = job.done or 0
        bars[0].set_postfix_str(job.status)
        bars[0].refresh()

    try:
        with connect(url, api_key) as kv:
            job = kv.jobs.wait(job_id, poll_interval=poll_interval, timeout=timeout, on_progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if json_out:
        print_json(job.model_dump(mode="json"))
    else:
        typer.echo(_line(job))
    if job.status != "succeeded":
        raise fail(f"job {job.id} {job.status}")
