// The dashboard: the agent's migrations, kept up to date from its event
// stream (/api/v1/events, server-sent events: every event carries the
// record as it is then). No build step, no library.
"use strict";
const COLORS = {setup: "#999", prepare: "#7a8", "pre-copy": "#48c", stop: "#c44",
                restore: "#e93", resume: "#6b4", cleanup: "#aac"};
const records = new Map();
let selected = null;
const token = new URLSearchParams(location.search).get("access_token");
const q = token ? "access_token=" + encodeURIComponent(token) : "";

function url(path, extra) {
  const parts = [q, extra].filter(Boolean).join("&");
  return path + (parts ? "?" + parts : "");
}
function mib(n) { return n == null ? "-" : (n / 1048576).toFixed(1) + " MiB"; }
function ms(s) { return s == null ? "-" : (s * 1000).toFixed(0) + " ms"; }
function rate(r) { return r == null ? "-" : (r / 1048576).toFixed(0) + " MiB/s"; }
function sec(s) { return s == null ? "-" : s.toFixed(2) + " s"; }
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function renderTable() {
  const body = document.querySelector("#migrations tbody");
  body.replaceChildren();
  const list = [...records.values()].sort((a, b) => b.started - a.started);
  document.getElementById("empty").hidden = list.length > 0;
  for (const m of list) {
    const tr = el("tr");
    tr.dataset.id = m.id;
    if (m.id === selected) tr.className = "sel";
    const cells = [m.id, m.role, m.pid, m.src + " \u2192 " + m.dst, m.status, m.phase,
                   mib(m.bytes_transferred), m.rounds.length, rate(m.throughput),
                   ms(m.downtime), sec(m.total_time)];
    cells.forEach((c, i) => {
      const td = el("td", String(c));
      if (i === 4) td.className = "status-" + m.status;
      if (i === 5) td.className = "phase";
      tr.appendChild(td);
    });
    tr.onclick = () => { selected = m.id; render(); };
    body.appendChild(tr);
  }
}

function renderTimeline(m) {
  const box = document.getElementById("timeline");
  const legend = document.getElementById("timeline-legend");
  box.replaceChildren(); legend.replaceChildren();
  const now = Date.now() / 1000;
  const spans = m.phases.map(p => ({phase: p.phase,
      d: p.duration != null ? p.duration : Math.max(0, now - p.start)}));
  const total = spans.reduce((a, s) => a + s.d, 0) || 1;
  for (const s of spans) {
    const d = el("div");
    d.style.flexGrow = String(s.d / total);
    d.style.background = COLORS[s.phase] || "#888";
    d.title = s.phase + ": " + ms(s.d);
    box.appendChild(d);
    const l = el("span");
    const i = el("i"); i.style.background = COLORS[s.phase] || "#888";
    l.append(i, s.phase + " " + ms(s.d));
    legend.appendChild(l);
  }
}

// A bar chart in an <svg viewBox="0 0 400 150">: bars [{label, value, color, tip}].
function bars(svg, items, empty) {
  const NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  if (!items.length) {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", 10); t.setAttribute("y", 20); t.textContent = empty;
    svg.appendChild(t); return;
  }
  const max = Math.max(...items.map(b => b.value), 1e-9);
  const w = 380 / items.length;
  items.forEach((b, i) => {
    const h = 115 * b.value / max;
    const rect = document.createElementNS(NS, "rect");
    rect.setAttribute("x", 10 + i * w + 2); rect.setAttribute("width", Math.max(w - 4, 1));
    rect.setAttribute("y", 130 - h); rect.setAttribute("height", Math.max(h, 0.5));
    rect.setAttribute("fill", b.color);
    const title = document.createElementNS(NS, "title");
    title.textContent = b.tip;
    rect.appendChild(title);
    svg.appendChild(rect);
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", 10 + i * w + 2); t.setAttribute("y", 145);
    t.textContent = b.label;
    svg.appendChild(t);
  });
}

function renderRounds(m) {
  const items = m.rounds.map(r => ({label: r.round + ": " + r.pages, value: r.pages,
    color: COLORS["pre-copy"], tip: `round ${r.round}: ${r.pages} pages in ${sec(r.seconds)}`}));
  if (m.stop && m.stop.pages != null)
    items.push({label: "stop: " + m.stop.pages, value: m.stop.pages, color: COLORS.stop,
                tip: `stop: ${m.stop.pages} pages while frozen`});
  bars(document.getElementById("rounds"), items, "no pre-copy round");
  const tp = m.rounds.filter(r => r.seconds > 0).map(r => {
    const v = r.bytes / r.seconds / 1048576;
    return {label: r.round + ": " + v.toFixed(0), value: v, color: "#6a8",
            tip: `round ${r.round}: ${mib(r.bytes)} in ${sec(r.seconds)}`};
  });
  bars(document.getElementById("throughput"), tp, "no pre-copy round");
}

function renderDetail() {
  const m = records.get(selected);
  const box = document.getElementById("detail");
  if (!m) { box.hidden = true; return; }
  box.hidden = false;
  document.getElementById("d-id").textContent = m.id;
  document.getElementById("d-phase").textContent = m.phase;
  const st = document.getElementById("d-status");
  st.textContent = m.status; st.className = "status status-" + m.status;
  renderTimeline(m);
  renderRounds(m);
  const rows = [["process", mib(m.bytes_total)], ["sent", mib(m.bytes_transferred)],
    ["remaining", mib(m.bytes_remaining)], ["dirty rate", rate(m.dirty_rate)],
    ["throughput", rate(m.throughput)], ["setup", ms(m.setup_time)],
    ["expected downtime", ms(m.expected_downtime)], ["downtime", ms(m.downtime)],
    ["total time", sec(m.total_time)], ["pre-copy ended", m.decision || "-"],
    ["post-copy faults", m.postcopy_faults == null ? "-" : m.postcopy_faults],
    ["pages prefetched", m.postcopy_prefetched == null ? "-" : m.postcopy_prefetched]];
  const t = document.getElementById("figures");
  t.replaceChildren();
  for (const [k, v] of rows) {
    const tr = el("tr"); tr.append(el("td", k), el("td", String(v))); t.appendChild(tr);
  }
  const err = document.getElementById("d-error");
  err.hidden = !m.error;
  if (m.error) err.textContent = `error in ${m.error.phase}: ${m.error.message}`;
}

function render() {
  if (selected == null || !records.has(selected)) {
    const list = [...records.values()].sort((a, b) => b.started - a.started);
    selected = list.length ? list[0].id : null;
  }
  renderTable();
  renderDetail();
}

function onEvent(e) {
  const d = JSON.parse(e.data);
  if (d.record) {
    const fresh = !records.has(d.id);
    records.set(d.id, d.record);
    if (fresh && d.type !== "snapshot") selected = d.id;   // follow the newest
  }
  render();
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource(url("api/v1/events"));
  for (const kind of ["snapshot", "created", "phase", "round", "frozen", "running",
                      "status", "filled", "progress", "throttle", "address",
                      "prepared", "undecided", "cancel-requested"])
    es.addEventListener(kind, onEvent);
  es.onmessage = onEvent;
  es.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
  es.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn"; };
}

fetch(url("api/v1/health")).then(r => r.json()).then(h => {
  document.getElementById("host").textContent = "agent " + h.host;
  document.title = "migrate " + h.host;
}).catch(() => {});
connect();
