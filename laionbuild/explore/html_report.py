"""The build report as one self-contained HTML page (`data/report/index.html`): inline CSS, charts
as inline SVG drawn here, thumbnails as data URIs. No script, no network: it opens from disk,
from a DVC remote or an e-mail attachment alike. `report.py` gathers the data; this module only
draws it."""

from __future__ import annotations

from html import escape

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #1d232b; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #d6dbe1; padding-bottom: 4px; }
h3 { margin: 22px 0 6px; } .muted { color: #5d6b7a; } .warning { background: #fff3cd; border: 1px solid #e0c36a;
padding: 8px 12px; border-radius: 4px; } .charts { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 2px; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #1d232b; } svg.chart .axis { stroke: #8996a3; }
svg.chart .bar { fill: #4c78a8; } svg.chart .bar.all { fill: #c5ced8; } svg.chart .bar.dropped { fill: #e45756; }
.legend span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; }
.grids { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; align-content: flex-start; align-items: flex-start; }
.grid h4 { width: 100%; margin: 4px 0; } .sample { width: 104px; font-size: 10px; overflow-wrap: anywhere; }
.sample img { display: block; width: 96px; height: 96px; object-fit: contain; background: #eef1f4; border: 1px solid #d6dbe1; }
.sample .note { color: #5d6b7a; } .rows { width: 100%; border-collapse: collapse; font-size: 12px; }
.rows td { border-top: 1px solid #e3e7eb; padding: 2px 6px; vertical-align: top; overflow-wrap: anywhere; }
"""


def _svg(width: int, height: int, body: list[str], chart: str, title: str) -> str:
    return (f'<svg class="chart" data-chart="{escape(chart)}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">' + "".join(body) + "</svg>")


def bar_chart(rows: list[tuple[str, int, str]], chart: str, title: str, label_width: int = 230) -> str:
    """Horizontal bars, one per (label, value, note) row; the note is printed after the value."""
    if not rows:
        return f'<p class="muted" data-chart="{escape(chart)}">nothing to show</p>'
    bar_area, row_height = 360, 22
    width, height = label_width + bar_area + 170, row_height * len(rows) + 8
    top = max(value for _, value, _ in rows) or 1
    body = []
    for i, (label, value, note) in enumerate(rows):
        y = 4 + i * row_height
        length = bar_area * value / top
        body.append(f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end">{escape(label)}</text>'
                    f'<rect class="bar" x="{label_width}" y="{y + 3}" width="{length:.1f}" height="{row_height - 6}">'
                    f'<title>{escape(label)}: {value}</title></rect>'
                    f'<text x="{label_width + length + 4:.1f}" y="{y + 15}">{value}{escape(note)}</text>')
    return _svg(width, height, body, chart, title)


def _tick(value: float) -> str:
    return f"{value:.3g}"


def histogram(bins: list[dict], chart: str, title: str) -> str:
    """Vertical bars per bin: every tagged sample (grey) and the selected ones (blue) in front."""
    if not bins:
        return f'<p class="muted" data-chart="{escape(chart)}">no values</p>'
    width, height, left, bottom = 340, 170, 34, 22
    plot_w, plot_h = width - left - 8, height - bottom - 8
    top = max(b["samples"] for b in bins) or 1
    step = plot_w / len(bins)
    body = [f'<line class="axis" x1="{left}" y1="{8 + plot_h}" x2="{width - 8}" y2="{8 + plot_h}"/>',
            f'<text x="{left - 4}" y="16" text-anchor="end">{top}</text>',
            f'<text x="{left - 4}" y="{8 + plot_h}" text-anchor="end">0</text>']
    for i, b in enumerate(bins):
        x = left + i * step
        for series in ("samples", "selected"):
            h = plot_h * b[series] / top
            css = "bar all" if series == "samples" else "bar"
            body.append(f'<rect class="{css}" x="{x + 1:.1f}" y="{8 + plot_h - h:.1f}" width="{max(step - 2, 1):.1f}" '
                        f'height="{h:.1f}"><title>[{_tick(b["bin"])}, {_tick(b["bin_end"])}): '
                        f'{b["samples"]} samples, {b["selected"]} selected</title></rect>')
    body.append(f'<text x="{left}" y="{height - 6}">{_tick(bins[0]["bin"])}</text>'
                f'<text x="{width - 8}" y="{height - 6}" text-anchor="end">{_tick(bins[-1]["bin_end"])}</text>')
    return _svg(width, height, body, chart, title)


def _sample(example: dict) -> str:
    caption = escape(example.get("caption") or "")
    note = f'<div class="note">{escape(example["note"])}</div>' if example.get("note") else ""
    return (f'<div class="sample" data-key="{escape(example["key"])}"><img alt="{caption}" '
            f'title="{caption}" src="{example["image"]}">{note}<div>{caption[:80]}</div></div>')


def _examples(kind: str, examples: list[dict], count: int | None) -> str:
    head = f"<h4>{kind}" + (f" ({count})" if count is not None else "") + "</h4>"
    if not examples:
        return f'<div class="grid {kind}">{head}<p class="muted">none</p></div>'
    with_images = [e for e in examples if e.get("image")]
    without = [e for e in examples if not e.get("image")]
    parts = [head] + [_sample(e) for e in with_images]
    if without:
        parts.append('<table class="rows">' + "".join(
            f'<tr data-key="{escape(e["key"])}"><td>{escape(e["key"])}</td><td>{escape(e.get("caption") or "")}</td>'
            f'<td>{escape(e.get("url") or "")}</td><td>{escape(e.get("note") or "")}</td></tr>' for e in without)
            + "</table>")
    return f'<div class="grid {kind}">{"".join(parts)}</div>'


def _section(section: dict) -> str:
    return (f'<section class="filter" data-filter="{escape(section["name"])}"><h3>{escape(section["title"])}</h3>'
            f'<p class="muted">{escape(section["description"])}</p><div class="grids">'
            + _examples("kept", section["kept"], section.get("kept_count"))
            + _examples("dropped", section["dropped"], section.get("dropped_count")) + "</div></section>")


def render(report: dict) -> str:
    """The page for `report` (see `stages/report.py` for its fields)."""
    steps = report["funnel_steps"]
    funnel_rows = []
    for i, step in enumerate(steps):
        dropped = steps[i - 1]["rows"] - step["rows"] if i else 0
        funnel_rows.append((step["step"], step["rows"], f"  (−{dropped})" if dropped > 0 else ""))
    failures = sorted(report["failures"].items(), key=lambda kv: -kv[1])
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{escape(report['name'])} — laionbuild report</title><style>{CSS}</style></head><body>",
           f"<h1>{escape(report['name'])}</h1><p class=\"muted\">{escape(report['description'] or '')}</p>",
           f"<p>parts {escape(', '.join(map(str, report['parts'])))} · <b>{report['selected']}</b> samples selected "
           f"· {report['indexed']} indexed</p>"]
    if report["untrained"]:
        out.append('<p class="warning">UNTRAINED embedding weights (<code>embed.pretrained=random</code>): '
                   "CLIP similarities, score tags and the index are not meaningful.</p>")
    out += ["<h2>Funnel</h2><p class=\"muted\">Rows left after every step (dropped by the step in brackets).</p>",
            bar_chart(funnel_rows, "funnel", "funnel")]
    if failures:
        out += ["<h3>Download failures by reason</h3>",
                bar_chart([(reason, n, "") for reason, n in failures], "download_failures", "download failures")]
    out += ["<h2>Tags</h2><p class=\"muted legend\">Every downloaded and embedded sample<span style=\"background:#c5ced8\">"
            "</span>all<span style=\"background:#4c78a8\"></span>selected</p><div class=\"charts\">"]
    for hist in report["histograms"]:
        out.append(f'<figure><figcaption>{escape(hist["title"])}</figcaption>'
                   f'{histogram(hist["bins"], "hist_" + hist["name"], hist["title"])}</figure>')
    out += ["</div><h2>Licences of the selected samples</h2>",
            bar_chart([(row["licence"], row["samples"], "") for row in report["licences"]], "licences", "licences",
                      label_width=330)]
    if report.get("languages"):
        out += ["<h2>Kept share per language</h2><p class=\"muted\">The samples' <code>language</code> column: "
                "selected of tagged samples, per language.</p>",
                bar_chart([(row["language"], row["selected"], f"  / {row['tagged']} ({100 * row['share']:.1f}%)")
                           for row in report["languages"]], "languages", "kept per language")]
    out.append("<h2>Filters</h2><p class=\"muted\">For every filter, samples it kept and samples it dropped. "
               "Metadata filters and dedup act before the download: what they drop was never downloaded, "
               "so it is listed, not shown.</p>")
    out += [_section(s) for s in report["filters"]]
    out.append("</body></html>\n")
    return "".join(out)
