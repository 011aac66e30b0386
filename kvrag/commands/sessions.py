"""``kvrag sessions``: create, append, brief, prune, restore, get, delete."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import (
    DEFAULT_URL,
    ApiKey,
    Bank,
    JsonOut,
    Policy,
    SegmentRole,
    Selection,
    Url,
    connect,
    print_json,
    value,
)

app = typer.Typer(help="Agent sessions: append to a trajectory kept as KV, brief a worker, prune.",
                  no_args_is_help=True)
SessionId = Annotated[str, typer.Argument(help="The session.", show_default=False)]


@app.command("create")
def sessions_create(bank: Bank, session_id: Annotated[str | None, typer.Argument(
                        help="Default: a random id.", show_default=False)] = None,
                    json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Create an empty session; prints its id."""
    with connect(url, api_key) as kv:
        session = kv.sessions.create(bank, session_id)
    if json_out:
        print_json(session.model_dump(mode="json"))
        return
    typer.echo(session.session_id)


@app.command("append")
def sessions_append(bank: Bank, session_id: SessionId,
                    text: Annotated[str, typer.Argument(help="The segment's text ('-': read stdin).",
                                                        show_default=False)],
                    role: Annotated[SegmentRole, typer.Option(help="Who wrote it.")] = SegmentRole.note,
                    agent: Annotated[str | None, typer.Option(help="Default: the key's agent.")] = None,
                    url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """Append one segment; only its tokens are prefilled."""
    body = typer.get_text_stream("stdin").read() if text == "-" else text
    with connect(url, api_key) as kv:
        result = kv.sessions.append(bank, session_id, [{"role": role.value, "text": body, "agent": agent}])
    if json_out:
        print_json(result.model_dump(mode="json"))
        return
    typer.echo(f"segment {result.segment_ids[0]}: {result.token_counts[0]} tokens; session holds {result.tokens}")


@app.command("brief")
def sessions_brief(bank: Bank, session_id: SessionId,
                   task: Annotated[str, typer.Argument(help="The worker's task.", show_default=False)],
                   budget_tokens: Annotated[int | None, typer.Option(min=0, help="Keep at most this many.")] = None,
                   tau: Annotated[float | None, typer.Option(help="Keep above median + tau * MAD.")] = None,
                   selection: Annotated[Selection | None, typer.Option(
                       help="segments (whole segments by attention density, then chunks) or tokens.",
                       show_default=False)] = None,
                   include_documents: Annotated[int, typer.Option(min=0, help="Add the top-k bank blocks.")] = 0,
                   max_new_tokens: Annotated[int, typer.Option(min=0)] = 64,
                   url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """Answer a task from the session compacted to what the task attends to."""
    with connect(url, api_key) as kv:
        result = kv.sessions.brief(bank, session_id, task, budget_tokens=budget_tokens, tau=tau,
                                   include_documents=include_documents, max_new_tokens=max_new_tokens,
                                   selection=value(selection))
    if json_out:
        print_json(result.model_dump(mode="json"))
        return
    typer.echo(result.answer)
    typer.echo(f"[{result.kept_tokens}/{result.session_tokens} session tokens, compaction "
               f"{result.compaction_ms:.0f} ms, ttft {result.timings.ttft_ms:.0f} ms]", err=True)


@app.command("prune")
def sessions_prune(bank: Bank, session_id: SessionId,
                   policy: Annotated[Policy, typer.Option(help="Who decides what is no longer needed.")] = Policy.model,
                   goal: Annotated[str | None, typer.Option(help="What the agent still has to do.")] = None,
                   url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """Drop the KV of segments no longer needed (their text stays)."""
    with connect(url, api_key) as kv:
        result = kv.sessions.prune(bank, session_id, policy=policy.value, goal=goal)
    if json_out:
        print_json(result.model_dump(mode="json"))
        return
    typer.echo(f"pruned {result.pruned or 'nothing'}: {result.tokens_before} -> {result.tokens_after} tokens")
    if result.held_back:
        typer.echo(f"  held back {result.held_back} (one prune drops a bounded share)")
    if result.error:
        typer.echo(f"  {result.error}", err=True)


@app.command("restore")
def sessions_restore(bank: Bank, session_id: SessionId,
                     segment: Annotated[list[int] | None, typer.Option(
                         help="A pruned segment to restore (repeatable); default: every restorable one.")] = None,
                     url: Url = DEFAULT_URL, api_key: ApiKey = None, json_out: JsonOut = False) -> None:
    """Make pruned segments live again with the KV they had (kept for the server's retention period)."""
    with connect(url, api_key) as kv:
        result = kv.sessions.restore(bank, session_id, segment or None)
    if json_out:
        print_json(result.model_dump(mode="json"))
        return
    typer.echo(f"restored {result.restored or 'nothing'}: {result.tokens} live tokens")
    if result.expired:
        typer.echo(f"  past the retention period (KV gone): {result.expired}", err=True)


@app.command("get")
def sessions_get(bank: Bank, session_id: SessionId,
                 json_out: Annotated[bool, typer.Option("--json", help="Print JSON (this command always does).")]
                 = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show a session (segments, live tokens, stored bytes) as JSON."""
    with connect(url, api_key) as kv:
        print_json(kv.sessions.get(bank, session_id).model_dump(mode="json"))


@app.command("delete")
def sessions_delete(bank: Bank, session_id: SessionId, json_out: JsonOut = False, url: Url = DEFAULT_URL,
                    api_key: ApiKey = None) -> None:
    """Delete a session with its KV."""
    with connect(url, api_key) as kv:
        kv.sessions.delete(bank, session_id)
    if json_out:
        print_json({"deleted": session_id})
        return
    typer.echo(f"deleted session {session_id}")
