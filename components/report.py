"""Self-contained HTML reports (images inlined, one file to open or attach) and Markdown tables.

Every stage that people should look at (validate, caption, evaluate, promote) builds its page
from these pieces, so the reports look alike and this code lives once.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from components.plumbing.fsutil import atomic_write_text

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#1d1d1f;padding:0 1rem}h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid
#ddd;padding-bottom:.3rem}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;
padding:.3rem .6rem;text-align:left;font-size:.9rem}th{background:#f5f5f7}.grid{display:flex;flex-wrap:wrap;
gap:.6rem}.card{width:170px;font-size:.75rem;word-wrap:break-word}.card img{max-width:160px;max-height:160px;
display:block;border:1px solid #ccc}.placeholder{width:160px;height:100px;background:#eee;display:flex;
align-items:center;justify-content:center;color:#888}.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;
font-weight:600}.note{color:#555;font-size:.9rem}
"""


def esc(value: object) -> str:
    return html.escape(str(value))


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def img_tag(image: Image.Image | None, alt: str = "") -> str:
    if image is None:
        return f'<div class="placeholder">{esc(alt or "no preview")}</div>'
    return f'<img src="{image_data_uri(image)}" alt="{esc(alt)}">'


def figure_tag(fig) -> str:
    """A matplotlib figure as an inline PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def histograms(columns: dict[str, Sequence[float]], lines: dict[str, float] | None = None) -> str:
    """One small histogram per named column, with an optional vertical threshold line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(name, _present(values)) for name, values in columns.items()]
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 2.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], items, strict=True):
        ax.hist(values, bins=20, color="#4c78a8")
        if lines and name in lines:
            ax.axvline(lines[name], color="#cf222e", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    return figure_tag(fig)


def _present(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """The values that are not None or NaN, as one float array (a list of Python floats would cost
    four times the memory at half a million images)."""
    if isinstance(values, np.ndarray):
        array = values.astype(float, copy=False)
    else:
        array = np.array([np.nan if v is None else v for v in values], dtype=float)
    return array[~np.isnan(array)]


def table_html(headers: Sequence[str], rows: Iterable[Sequence[object]], raw_cols: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f"<td>{cell if i in raw_cols else esc(cell)}</td>" for i, cell in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def table_md(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def card(image: Image.Image | None, caption: str) -> str:
    return f'<div class="card">{img_tag(image, "no preview")}<div>{esc(caption)}</div></div>'


def grid(cards: Iterable[str]) -> str:
    return f'<div class="grid">{"".join(cards)}</div>'


def fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))  # counts read back as floats stay counts
        return f"{value:.{digits}g}" if value == value else "NaN"
    return str(value)


def percent(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, float) and value == value else fmt(value)


def write_html(path: Path | str, title: str, sections: Iterable[tuple[str, str]], intro: str = "") -> Path:
    """Write a page of (heading, html) sections; returns the path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"]
    parts.append(f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>")
    if intro:
        parts.append(f"<p class='note'>{intro}</p>")
    for heading, body in sections:
        parts.append(f"<h2>{esc(heading)}</h2>{body}")
    parts.append("</body></html>\n")
    atomic_write_text(path, "".join(parts))
    return Path(path)


def comparison_table_md(comparison: dict) -> str:
    """A paired comparison (evaluate.stats.paired_comparison) as a Markdown table, one row per metric."""
    rows = [
        (
            metric,
            fmt(v.get("mean_diff")),
            fmt(v.get("ci_low")),
            fmt(v.get("ci_high")),
            percent(v.get("win_rate")),
            fmt(v.get("prompts")),
            fmt(v.get("sd_diff")),
            fmt(v.get("mde_80")),
        )
        for metric, v in comparison.items()
        if isinstance(v, dict)  # the other keys (confidence) describe the whole comparison
    ]
    headers = ["metric", "mean difference", "CI low", "CI high", "win rate", "prompts", "sd of differences"]
    return table_md([*headers, "detectable at 80% power"], rows)
