"""The sweep's bar chart, drawn with matplotlib (the optional ``chart`` extra: ``pip install "mlx-openelm[chart]"``)."""

from __future__ import annotations

import io

Panel = tuple[str, list[str], list[str], list[list[float]]]  # title, group labels, series names, values[series][group]
INSTALL = 'pip install "mlx-openelm[chart]"'


def chart_available() -> bool:
    """Whether matplotlib is installed (the Markdown and JSON outputs never need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def bar_chart_png(panels: list[Panel], caption: str = "") -> bytes:
    """PNG bytes of side-by-side grouped bar charts, one per ``(title, groups, series, values)`` panel, with a
    ``caption`` underneath. Raises ``ImportError`` naming the extra when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"the sweep's PNG chart needs matplotlib: {INSTALL}") from None
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    FigureCanvasAgg(fig)  # a figure of its own, no pyplot global state
    for ax, (title, groups, series, values) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        width = 0.8 / max(1, len(series))
        for s, (name, vals) in enumerate(zip(series, values)):
            ax.bar([g + s * width for g in range(len(groups))], vals, width, label=name)
        ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    if caption:
        fig.supxlabel(caption, fontsize=9)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()
