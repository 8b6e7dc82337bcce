"""The live fleet page: one HTML document whose script asks /api/fleet every `refresh_s` seconds and redraws
the table. Every value from a car is put in with textContent (a car's labels are data, never markup)."""

from __future__ import annotations

import html
import json

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d2327; }
h1 { font-size: 1.4rem; margin: 0 0 .4rem 0; }
#intended, #updated { margin: .2rem 0; color: #444; }
#error { display: none; background: #fbe3e4; border: 1px solid #d63638; padding: .5rem; margin: .5rem 0; }
table { border-collapse: collapse; margin-top: .8rem; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .35rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f1; font-weight: 600; }
tr[data-status="down"] td { background: #fbe3e4; }
tr[data-status="stopped"] td, tr[data-status="failsafe"] td { background: #fcf0e3; }
tr[data-status="driving"] .status { color: #007017; font-weight: 600; }
.drift { color: #b32d2e; font-weight: 600; }
.alert { display: block; color: #b32d2e; }
code { font-size: .85em; }
"""

SCRIPT = """
const REFRESH_MS = Math.round(CONFIG.refresh_s * 1000);
const COLUMNS = ["car", "status", "release", "firmware", "mode", "faults", "temperature", "loop rate",
                 "last seen", "alerts"];
function cell(row, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  row.appendChild(td);
  return td;
}
function ago(unix, now) {
  if (unix === null || unix === undefined) return "never (6 h)";
  const s = Math.max(0, Math.round(now - unix));
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}
function short(hash) { return hash ? hash.slice(0, 12) : ""; }
function draw(fleet) {
  const error = document.getElementById("error");
  error.textContent = fleet.error || "";
  error.style.display = fleet.error ? "block" : "none";
  const intended = document.getElementById("intended");
  const by = fleet.intended ? " (set by " + (fleet.intended.source || "?") + ")" : "";
  intended.textContent = fleet.intended
    ? "Intended release: bundle " + short(fleet.intended.bundle) + by
    : "Intended release: none recorded yet (a deploy or a publication records it)";
  const body = document.getElementById("cars");
  body.replaceChildren();
  for (const car of fleet.cars) {
    const row = document.createElement("tr");
    row.dataset.car = car.name;
    row.dataset.status = car.status;
    cell(row, car.name).title = car.address;
    cell(row, car.status + (car.answering ? "" : " (does not answer)"), "status");
    const release = cell(row, car.release ? car.release + " / " + short(car.bundle) : "—",
                         car.on_intended === false ? "drift" : "");
    if (car.on_intended === false) release.title = "not the fleet's intended release";
    cell(row, car.firmware || "—");
    const pull = car.pull ? " · pull: " + car.pull : "";
    cell(row, (car.mode || "—") + (car.driving ? ", driving" : "") + pull);
    cell(row, car.faults.length ? car.faults.join(", ") : (car.failsafe ? "failsafe" : "none"), "faults");
    cell(row, (car.temperature_c === null ? "—" : car.temperature_c.toFixed(1) + " °C")
              + (car.throttled.length ? " (" + car.throttled.join(", ") + ")" : ""));
    cell(row, car.loop_rate_hz === null ? "—" : car.loop_rate_hz.toFixed(1) + " Hz");
    cell(row, car.answering ? "now" : ago(car.last_seen_unix, fleet.updated_unix), "seen");
    const alerts = cell(row, "", "alerts");
    for (const alert of car.alerts) {
      const span = document.createElement("span");
      span.className = "alert";
      span.dataset.alert = alert.name;
      span.textContent = alert.name + ": " + alert.summary;
      alerts.appendChild(span);
    }
    body.appendChild(row);
  }
  const updated = new Date(fleet.updated_unix * 1000);
  document.getElementById("updated").textContent = fleet.cars.length + " cars · updated "
    + updated.toLocaleTimeString() + " · refreshes every " + CONFIG.refresh_s + " s";
  document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || "0") + 1);
}
async function refresh() {
  try {
    const response = await fetch("api/fleet", {cache: "no-store"});
    draw(await response.json());
  } catch (err) {
    const error = document.getElementById("error");
    error.textContent = "the fleet page's server does not answer: " + err;
    error.style.display = "block";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
const head = document.getElementById("head");
for (const name of COLUMNS) {
  const th = document.createElement("th");
  th.textContent = name;
  head.appendChild(th);
}
refresh();
"""


def page(prometheus: str, refresh_s: float) -> str:
    config = json.dumps({"refresh_s": refresh_s, "prometheus": prometheus}).replace("<", "\\u003c")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Rover fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body data-refreshes="0">
<h1>Rover fleet</h1>
<p id="intended"></p>
<p id="updated">loading…</p>
<div id="error" role="alert"></div>
<table><thead><tr id="head"></tr></thead><tbody id="cars"></tbody></table>
<p>From <a href="{html.escape(prometheus)}">{html.escape(prometheus)}</a> (alerts:
<a href="{html.escape(prometheus)}/alerts">{html.escape(prometheus)}/alerts</a>).</p>
<script>const CONFIG = {config};{SCRIPT}</script>
</body></html>
"""
