"""Tables that fit the terminal without cutting a number or a name.

rich shrinks a table that is too wide by cutting cells to ``9.1…``; a cut latency or model name is
worse than none. Before a table is printed, ``fit_table``:

1. drops columns whose every cell is empty or ``-`` (nothing measured there);
2. keeps numbers whole (right-aligned columns never wrap) and lets names and text fold onto
   further lines instead of ending in an ellipsis;
3. if the numbers alone still do not fit, prints the table as key/value rows instead, one block
   per row (``model: examples/digits/digits_cnn.onnx``, ``p50 ms: 0.846``...).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

EMPTY = ("", "-")


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def fit_table(table: Table, console: Console, width: int | None = None) -> Table:
    """``table`` made to fit ``width`` (default: the console's); see the module docstring."""
    width = width or console.width
    if not table.rows:
        return table
    kept = [c for c in table.columns if any(_plain(cell).strip() not in EMPTY for cell in c._cells)]
    if kept and len(kept) < len(table.columns):
        table.columns = kept
    need = 3 * len(table.columns) + 1  # padding and borders
    for column in table.columns:
        cells = [_plain(c) for c in column._cells]
        if column.justify == "right":  # a number, and its header, whole on one line
            column.no_wrap, column.overflow = True, "ignore"
            column.min_width = max([len(c) for c in cells] + [len(_plain(column.header))])
        else:  # a name or text: wraps between words; only a word longer than LONG_WORD folds
            column.overflow = "fold"
            column.min_width = min(LONG_WORD, max([_longest_word(c) for c in cells] + [_longest_word(column.header)]))
        need += column.min_width
    return table if need <= width else key_value(table)


LONG_WORD = 40


def _longest_word(text: Any) -> int:
    return max((len(w) for w in _plain(text).split()), default=0)


def key_value(table: Table) -> Table:
    """One block per row: the first column's value as the block's heading, then ``header  value``."""
    out = Table(title=table.title, show_header=False, box=table.box, title_style=table.title_style)
    out.add_column("field", style="bold", overflow="fold", max_width=24)
    out.add_column("value", overflow="fold")
    first, *rest = table.columns
    for i, row in enumerate(table.rows):
        out.add_row(_plain(first.header) or "row", first._cells[i], style=row.style)
        for column in rest:
            out.add_row(_plain(column.header), column._cells[i], style=row.style,
                        end_section=column is rest[-1])
    return out


class FittingConsole(Console):
    """A rich Console whose ``print`` passes every Table through ``fit_table`` first."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(fit_table(o, self) if isinstance(o, Table) else o for o in objects), **kwargs)
