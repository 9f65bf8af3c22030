"""A confusion matrix as heat-map cells for an inline SVG (colours computed here).

Colours are presentation attributes of SVG rects, not inline styles, so the dashboard's
Content-Security-Policy needs no 'unsafe-inline'.
"""

from __future__ import annotations

from dataclasses import dataclass

# Beyond this many classes the full matrix is unreadable; the page lists top confusions.
MAX_HEATMAP_CLASSES = 60
MAX_COUNTS_SHOWN = 20  # numbers are written in the cells up to this many classes
LABEL_CHARS = 18

# ColorBrewer "Blues", light to dark: readable in greyscale and for colour-blind readers.
_BLUES = ((247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107))


def _blue(fraction: float) -> str:
    fraction = min(1.0, max(0.0, fraction))
    position = fraction * (len(_BLUES) - 1)
    low = min(int(position), len(_BLUES) - 2)
    t = position - low
    red, green, blue = (
        round(a + (b - a) * t) for a, b in zip(_BLUES[low], _BLUES[low + 1], strict=True)
    )
    return f"#{red:02x}{green:02x}{blue:02x}"


def short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


@dataclass(frozen=True)
class Cell:
    x: int
    y: int
    count: int
    fill: str
    ink: str  # text colour with enough contrast on `fill`
    title: str


@dataclass(frozen=True)
class Heatmap:
    """Geometry and cells of the SVG; rows are true classes, columns predicted ones."""

    labels: list[str]
    cells: list[Cell]
    cell: int
    left: int  # width of the row labels
    top: int  # height of the rotated column labels
    width: int
    height: int
    show_counts: bool


def heatmap(confusion: list[list[int]], classes: list[str]) -> Heatmap | None:
    """Cells coloured by the row's share (recall-normalised, so rare classes show too)."""
    n = len(classes)
    if n == 0 or n > MAX_HEATMAP_CLASSES or len(confusion) != n:
        return None
    cell = 64 if n <= 4 else 48 if n <= 8 else 32 if n <= MAX_COUNTS_SHOWN else 14
    labels = [short(str(c)) for c in classes]
    text = 7 * max(len(label) for label in labels)  # px of the longest label at 12 px
    left = 12 + text
    # Column labels are rotated 45 degrees: they rise and lean right by text / sqrt(2).
    top = 10 + int(0.72 * text)
    right = max(8, int(0.72 * text) - cell // 2 + 4)
    cells = []
    for i, row in enumerate(confusion):
        total = sum(row) or 1
        for j, count in enumerate(row):
            share = count / total
            cells.append(
                Cell(
                    x=left + j * cell,
                    y=top + i * cell,
                    count=count,
                    fill=_blue(share),
                    ink="#ffffff" if share > 0.5 else "#1a1a1a",
                    title=f"true {classes[i]}, predicted {classes[j]}: {count} ({share:.0%})",
                )
            )
    return Heatmap(
        labels=labels,
        cells=cells,
        cell=cell,
        left=left,
        top=top,
        width=left + n * cell + right,
        height=top + n * cell + 8,
        show_counts=n <= MAX_COUNTS_SHOWN,
    )


def top_confusions(
    confusion: list[list[int]], classes: list[str], limit: int = 20
) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted, count) mistakes, for matrices too big to draw."""
    mistakes = [
        (classes[i], classes[j], count)
        for i, row in enumerate(confusion)
        for j, count in enumerate(row)
        if i != j and count
    ]
    return sorted(mistakes, key=lambda m: -m[2])[:limit]
