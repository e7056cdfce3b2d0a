"""A drift report as one self-contained HTML file: a summary table of every column and one
plot per drifted one (reference vs live shares on the reference bins), PNGs inline as base64
so the file can be mailed or attached to an incident as is.

matplotlib is the optional `monitor` extra (the server does not need it), imported only when
a report is rendered; without it the error says what to install.
"""
from __future__ import annotations

import base64
import html
import io
import itertools

from monitor.drift import DriftReport, FeatureDrift

__all__ = ["MissingExtra", "render_html", "require_matplotlib"]


class MissingExtra(ImportError):
    """matplotlib (the `monitor` extra) is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtra("the drift HTML report needs matplotlib: pip install 'parity[monitor]'") from exc
    matplotlib.use("Agg")  # no display on a server; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise MissingExtra now, before a command reads anything, if the report cannot be drawn."""
    _pyplot()


def _bin_labels(edges: tuple[float, ...]) -> list[str]:
    if not edges:
        return ["all"]
    lab = [f"< {edges[0]:.3g}"]
    lab += [f"[{a:.3g}, {b:.3g})" for a, b in itertools.pairwise(edges)]
    lab.append(f">= {edges[-1]:.3g}")
    return lab


def _plot(plt, f: FeatureDrift) -> str:
    """Base64 PNG of reference vs live shares per bin, plus the missing rates."""
    n = sum(f.counts)
    if f.reference_shares and len(f.counts) == len(f.reference_shares):
        labels, ref, live = _bin_labels(f.edges), list(f.reference_shares), [c / n if n else 0.0 for c in f.counts]
        ylabel = "share of rows with a value"
    else:  # no reference bins (a column always missing in training): the missing rates alone
        labels, ref, live = ["missing"], [f.reference_missing_rate], [f.missing_rate or 0.0]
        ylabel = "share of rows"
    fig, ax = plt.subplots(figsize=(7.0, 3.2), dpi=90)
    try:
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], ref, width=0.4, label=f"reference (missing {f.reference_missing_rate:.1%})")
        live_miss = f"{f.missing_rate:.1%}" if f.missing_rate is not None else "n/a"
        ax.bar([x + 0.2 for x in xs], live, width=0.4, label=f"live (missing {live_miss})")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{f.name}: {', '.join(f.reasons)}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _num(v: float | None, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt)


def _row(f: FeatureDrift) -> str:
    cells = [f.name, str(f.rows), _num(f.psi), _num(f.kl), _num(f.js), f.test or "", _num(f.p_adjusted, ".2e"),
             _num(f.missing_rate, ".1%"), _num(f.reference_missing_rate, ".1%"), "DRIFT: " + ", ".join(f.reasons) if f.drifted else ""]
    cls = ' class="drift"' if f.drifted else ""
    return f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def render_html(report: DriftReport, *, title: str = "Parity drift report", context: dict[str, str] | None = None) -> str:
    """The report as an HTML page: `context` (release id, window...) is shown above the table."""
    plt = _pyplot()
    entries = list(report.features) + ([report.prediction] if report.prediction is not None else [])
    head = ["column", "rows", "PSI", "KL", "JS", "test", "p (BH)", "missing", "ref missing", ""]
    ctx = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in (context or {}).items())
    th = report.thresholds
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        ("<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
        "tr.drift{background:#fdd}</style></head><body>"),
        (f"<h1>{html.escape(title)}</h1><ul>{ctx}<li><b>rows</b>: {report.rows}</li>"
        f"<li><b>drifted</b>: {len(report.drifted)} ({html.escape(', '.join(report.drifted)) or 'none'})</li>"
        f"<li><b>thresholds</b>: PSI &ge; {th.psi}, JS &ge; {th.js}, BH-adjusted p &lt; {th.alpha}, "
        f"missing rate +{th.missing_rise}, at least {th.min_rows} rows</li></ul>"),
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>",
        *(_row(f) for f in entries),
        "</table>",
    ]
    drifted = [f for f in entries if f.drifted]
    if drifted:
        parts.append("<h2>Drifted columns</h2>")
    for f in drifted:
        parts.append(f"<h3>{html.escape(f.name)}</h3><img alt='{html.escape(f.name)}' src='data:image/png;base64,{_plot(plt, f)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
