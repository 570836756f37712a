"""How a command prints what it got: a table for people (the default), or the message in
the proto's JSON mapping (`-o json`, `-o yaml`) for scripts: every field, field names in
lowerCamelCase, enums by name, int64 as strings, timestamps in RFC 3339; stable as the
protos are. JSON and YAML are never cut to the terminal's width."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, RenderableType

M = TypeVar("M", bound=Message)


class Format(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    Format,
    typer.Option("--output", "-o", help="table for people; json or yaml for scripts."),
]

# Wide enough that no value is cut when the output is piped: a terminal sets its own width.
PIPED_WIDTH = 500


def console(*, err: bool = False) -> Console:
    """A console for stdout (or stderr: what accompanies JSON or YAML on stdout): the
    terminal's width there, else wide, without colours. It reads no markup: names,
    labels and messages are data ("[x, y, w, h]" stays as it is); styles come from Text."""
    stream = sys.stderr if err else sys.stdout
    if stream.isatty():
        return Console(stderr=err, markup=False)
    return Console(stderr=err, width=PIPED_WIDTH, color_system=None, soft_wrap=False, markup=False)


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=False)


def emit(message: M, render: Callable[[M], RenderableType], output: Format) -> None:
    """Prints `message` as `output` asks: `render(message)` for a table."""
    if output is Format.table:
        console().print(render(message))
        return
    data = as_dict(message)
    if output is Format.json:
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
        return
    import yaml  # Only for -o yaml.

    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
