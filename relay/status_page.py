"""The status page (relay.status): one HTML document, its style and script inline, nothing fetched but
the relay's own /api/ endpoints. Whatever a client named reaches the page as text (textContent), never
as markup."""

PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>relay status</title>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 1em 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 18px; margin: 0 0 .2em; }
h2 { font-size: 15px; margin: 1.2em 0 .4em; }
table { border-collapse: collapse; background: #fff; }
th, td { padding: 2px 8px; border-bottom: 1px solid #e4e4e4; text-align: left; white-space: nowrap; }
th { background: #eee; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap { white-space: normal; min-width: 20em; max-width: 40em; }
.ok { color: #17702f; font-weight: 600; }
.bad { color: #b3261e; font-weight: 600; }
.dim { color: #777; }
#summary span { margin-right: 1.5em; }
svg { vertical-align: middle; background: #f3f6fa; }
button, select { font: inherit; }
</style>
</head>
<body>
<h1>relay <span id="version" class="dim"></span></h1>
<div id="status" class="dim">loading\xe2\x80\xa6</div>
<p id="summary"></p>
<h2>Upstreams</h2>
<table id="upstreams"><thead><tr><th>upstream</th><th>health</th><th>connections</th><th>handshakes</th>
<th>mean handshake</th><th>failed attempts</th><th>last 10 min (handshake ms)</th></tr></thead><tbody></tbody></table>
<h2>Connections <span id="total" class="dim"></span></h2>
<p>by <select id="sort"><option value="rate">rate</option><option value="age">age</option>
<option value="bytes">bytes</option></select>
<button id="prev">&larr;</button> <button id="next">&rarr;</button></p>
<table id="connections"><thead><tr><th>client</th><th>name</th><th>destination</th><th>upstream</th><th>state</th>
<th>up</th><th>down</th><th>rate up</th><th>rate down</th><th>age</th></tr></thead><tbody></tbody></table>
<div id="dns-section" hidden><h2>DNS</h2><p id="dns"></p></div>
<div id="udp-section" hidden><h2>UDP</h2><p id="udp"></p></div>
<h2>Latest failures</h2>
<table id="failures"><thead><tr><th>ago</th><th>client</th><th>name</th><th>destination</th><th>upstream</th>
<th>reason</th><th>fault</th><th>error</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const PAGE_SIZE = 50, POLL_MS = 2000;
let offset = 0;
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
function seconds(s) {
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function cell(row, value, className) {
  const td = row.insertCell();
  td.textContent = value === null || value === undefined || value === "" ? "\xe2\x80\x93" : String(value);
  if (className) td.className = className;
  return td;
}
function counts(o) {
  return Object.entries(o).map(([k, v]) => k + " " + v).join(", ");
}
function fill(table, items, render) {
  const body = document.createElement("tbody");
  for (const item of items) render(body.insertRow(), item);
  table.tBodies[0].replaceWith(body);
}
function shape(kind, attributes) {
  const element = document.createElementNS(SVG, kind);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}
function span(text) {
  const element = document.createElement("span");
  element.textContent = text;
  return element;
}
function spark(history) {
  const width = 360, height = 36, svg = shape("svg", { width: width, height: height });
  const values = history.map((p) => p[2]).filter((v) => v !== null);
  const top = Math.max(1, ...values), step = width / 120, start = width - history.length * step;
  history.forEach((p, i) => {
    if (!p[1]) {
      svg.appendChild(shape("rect", { x: start + i * step, y: 0, width: step, height: height, fill: "#f4c7c3" }));
    }
  });
  let points = [];
  const flush = () => {
    if (points.length) {
      const drawn = points.length > 1 ? points.join(" ") : points[0] + " " + points[0];
      svg.appendChild(shape("polyline", { points: drawn, fill: "none", stroke: "#1f5fbf", "stroke-width": 1.5,
        "stroke-linecap": "round" }));
    }
    points = [];
  };
  history.forEach((p, i) => {
    if (p[2] === null) { flush(); return; }
    points.push((start + i * step + step / 2).toFixed(1) + "," + (height - 2 - (p[2] / top) * (height - 4)).toFixed(1));
  });
  flush();
  const label = document.createElementNS(SVG, "title");
  label.textContent = "max " + top + " ms";
  svg.appendChild(label);
  return svg;
}
async function get(path) {
  const answer = await fetch(path, { cache: "no-store" });
  if (!answer.ok) throw new Error(path + ": HTTP " + answer.status);
  return answer.json();
}
function showSummary(s) {
  $("version").textContent = s.version + ", fast path " + s.fast_path;
  const parts = [
    "up " + seconds(s.uptime), s.open + " open (" + s.relaying + " relaying)", s.accepted + " accepted",
    s.refused + " refused", "\xe2\x86\x91 " + bytes(s.bytes_up) + " at " + bytes(s.rate_up) + "/s",
    "\xe2\x86\x93 " + bytes(s.bytes_down) + " at " + bytes(s.rate_down) + "/s",
  ];
  if (s.conntrack) parts.push("conntrack " + s.conntrack.entries + " / " + s.conntrack.max);
  $("summary").replaceChildren(...parts.map(span));
}
function showUpstreams(u) {
  fill($("upstreams"), u.upstreams, (row, x) => {
    cell(row, x.upstream);
    let health = x.usable ? "healthy" : x.healthy ? "tunnel down" : "unhealthy";
    if (x.failures_in_a_row) health += " (" + x.failures_in_a_row + " failures in a row)";
    cell(row, health, x.usable ? "ok" : "bad");
    cell(row, x.connections, "n");
    cell(row, x.handshakes, "n");
    cell(row, x.handshake_mean_ms === null ? null : x.handshake_mean_ms + " ms", "n");
    cell(row, counts(x.attempts_failed));
    const chart = row.insertCell();
    chart.appendChild(spark(x.history));
    const latest = x.history.map((p) => p[2]).filter((v) => v !== null);
    if (latest.length) chart.appendChild(span(" " + latest[latest.length - 1] + " ms"));
  });
}
function showConnections(c) {
  $("total").textContent = "(" + c.total + " open; " + (c.total ? c.offset + 1 : 0) + "\xe2\x80\x93" +
    (c.offset + c.connections.length) + " by " + c.sort + ")";
  fill($("connections"), c.connections, (row, x) => {
    cell(row, x.client); cell(row, x.name); cell(row, x.destination); cell(row, x.upstream); cell(row, x.state);
    cell(row, bytes(x.up), "n"); cell(row, bytes(x.down), "n");
    cell(row, bytes(x.rate_up) + "/s", "n"); cell(row, bytes(x.rate_down) + "/s", "n"); cell(row, seconds(x.age), "n");
  });
}
function showDns(d) {
  $("dns-section").hidden = !d.enabled;
  if (!d.enabled) return;
  const parts = [];
  if (d.cache) {
    parts.push("mode " + d.mode, "cache " + d.cache.entries + " / " + d.cache.max + " entries",
      "queries " + counts(d.queries),
      "upstream answers " + d.upstream_answers +
        (d.upstream_mean_ms === null ? "" : ", mean " + d.upstream_mean_ms + " ms"));
    if (Object.keys(d.upstream_failures).length) parts.push("upstream failures " + counts(d.upstream_failures));
  }
  if (d.fake_ips) {
    const pools = Object.entries(d.fake_ips).map(([k, v]) => k + " " + v.in_use + " / " + v.capacity);
    parts.push("fake addresses " + pools.join(", ") + ", recycled " + d.fake_ips_recycled);
  }
  $("dns").textContent = parts.join(" \xc2\xb7 ");
}
function showUdp(d) {
  $("udp-section").hidden = !d.enabled;
  if (!d.enabled) return;
  const parts = ["sessions " + d.sessions,
    "datagrams up " + d.datagrams.up + " (" + bytes(d.bytes.up) + "), down " + d.datagrams.down +
      " (" + bytes(d.bytes.down) + ")"];
  if (Object.keys(d.ended).length) parts.push("ended " + counts(d.ended));
  if (Object.keys(d.dropped).length) parts.push("dropped " + counts(d.dropped));
  $("udp").textContent = parts.join(" \xc2\xb7 ");
}
function showFailures(f) {
  fill($("failures"), f.failures, (row, x) => {
    cell(row, seconds(x.ago), "n"); cell(row, x.client); cell(row, x.name); cell(row, x.destination);
    cell(row, x.upstream); cell(row, x.reason, "bad"); cell(row, x.fault); cell(row, x.error, "wrap");
  });
}
async function tick() {
  try {
    const query = "?sort=" + $("sort").value + "&limit=" + PAGE_SIZE + "&offset=" + offset;
    const [s, u, c, d, p, f] = await Promise.all([get("api/summary"), get("api/upstreams"),
      get("api/connections" + query), get("api/dns"), get("api/udp"), get("api/failures")]);
    showSummary(s); showUpstreams(u); showConnections(c); showDns(d); showUdp(p); showFailures(f);
    $("status").textContent = "updated " + new Date().toLocaleTimeString() + ", every " + POLL_MS / 1000 + " s";
    $("status").className = "dim";
  } catch (error) {
    $("status").textContent = "the relay does not answer: " + error.message;
    $("status").className = "bad";
  }
}
async function poll() {
  await tick();
  setTimeout(poll, POLL_MS);
}
$("sort").onchange = () => { offset = 0; tick(); };
$("prev").onclick = () => { offset = Math.max(0, offset - PAGE_SIZE); tick(); };
$("next").onclick = () => { offset = Math.min(1000, offset + PAGE_SIZE); tick(); };
poll();
</script>
</body>
</html>
"""
