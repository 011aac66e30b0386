"""``kvrag query`` and ``kvrag search``."""

from __future__ import annotations

from typing import Annotated

import typer
from kvrag_client import QueryResult, TokenEvent

from .common import DEFAULT_URL, ApiKey, Bank, JsonOut, Mode, RetrievalOpt, Url, connect, print_json, value


def _snippet(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _print_result(result: QueryResult) -> None:
    t = result.timings
    for hit in result.sources:
        typer.echo(f"  [{hit.score:.3f}] {hit.doc_id}#{hit.ordinal}: {_snippet(hit.text)}", err=True)
    typer.echo(f"  mode {result.mode} | ttft {t.ttft_ms:.0f} ms | total {t.total_ms:.0f} ms | "
               f"{result.usage.context_tokens} context tokens, {result.usage.generated_tokens} generated", err=True)


def query(question: Annotated[str, typer.Argument(help="The question.", show_default=False)], bank: Bank,
          mode: Annotated[Mode, typer.Option(help="kv: stored KV; text: re-read the passages (baseline).")] = Mode.kv,
          k: Annotated[int, typer.Option("--k", "-k", min=1, help="Blocks to retrieve.")] = 5,
          max_new_tokens: Annotated[int, typer.Option(min=0, help="Tokens to generate at most.")] = 64,
          stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they come.")] = False,
          context_map: Annotated[bool, typer.Option("--context-map", help="Put the bank's context map before "
                                                    "the passages.")] = False,
          retrieval: RetrievalOpt = None,
          recompute: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="kv mode: share of context tokens "
                                                          "whose KV is recomputed with full attention "
                                                          "(default: the server's).")] = None,
          budget_tokens: Annotated[int | None, typer.Option(min=1, help="kv mode: compact the context to at most "
                                                            "this many tokens the question attends to.")] = None,
          tau: Annotated[float | None, typer.Option(help="kv mode: compact the context to tokens scoring above "
                                                    "median + tau * MAD.")] = None,
          json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Answer a question from a bank; the answer goes to stdout, its sources and timings to stderr."""
    # Both may be given, as in the API: tokens above the threshold, at most the budget of them.
    compaction = {name: v for name, v in (("budget_tokens", budget_tokens), ("tau", tau)) if v is not None} or None
    with connect(url, api_key) as kv:
        if stream and not json_out:
            events = kv.query(bank, question, k=k, mode=value(mode), max_new_tokens=max_new_tokens, stream=True,
                              context_map=context_map, retrieval=value(retrieval), recompute=recompute,
                              compaction=compaction)
            for event in events:
                if isinstance(event, TokenEvent):
                    typer.echo(event.text, nl=False)
            typer.echo()
            if events.result is not None:
                _print_result(events.result)
            return
        result = kv.query(bank, question, k=k, mode=value(mode), max_new_tokens=max_new_tokens,
                          context_map=context_map, retrieval=value(retrieval), recompute=recompute,
                          compaction=compaction)
    if json_out:
        print_json(result.model_dump(mode="json"))
        return
    typer.echo(result.answer)
    _print_result(result)


def search(text: Annotated[str, typer.Argument(help="What to look for.", show_default=False)], bank: Bank,
           k: Annotated[int, typer.Option("--k", "-k", min=1, help="Blocks to return.")] = 5,
           retrieval: RetrievalOpt = None,
           json_out: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show the blocks that best match TEXT (no generation)."""
    with connect(url, api_key) as kv:
        hits = kv.search(bank, text, k=k, retrieval=value(retrieval))
    if json_out:
        print_json([h.model_dump(mode="json") for h in hits])
        return
    for hit in hits:
        typer.echo(f"{hit.score:.3f}  {hit.doc_id}#{hit.ordinal}  {_snippet(hit.text)}")
