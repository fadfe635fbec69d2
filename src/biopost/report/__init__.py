"""Tables, plots, findings and the HTML report, drawn only from results data (metrics.jsonl, the study's
results table, predictions/), never from logs."""

from __future__ import annotations

from pathlib import Path


def write_report(directory, output=None, metric: str | None = None) -> Path:
    """``biopost report``: a self-contained HTML report (and its Markdown twin) of a study or run directory;
    returns the HTML path. See :func:`biopost.report.render.write_report`."""
    from biopost.report.render import write_report as write

    return write(directory, output, metric)
