"""Plain text for the console: aligned tables (leaderboard, predictions, confusion matrices)."""
from __future__ import annotations

from collections.abc import Collection, Sequence


def table(rows: Sequence[Sequence[object]], right: Collection[int] = ()) -> str:
    """Rows as columns aligned on the widest cell; columns in `right` right-aligned (numbers), no trailing blanks."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells), default=0))]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells)


def estimate(value: float | None, bounds: tuple[float, float] | None, digits: int = 4) -> str:
    """A metric with its 95% interval, "0.9250 [0.875, 0.967]": on a small test set the number alone overstates."""
    if value is None:
        return "-"
    number = f"{value:.{digits}f}"
    return number if bounds is None else f"{number} {span(bounds)}"


def span(bounds: tuple[float, float]) -> str:
    """An interval as "[0.875, 0.967]": three digits tell one test image from the next on up to ~1000 images."""
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"
