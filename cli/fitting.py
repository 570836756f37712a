"""Tables that never lose a value: a table where it fits the console's width, else each
row as a block of "header: value" lines (a narrow terminal), so that no value is cut and
no column disappears."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


class Fitting:
    def __init__(self, table: Table) -> None:
        self.table = table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if needed_width(self.table) <= options.max_width:
            yield self.table
            return
        headers = [_text(c.header).plain for c in self.table.columns]
        columns = [list(c.cells) for c in self.table.columns]
        for i, row in enumerate(zip(*columns, strict=True)):
            first, *rest = (_text(cell) for cell in row)
            if i:
                yield Text()
            yield Text.assemble((first.plain, "bold"))
            for header, value in zip(headers[1:], rest, strict=True):
                if value.plain:
                    yield Text.assemble(f"  {header}: ", value)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table).clamp(max_width=options.max_width)


def needed_width(table: Table) -> int:
    """The narrowest the table gets with nothing cut: unwrapped columns as wide as their
    widest cell, the others as their longest word (or their min_width)."""
    _, right, _, left = table.padding
    width = 0
    for column in table.columns:
        cells = [_text(c).plain for c in [column.header, *column.cells]]
        if column.no_wrap:
            need = max((len(c) for c in cells), default=0)
        else:
            words = [len(w) for c in cells for w in c.split()]
            need = max([*words, column.min_width or 0, 1])
        width += need + left + right
    if table.box is not None:
        width += len(table.columns) + 1 if table.show_edge else len(table.columns) - 1
    return width


def _text(cell: object) -> Text:
    # Cells are data: a str is shown as it is, never read as markup.
    return cell if isinstance(cell, Text) else Text(str(cell))
