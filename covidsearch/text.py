"""Plain text for the console: aligned tables (leaderboard, predictions, confusion matrices)."""
from __future__ import annotations

from collections.abc import Collection, Sequence


def table(rows: Sequence[Sequence[object]], right: Collection[int] = ()) -> str:
    """Rows as columns aligned on the widest cell; columns in `right` right-aligned (numbers), no trailing blanks."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells), default=0))]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells)
