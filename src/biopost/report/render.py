"""One self-contained HTML file (figures embedded as base64 PNG, no script, no external reference) and its
Markdown twin (figures as PNG files in ``<name>-figures/`` beside it)."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import pandas as pd

from biopost.report import data as d
from biopost.report.figures import ID_COLOR, OOD_COLOR
from biopost.report.sections import TaskReport, overview, task_report

VERDICT_COLORS = {"holds": "#1a7f37", "does not hold": "#b42318", "cannot tell": "#6e6e6e"}

PAGE = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#1f2328;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}h3{margin-top:1.4em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;white-space:nowrap}th{background:#f6f8fa}
img{max-width:100%;height:auto;border:1px solid #eee}
.id{color:{{ id_color }};font-weight:600}.ood{color:{{ ood_color }};font-weight:600}
.finding{border-left:5px solid #ccc;padding:.4em .9em;margin:.8em 0;background:#fafafa}
.verdict{font-weight:700;text-transform:uppercase;font-size:.85em;letter-spacing:.03em}
pre{background:#f6f8fa;padding:.5em;white-space:pre-wrap;word-break:break-word;font-size:.8em;margin:.2em 0}
details{margin:.5em 0}table.examples{display:table;width:100%;table-layout:fixed}
table.examples td{white-space:normal;vertical-align:top}.right{color:#1a7f37}.wrong{color:#b42318}.meta{color:#57606a;font-size:.85em}
</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">Written {{ when }} by <code>biopost report</code> from the results table only.
Colours: <span class="id">ID (id_test)</span>, <span class="ood">OOD (ood_test)</span> in every figure.</p>
{{ overview|safe }}
{% for t in tasks %}
<h2>Task {{ t.task }} <span class="meta">(metric: {{ t.metric }})</span></h2>
<h3>Findings</h3>
{% for f in t.findings %}
<div class="finding" style="border-color:{{ colors[f.verdict] }}"><b>{{ f.title }}</b>:
<span class="verdict" style="color:{{ colors[f.verdict] }}">{{ f.verdict }}</span><br>{{ f.body() }}</div>
{% endfor %}
{% for s in t.sections %}
<h3 id="{{ t.task }}-{{ s.key }}">{{ s.title }}</h3>
{% for b in s.blocks %}
{% if b[0] == "text" %}<p>{{ b[1] }}</p>
{% elif b[0] == "figure" %}<img alt="{{ b[3] }}" src="data:image/png;base64,{{ b[4] }}">
{% elif b[0] == "table" %}{% if b[1]|length > 20 %}<details><summary>{{ b[1]|length }} rows</summary>{{ b[2]|safe }}</details>{% else %}{{ b[2]|safe }}{% endif %}
{% elif b[0] == "examples" %}{% for e in b[1] %}
<p>Example <code>{{ e.id }}</code>, gold answer <b>{{ e.answer }}</b>:</p>
<table class="examples"><tr>{% for where, text, mark in e.completions %}<th>{{ where }}
<span class="{{ mark }}">{{ mark }}</span></th>{% endfor %}</tr>
<tr>{% for where, text, mark in e.completions %}<td><pre>{{ text }}</pre></td>{% endfor %}</tr></table>
{% endfor %}{% endif %}
{% endfor %}{% endfor %}{% endfor %}
</body></html>
""")


def write_report(directory, output=None, metric: str | None = None) -> Path:
    """Write ``report.html`` (self-contained) and ``report.md`` for a study or run directory; returns the HTML path.

    ``output``: the HTML file (default ``DIRECTORY/report.html``); the Markdown twin goes beside it with the
    ``.md`` suffix, its figures in ``<stem>-figures/``. ``metric``: default the metric checkpoints were selected on.
    """
    data = d.load(Path(directory), metric)
    output = Path(output) if output else Path(directory) / "report.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    reports = [task_report(data, task) for task in data.tasks]
    title = f"biopost report: {Path(directory).resolve().name}"
    output.write_text(render_html(title, data, reports))
    write_markdown(output.with_suffix(".md"), title, data, reports)
    return output


def html_table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, escape=True, border=0, na_rep="")


def render_html(title: str, data: d.ReportData, reports: list[TaskReport]) -> str:
    tasks = []
    for r in reports:
        sections = []
        for s in r.sections:
            blocks = []
            for b in s.blocks:
                if b[0] == "figure":
                    blocks.append((*b, base64.b64encode(b[2]).decode()))
                elif b[0] == "table":
                    blocks.append(("table", b[1], html_table(b[1])))
                else:
                    blocks.append(b)
            sections.append({"key": s.key, "title": s.title, "blocks": blocks})
        tasks.append({"task": r.task, "metric": r.metric, "findings": r.findings, "sections": sections})
    return PAGE.render(title=title, when=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       overview=html_table(overview(data)), tasks=tasks, colors=VERDICT_COLORS,
                       id_color=ID_COLOR, ood_color=OOD_COLOR)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table; cells escaped (``|`` and newlines) so a completion cannot break the table."""
    cell = lambda v: html.escape(str(v), quote=False).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    head = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.fillna("").itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_markdown(path: Path, title: str, data: d.ReportData, reports: list[TaskReport]) -> Path:
    figures_dir = path.parent / f"{path.stem}-figures"
    figures_dir.mkdir(exist_ok=True)
    lines = [f"# {title}", "", "From the results table only. Colours: ID blue, OOD vermillion in every figure.", "",
             markdown_table(overview(data)), ""]
    for r in reports:
        lines += [f"## Task {r.task} (metric: {r.metric})", "", "### Findings", ""]
        lines += [f"- **{f.title}**: {html.escape(f.paragraph(), quote=False)}" for f in r.findings] + [""]
        for s in r.sections:
            lines += [f"### {s.title}", ""]
            for b in s.blocks:
                if b[0] == "text":
                    lines += [html.escape(b[1], quote=False), ""]
                elif b[0] == "figure":
                    name = f"{r.task.replace('/', '_')}-{b[1]}.png"
                    (figures_dir / name).write_bytes(b[2])
                    lines += [f"![{b[3]}]({figures_dir.name}/{name})", ""]
                elif b[0] == "table":
                    lines += [markdown_table(b[1]), ""]
                elif b[0] == "examples":
                    for e in b[1]:
                        lines += [f"Example `{e['id']}`, gold answer **{html.escape(str(e['answer']), quote=False)}**:", ""]
                        for where, text, mark in e["completions"]:
                            lines += [f"{where} ({mark}):", "", "```text", text.replace("```", "'''"), "```", ""]
    path.write_text("\n".join(lines))
    return path
