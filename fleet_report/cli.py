"""python -m fleet_report --run-dir DIR [--limits FILE] [--hosts a,b] [--fail-on-limits]
python -m fleet_report serve [--prometheus URL] [--listen HOST:PORT] [--refresh S]   (the live fleet page)

Writes report.md, report.html, latency.png and summary.json into the run folder (each replaced
atomically) and prints the paths. Exit 0 when written (1 with --fail-on-limits when a car is outside
its limits or has no result), 2 on bad input with a one-line message naming the file and key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from fleet_report.evaluate import evaluate
from fleet_report.limits import LimitsError, load_limits
from fleet_report.plot import plot_latency
from fleet_report.render import Report, to_html, to_markdown
from fleet_report.results import ResultError, load_run
from fleet_report.serve import ServeConfig, parse_listen, serve
from rover_runtime.metrics import write_bytes_atomic

log = logging.getLogger("fleet_report")


def build_report(run_dir: Path, limits_file: Path | None, hosts: list[str] | None) -> Report:
    limit_set = load_limits(limits_file)
    results = load_run(run_dir)
    if not results:
        raise ResultError(f"{run_dir}: no benchmark results (*.json) in the run folder")
    found = {r.host for r in results}
    missing = tuple(h for h in (hosts or []) if h not in found)
    verdicts = tuple(evaluate(r, limit_set.for_host(r.host)) for r in results)
    plot = plot_latency(results, run_dir / "latency.png", limit_set.default.max_latency_p95_ms)
    report = Report(
        title="Fleet benchmark report",
        run_dir=str(run_dir),
        verdicts=verdicts,
        missing_hosts=missing,
        plot_file=plot.name,
    )
    write_bytes_atomic(run_dir / "report.md", to_markdown(report).encode())
    write_bytes_atomic(run_dir / "report.html", to_html(report).encode())
    summary = {
        "ok": report.ok,
        "missing_hosts": list(missing),
        "hosts": {
            v.result.host: {
                "ok": v.ok,
                "result": {
                    k: val for k, val in dataclasses.asdict(v.result).items() if k != "latency_samples_ms"
                },
                "checks": [{**dataclasses.asdict(c), "ok": c.ok} for c in v.checks],
            }
            for v in verdicts
        },
    }
    write_bytes_atomic(
        run_dir / "summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    )
    return report


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["serve"]:
        return serve_main(args_list[1:])
    parser = argparse.ArgumentParser(prog="python -m fleet_report", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="folder holding <host>.json files")
    parser.add_argument("--limits", type=Path, help="limits file (JSON or YAML); default: the seed targets")
    parser.add_argument("--hosts", default="", help="comma-separated hosts expected in the run")
    parser.add_argument("--fail-on-limits", action="store_true", help="exit 1 unless every car passes")
    args = parser.parse_args(args_list)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hosts = [h for h in args.hosts.split(",") if h]
    try:
        report = build_report(args.run_dir, args.limits, hosts)
    except (LimitsError, ResultError) as exc:
        print(f"fleet_report: {exc}", file=sys.stderr)
        return 2
    passed = sum(v.ok for v in report.verdicts)
    print(f"fleet: {'PASS' if report.ok else 'FAIL'} ({passed}/{len(report.verdicts)} cars within limits)")
    for verdict in report.verdicts:
        print(f"  {verdict.result.host}: {'PASS' if verdict.ok else 'FAIL'}")
    for host in report.missing_hosts:
        print(f"  {host}: NO RESULT")
    for name in ("report.md", "report.html", "latency.png", "summary.json"):
        print(f"wrote {args.run_dir / name}")
    return 1 if args.fail_on_limits and not report.ok else 0


def serve_main(argv: list[str]) -> int:
    """python -m fleet_report serve: the live fleet page until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m fleet_report serve", description="the live fleet page")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus's URL")
    parser.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT the page is served on")
    parser.add_argument("--refresh", type=float, default=5.0, help="seconds between the page's refreshes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        host, port = parse_listen(args.listen)
        if not 0.5 <= args.refresh <= 3600:
            raise ValueError(f"--refresh {args.refresh:g}: give 0.5 to 3600 seconds")
        config = ServeConfig(args.prometheus.rstrip("/"), host, port, args.refresh)
        serve(config)
    except ValueError as exc:
        print(f"fleet_report serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fleet_report serve: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
