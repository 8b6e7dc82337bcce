"""The report as Markdown and as a standalone HTML page (same content, same numbers)."""

from __future__ import annotations

import html
from dataclasses import dataclass

from fleet_report.evaluate import Check, HostVerdict

COLUMNS = (
    "host",
    "hostname",
    "arch",
    "engine",
    "release",
    "firmware",
    "latency mean (ms)",
    "latency p95 (ms)",
    "FPS",
    "achievable rate (Hz)",
    "loop rate while driving (Hz)",
    "memory (MB)",
    "CPU (%)",
    "temp before (°C)",
    "temp after (°C)",
    "throttled before/after",
    "model (MB)",
    "verdict",
)


@dataclass(frozen=True)
class Report:
    title: str
    run_dir: str
    verdicts: tuple[HostVerdict, ...]
    missing_hosts: tuple[str, ...]  # expected hosts without a result
    plot_file: str

    @property
    def ok(self) -> bool:
        return not self.missing_hosts and all(v.ok for v in self.verdicts)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(check: Check, digits: int = 1) -> str:
    text = _fmt(check.value, digits)
    return text if check.ok else f"{text} ✗"


def row(verdict: HostVerdict) -> list[str]:
    r = verdict.result
    c = {check.name: check for check in verdict.checks}
    return [
        r.host,
        r.hostname,
        r.architecture,
        f"{r.backend or '?'}/{r.engine or '-'}",
        r.release or "n/a",
        r.firmware or "n/a",
        _cell(c["latency mean"], 2),
        _cell(c["latency p95"], 2),
        _fmt(r.fps),
        _cell(c["achievable rate"]),
        _fmt(r.loop_rate_hz),
        _cell(c["memory"]),
        _cell(c["CPU"]),
        _fmt(r.temperature_before_c),
        _fmt(r.temperature_after_c),
        f"{r.throttled_before or 'n/a'} / {r.throttled_after or 'n/a'}",
        _cell(c["model size"], 2),
        "PASS" if verdict.ok else "FAIL",
    ]


def _failures(verdict: HostVerdict) -> str:
    return "; ".join(
        f"{c.name} {_fmt(c.value, 2)} {c.unit} (limit {c.bound} {c.limit:g} {c.unit})" for c in verdict.failed
    )


def _limits_lines(report: Report) -> list[str]:
    lines = []
    for v in report.verdicts:
        parts = ", ".join(f"{c.name} {c.bound} {c.limit:g} {c.unit}" for c in v.checks)
        lines.append(f"{v.result.host}: {parts}")
    return lines


def to_markdown(report: Report) -> str:
    passed = sum(v.ok for v in report.verdicts)
    out = [
        f"# {report.title}",
        "",
        f"Run folder: `{report.run_dir}`. Every figure was measured on the car named in the row.",
        "",
        f"**Fleet: {'PASS' if report.ok else 'FAIL'}** — {passed}/{len(report.verdicts)} cars within limits"
        + (f"; no result from: {', '.join(report.missing_hosts)}" if report.missing_hosts else ""),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    out += ["| " + " | ".join(row(v)) + " |" for v in report.verdicts]
    failing = [v for v in report.verdicts if not v.ok]
    if failing:
        out += ["", "## Outside the limits", ""]
        out += [f"- {v.result.host}: {_failures(v)}" for v in failing]
    out += ["", "## Limits", ""] + [f"- {line}" for line in _limits_lines(report)]
    out += ["", "## Latency distribution", "", f"![latency per car]({report.plot_file})", ""]
    return "\n".join(out)


def to_html(report: Report) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = "".join(
        f'<tr class="{"pass" if v.ok else "fail"}">'
        + "".join(f"<td>{e(cell)}</td>" for cell in row(v))
        + "</tr>"
        for v in report.verdicts
    )
    failing = "".join(f"<li>{e(v.result.host)}: {e(_failures(v))}</li>" for v in report.verdicts if not v.ok)
    limits = "".join(f"<li>{e(line)}</li>" for line in _limits_lines(report))
    missing = f"; no result from: {e(', '.join(report.missing_hosts))}" if report.missing_hosts else ""
    passed = sum(v.ok for v in report.verdicts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(report.title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
        "tr.fail td:last-child{color:#b00;font-weight:bold}tr.pass td:last-child{color:#070}"
        "</style></head><body>"
        f"<h1>{e(report.title)}</h1><p>Run folder: <code>{e(report.run_dir)}</code>. "
        "Every figure was measured on the car named in the row.</p>"
        f"<p><strong>Fleet: {'PASS' if report.ok else 'FAIL'}</strong> — "
        f"{passed}/{len(report.verdicts)} cars within limits{missing}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + (f"<h2>Outside the limits</h2><ul>{failing}</ul>" if failing else "")
        + f"<h2>Limits</h2><ul>{limits}</ul>"
        f'<h2>Latency distribution</h2><img src="{e(report.plot_file)}" alt="latency per car">'
        "</body></html>\n"
    )
