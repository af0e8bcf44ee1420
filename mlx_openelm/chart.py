"""A grouped bar chart written as PNG with the standard library only (zlib + struct): no plotting dependency."""

from __future__ import annotations

import math
import struct
import zlib

# A 3x5 pixel font: five rows per glyph, each row an octal digit (bit 4 = left pixel). Lower case prints as upper.
_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-/_ :()%+"
_ROWS = (
    "75557 26227 71747 71717 55711 74717 74757 71111 75757 75717 25755 65656 34443 65556 74647 74644 34553 55755 "
    "72227 11152 55655 44447 57755 65555 25552 65644 25563 65655 34216 72222 55557 55552 55775 55255 55222 71247 "
    "00002 00700 11244 00007 00000 02020 24442 21112 51245 02720"
).split()
FONT = dict(zip(_CHARS, _ROWS))
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
Panel = tuple[str, list[str], list[str], list[list[float]]]  # title, group labels, series names, values[series][group]


class Canvas:
    """An RGB image in memory with rectangles and scaled 3x5 text."""

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def rect(self, x: int, y: int, w: int, h: int, color: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = max(0, x), max(0, y), min(self.w, x + w), min(self.h, y + h)
        for row in range(y0, y1):
            start = (row * self.w + x0) * 3
            self.px[start : start + (x1 - x0) * 3] = bytes(color) * (x1 - x0)

    def text(self, x: int, y: int, s: str, scale: int = 2, color: tuple[int, int, int] = (0, 0, 0)) -> None:
        for i, ch in enumerate(s.upper()):
            for r, digit in enumerate(FONT.get(ch, FONT[" "])):
                for c in range(3):
                    if int(digit, 8) >> (2 - c) & 1:
                        self.rect(x + (4 * i + c) * scale, y + r * scale, scale, scale, color)

    def png(self) -> bytes:
        """The image as PNG bytes (8-bit RGB, no filtering)."""
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body


def text_width(s: str, scale: int = 2) -> int:
    """Pixel width of ``s`` in the 3x5 font."""
    return max(0, 4 * len(s) - 1) * scale


def nice_max(v: float) -> float:
    """The smallest 1, 2 or 5 x 10^k at or above ``v`` (the top of a y axis)."""
    if v <= 0:
        return 1.0
    base = 10 ** math.floor(math.log10(v))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= v)


def _panel(cv: Canvas, x0: int, title: str, groups: list[str], series: list[str], values: list[list[float]]) -> None:
    left, top, plot_w, plot_h = x0 + 70, 50, 360, 260
    cv.text(x0 + 10, 12, title, 3)
    ymax = nice_max(max((v for s in values for v in s), default=0))
    for k in range(6):  # gridlines and their labels
        y = top + plot_h - round(plot_h * k / 5)
        cv.rect(left, y, plot_w, 1, (220, 220, 220))
        label = f"{ymax * k / 5:g}"
        cv.text(left - 8 - text_width(label), y - 5, label)
    group_w = plot_w // max(1, len(groups))
    bar_w = max(2, (group_w - 16) // max(1, len(series)))
    for g, name in enumerate(groups):
        gx = left + g * group_w + 8
        for s, vals in enumerate(values):
            h = round(plot_h * vals[g] / ymax) if vals[g] == vals[g] else 0  # NaN (missing) draws nothing
            cv.rect(gx + s * bar_w, top + plot_h - h, bar_w - 2, h, PALETTE[s % len(PALETTE)])
        cv.text(left + g * group_w + (group_w - text_width(name)) // 2, top + plot_h + 8, name)
    cv.rect(left, top, 1, plot_h + 1, (0, 0, 0))
    cv.rect(left, top + plot_h, plot_w, 1, (0, 0, 0))
    for s, name in enumerate(series):  # legend under the axis
        lx = left + s * (plot_w // max(1, len(series)))
        cv.rect(lx, top + plot_h + 30, 10, 10, PALETTE[s % len(PALETTE)])
        cv.text(lx + 14, top + plot_h + 30, name)


def bar_chart_png(panels: list[Panel], caption: str = "") -> bytes:
    """PNG bytes of side-by-side grouped bar charts, one per ``(title, groups, series, values)`` panel,
    with a one-line ``caption`` underneath."""
    cv = Canvas(460 * len(panels), 380)
    for i, (title, groups, series, values) in enumerate(panels):
        _panel(cv, 460 * i, title, groups, series, values)
    cv.text(10, 362, caption)
    return cv.png()
