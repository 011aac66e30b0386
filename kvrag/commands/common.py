"""What every command shares: the fixed choices (enums, so shell completion offers them), common options,
the SDK connection with its error lines, and the exit-code convention.

Exit codes follow click's: 2 for a usage error (an unknown option, a bad value, an id the server would
refuse), 1 for a failure (the server answered an error, or no answer came); either way one ``error: ...``
line on stderr and no traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any

import typer
from kvrag_client import APIError, InvalidId, KVRag, KVRagError
from typer.core import TyperGroup

DEFAULT_URL = "http://127.0.0.1:8000"


# -- fixed choices ----------------------------------------------------------------------------------


class Mode(StrEnum):
    kv = "kv"
    text = "text"


class RetrievalChoice(StrEnum):
    embedding = "embedding"
    kv = "kv"
    hybrid = "hybrid"
    hybrid_kv = "hybrid_kv"


class Eviction(StrEnum):
    lru = "lru"
    importance = "importance"
    hybrid = "hybrid"


class Codec(StrEnum):
    """The presets offered on the command line: auto (the server's default), and the three that matter."""

    auto = "auto"
    fp16 = "fp16"
    int8 = "int8"
    tklt5 = "tklt5"


class Policy(StrEnum):
    model = "model"
    attention = "attention"


class Role(StrEnum):
    read = "read"
    write = "write"
    owner = "owner"
    admin = "admin"


class SegmentRole(StrEnum):
    orchestrator = "orchestrator"
    tool = "tool"
    worker = "worker"
    note = "note"


class Selection(StrEnum):
    segments = "segments"
    tokens = "tokens"


class Section(StrEnum):
    roadmap = "roadmap"
    understanding = "understanding"
    reusable_results = "reusable_results"


# -- common options ---------------------------------------------------------------------------------

Url = Annotated[str, typer.Option("--url", envvar="KVRAG_URL", help="The kvrag server.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="KVRAG_API_KEY", show_default=False,
                                            help="API key (Authorization: Bearer).")]
Bank = Annotated[str, typer.Option("--bank", "-b", help="The bank to use.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]
BudgetBytes = Annotated[int | None, typer.Option(min=1, help="Stored-bytes budget.")]
MaxBlocks = Annotated[int | None, typer.Option(min=1, help="Block-count budget.")]
EvictionOpt = Annotated[Eviction | None, typer.Option(help="Which blocks lose their KV first over budget.",
                                                      show_default=False)]
RetrievalOpt = Annotated[RetrievalChoice | None, typer.Option(show_default=False,
                                                              help="How blocks are ranked (default: the server's).")]


def value(choice: StrEnum | None) -> Any:
    """An enum option as the plain string the SDK sends (None stays None)."""
    return None if choice is None else choice.value


# -- errors and output ------------------------------------------------------------------------------


def fail(message: str) -> typer.Exit:
    """A failure (exit 1) with its one ``error:`` line; raise what it returns."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def bad_value(message: str, option: str | None = None) -> typer.BadParameter:
    """A usage error (exit 2): a value the command cannot use; raise what it returns."""
    return typer.BadParameter(message, param_hint=option)


@contextmanager
def connect(url: str, api_key: str | None) -> Iterator[KVRag]:
    """An SDK client. An id the SDK refuses is a usage error; API and connection errors are failures."""
    try:
        with KVRag(url, api_key=api_key or "") as kv:
            yield kv
    except InvalidId as exc:
        raise bad_value(exc.detail) from None
    except APIError as exc:
        raise fail(f"{exc.status} {exc.code}: {exc.detail}") from None
    except KVRagError as exc:
        raise fail(str(exc)) from None


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


class ErrorLineGroup(TyperGroup):
    """The root command: click's usage errors and aborts become one ``error:`` line (exit 2 / 1) instead of
    the usage block click prints, so every failure of ``kvrag`` reads the same way."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False,
                                  windows_expand_args=windows_expand_args, **extra)
        except typer.TyperException as exc:  # click's exceptions (typer carries its own click): 2 for usage
            if not standalone_mode:
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `kvrag` or `kvrag keys`: the help, as click does
                typer.echo(exc.format_message())
            else:
                message = exc.format_message().replace("Value error, ", "")  # pydantic's prefix on enum values
                typer.echo(f"error: {message}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)
