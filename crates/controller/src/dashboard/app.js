// The MIG controller dashboard: plain JavaScript over the operator API, no build step.
// The operator token stays in sessionStorage (this tab only) and goes out as a Bearer header.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const view = () => $("#view");
const state = { token: sessionStorage.getItem("mig-token") || "", refreshTimer: null, stream: null, results: {} };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function say(msg) { $("#status").textContent = msg; }

async function api(path, opts = {}) {
  const r = await fetch(path, {
    ...opts,
    headers: { "Authorization": "Bearer " + state.token, "Content-Type": "application/json", ...(opts.headers || {}) },
  });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) { signOut("The token was refused: " + (body.error || r.status)); throw new Error("unauthorized"); }
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}

function ago(t) {
  if (!t) return "-";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(t)) / 1000));
  return s < 60 ? s + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
}
function when(t) { return t ? t.replace("T", " ").slice(0, 19) : "-"; }
function job(v) { return v.current_job ? [v.current_job.run_id, v.current_job.repository, v.current_job.job_name].filter(Boolean).join(" · ") : "-"; }

function signOut(msg) {
  sessionStorage.removeItem("mig-token");
  state.token = "";
  stopLive();
  $("#login").hidden = false;
  $("#signout").hidden = true;
  view().replaceChildren();
  say(msg || "Signed out.");
}

// ---- live updates: a streaming fetch of the SSE endpoint (EventSource cannot send headers)
function stopLive() {
  if (state.stream) state.stream.abort();
  state.stream = null;
  $("#live").textContent = "offline";
  $("#live").classList.remove("on");
}

async function startLive() {
  stopLive();
  const ctl = new AbortController();
  state.stream = ctl;
  try {
    const r = await fetch("/api/v1/admin/events/stream", { headers: { "Authorization": "Bearer " + state.token }, signal: ctl.signal });
    if (!r.ok) throw new Error("HTTP " + r.status);
    $("#live").textContent = "live";
    $("#live").classList.add("on");
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, i); buf = buf.slice(i + 2);
        if (frame.split("\n").some(l => l.startsWith("data:"))) scheduleRefresh(300);
      }
    }
  } catch (e) {
    if (ctl.signal.aborted) return;
  }
  if (state.stream === ctl) { stopLive(); setTimeout(() => state.token && startLive(), 3000); }
}

function scheduleRefresh(ms) {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(autoRender, ms);
}

// Automatic refreshes wait while someone is typing in a form field.
function autoRender() {
  const a = document.activeElement;
  if (a && ["INPUT", "SELECT", "TEXTAREA"].includes(a.tagName)) { scheduleRefresh(2000); return; }
  render();
}

// ---- views
async function fleetView() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const [pools, vms] = await Promise.all([
    api("/api/v1/admin/pools"),
    api("/api/v1/admin/vms?" + new URLSearchParams([...params].filter(([, v]) => v)).toString()),
  ]);
  const sized = pools.pools.filter(p => p.scaling);
  const histories = await Promise.all(sized.map(p =>
    api(`/api/v1/admin/pools/${encodeURIComponent(p.pool_id)}/history?minutes=60`).catch(() => null)));
  const sizeCharts = sized.map((p, i) => {
    const samples = (histories[i] && histories[i].samples) || [];
    const pts = key => samples.map(x => [x.at, x[key]]);
    return el("section", { class: "card", "aria-label": `Pool ${p.pool_id} over time`, "data-chart": p.pool_id },
      el("h3", {}, `${p.pool_id}: size and queued jobs (up to the last hour)`),
      chart({ title: p.pool_id, unit: "count", integer: true, window: 60 * 60 * 1000, least: 5 * 60 * 1000, series: [
        { label: "VMs", color: "#0969da", points: pts("actual") },
        { label: "wanted", color: "#8c959f", points: pts("desired") },
        { label: "busy", color: "#1a7f37", points: pts("busy") },
        { label: "queued jobs", color: "#cf222e", points: pts("queued_jobs") },
      ] }));
  });
  const poolCards = el("section", { class: "pools", "aria-label": "Pools" },
    pools.pools.map(p => el("div", { class: "card pool" },
      el("h3", {}, p.pool_id),
      el("div", {}, `${p.total} VMs, ${p.connected} streaming`),
      el("div", { class: "counts" }, Object.entries(p.by_state).map(([s, n]) => el("span", { class: "chip" }, `${s} ${n}`))),
      el("div", { class: "counts" }, Object.entries(p.by_health).map(([s, n]) => el("span", { class: "chip health-" + s }, `${s} ${n}`))),
      p.registration && p.registration.last_error
        ? el("div", { class: "chip health-lost", role: "alert" }, `GitHub: ${p.registration.last_error}`)
        : null,
      p.alert ? el("div", { class: "chip health-lost", role: "alert" }, `${p.alert.vm_id}: ${p.alert.message}`) : null,
      p.scaling ? el("div", { class: "counts", "data-field": "scaling" },
        el("span", { class: "chip" }, `${p.scaling.actual} of ${p.scaling.desired} VMs wanted (max ${p.scaling.max_size})`),
        el("span", { class: "chip" }, `${p.scaling.busy} busy`),
        el("span", { class: "chip" }, `${p.scaling.queued_jobs} jobs queued`),
        el("span", { class: "chip", title: "how long jobs waited for a runner, last hour" },
          p.scaling.queue.p50_seconds == null ? "no job started in the last hour"
            : `waited ${p.scaling.queue.p50_seconds.toFixed(1)} s median, ${p.scaling.queue.p90_seconds.toFixed(1)} s p90 (${p.scaling.queue.jobs_started} jobs, last hour)`),
        el("span", { class: "chip", title: "idle timeout, VM lifetime, boot and registration timeouts, scale-up limits" },
          `idle ${p.scaling.idle_timeout_secs} s · lifetime ${Math.round(p.scaling.max_vm_lifetime_secs / 3600)} h · boot ${p.scaling.boot_timeout_secs} s · register ${p.scaling.registration_timeout_secs} s · +${p.scaling.scale_up_step}/pass${p.scaling.scale_up_per_minute ? ` · ${p.scaling.scale_up_per_minute}/min` : ""} · after a job: ${p.scaling.after_job}`)) : null,
      p.scaling && p.scaling.last_error
        ? el("div", { class: "chip health-lost", role: "alert" }, `Provider: ${p.scaling.last_error}`)
        : null,
      p.scaling && p.scaling.provider_trouble
        ? el("div", { class: "chip health-unhealthy", role: "status" }, `Provider: ${p.scaling.provider_trouble}`)
        : null,
    )));
  const field = (name, label, input) => el("label", {}, label, input);
  const sel = (name, opts) => el("select", { name, id: "f-" + name },
    el("option", { value: "" }, "any"), opts.map(o => el("option", { value: o, selected: params.get(name) === o }, o)));
  const form = el("form", { class: "filters", "aria-label": "Filter VMs", onsubmit: ev => {
      ev.preventDefault();
      const q = new URLSearchParams(new FormData(ev.target));
      location.hash = "#/?" + q.toString();
    } },
    field("pool", "Pool", sel("pool", pools.pools.map(p => p.pool_id))),
    field("state", "State", sel("state", ["ready", "registering_runner", "idle", "job_running", "draining", "shutting_down", "terminated"])),
    field("health", "Health", sel("health", ["healthy", "unhealthy", "lost"])),
    field("q", "Search", el("input", { name: "q", id: "f-q", type: "search", value: params.get("q") || "", placeholder: "VM, run, repository" })),
    el("button", { type: "submit" }, "Filter"));
  const rows = vms.vms.map(v => el("tr", { "data-vm": v.vm_id },
    el("td", { class: "mono" }, el("a", { href: "#/vm/" + encodeURIComponent(v.vm_id) }, v.vm_id)),
    el("td", {}, v.pool_id),
    el("td", { class: "state-" + v.state, "data-field": "state" }, v.state),
    el("td", { class: "health-" + v.health }, v.health),
    el("td", {}, job(v)),
    el("td", { title: v.last_heartbeat_at || "" }, ago(v.last_heartbeat_at)),
    el("td", {}, v.connected ? "stream" : "poll")));
  const table = el("table", { id: "vms" },
    el("caption", {}, `VMs (${vms.vms.length}${vms.next_cursor ? "+" : ""})`),
    el("thead", {}, el("tr", {}, ["VM", "Pool", "State", "Health", "Current job", "Last heartbeat", "Link"].map(h => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 7 }, "No VMs match."))));
  return [poolCards, sizeCharts.length ? el("div", { class: "grid" }, sizeCharts) : null, el("div", { class: "card" }, form, table)].filter(Boolean);
}

// A line chart with axes: `series` is [{ label, color, points: [[unix ms, value], ...] }];
// the y axis runs from 0 to `max` (or the largest value) in `unit`, the x axis is UTC time
// up to now, over the data's span (at least `least` ms, a minute by default; at most
// `window` ms). Counts (`integer`) are drawn as steps.
const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function clock(ms, withSeconds) {
  const t = new Date(ms).toISOString();
  return withSeconds ? t.slice(11, 19) : t.slice(11, 16);
}
function chart({ title, unit, max, integer, series, window, least }) {
  const all = series.flatMap(s => s.points);
  if (all.length < 2) return el("p", { class: "legend" }, `${title}: not enough data yet`);
  const w = 600, h = 190, left = 48, right = 10, top = 10, bottom = 38;
  const xs = all.map(p => p[0]), x1 = Math.max(Date.now(), ...xs);
  let x0 = Math.min(Math.min(...xs), x1 - (least || 60 * 1000));
  if (window) x0 = Math.max(x0, x1 - window);
  let yTop = max || Math.max(...all.map(p => p[1]), integer ? 1 : 0.1);
  if (integer) yTop = Math.max(1, Math.ceil(yTop));
  const X = x => left + (x - x0) / (x1 - x0) * (w - left - right);
  const Y = y => top + (1 - y / yTop) * (h - top - bottom);
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, class: "chart", role: "img" });
  const latest = series.map(s => s.points.length ? `${s.label} ${fmt(s.points[s.points.length - 1][1], integer)}${unit === "%" ? " %" : ""}` : null).filter(Boolean).join(", ");
  svg.setAttribute("aria-label", `${title}, ${clock(x0, true)} to ${clock(x1, true)} UTC; latest: ${latest}`);
  // y axis: gridlines and labels at 0, half and the top, with the unit.
  const yTicks = integer ? [...new Set([0, Math.round(yTop / 2), yTop])] : [0, yTop / 2, yTop];
  for (const t of yTicks) {
    svg.append(svgEl("line", { x1: left, x2: w - right, y1: Y(t), y2: Y(t), class: "grid" }));
    svg.append(svgEl("text", { x: left - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" }, `${fmt(t, integer)}${unit === "%" ? "%" : ""}`));
  }
  svg.append(svgEl("text", { x: 12, y: top + (h - top - bottom) / 2, transform: `rotate(-90 12 ${top + (h - top - bottom) / 2})`, "text-anchor": "middle", class: "axis-title" }, unit));
  // x axis: four time ticks, seconds shown when the span is under ten minutes.
  const withSeconds = x1 - x0 < 10 * 60 * 1000;
  svg.append(svgEl("line", { x1: left, x2: w - right, y1: h - bottom, y2: h - bottom, class: "axis" }));
  for (let i = 0; i < 4; i++) {
    const t = x0 + (x1 - x0) * i / 3;
    svg.append(svgEl("line", { x1: X(t), x2: X(t), y1: h - bottom, y2: h - bottom + 4, class: "axis" }));
    svg.append(svgEl("text", { x: X(t), y: h - bottom + 16, "text-anchor": i === 0 ? "start" : i === 3 ? "end" : "middle", class: "tick" }, clock(t, withSeconds)));
  }
  svg.append(svgEl("text", { x: left + (w - left - right) / 2, y: h - 4, "text-anchor": "middle", class: "axis-title" }, "time (UTC)"));
  for (const s of series) {
    if (!s.points.length) continue;
    const pts = s.points.filter(([x]) => x >= x0);
    if (!pts.length) continue;
    const d = pts.map(([x, y], i) => {
      const px = X(x).toFixed(1), py = Y(Math.min(y, yTop)).toFixed(1);
      return i === 0 ? `M${px},${py}` : integer ? `H${px} V${py}` : `L${px},${py}`;
    }).join(" ") + (integer ? ` H${X(x1).toFixed(1)}` : "");
    svg.append(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": "2" }));
  }
  const legend = el("figcaption", { class: "legend" }, el("strong", {}, title), " ",
    series.map(s => el("span", { class: "key" }, swatch(s.color), ` ${s.label}` +
      (s.points.length ? ` (latest ${fmt(s.points[s.points.length - 1][1], integer)}${unit === "%" ? " %" : ""})` : ""))));
  return el("figure", {}, svg, legend);
}
// A legend key in the series' colour (an SVG attribute: the page's policy allows no inline
// styles).
function swatch(color) {
  const svg = svgEl("svg", { class: "swatch", viewBox: "0 0 16 6", "aria-hidden": "true" });
  svg.append(svgEl("line", { x1: 0, x2: 16, y1: 3, y2: 3, stroke: color, "stroke-width": 4 }));
  return svg;
}
function fmt(v, integer) { return integer || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(1); }

async function sendCommand(vmId, type, parameters, button) {
  button.disabled = true;
  try {
    const r = await api(`/api/v1/admin/vms/${encodeURIComponent(vmId)}/commands`, { method: "POST", body: JSON.stringify({ type, parameters }) });
    const id = r.command.id;
    say(`${type} queued (${id}); waiting for the VM to acknowledge…`);
    for (let i = 0; i < 120; i++) {
      const c = await api(`/api/v1/admin/commands/${encodeURIComponent(id)}`);
      const st = c.command.state;
      if (st === "acknowledged" || st === "failed" || st === "expired") {
        say(`${type} ${st}${c.command.result_message ? ": " + c.command.result_message : ""}`);
        // Kept per VM, so the page can show it again after a refresh.
        state.results[vmId] = `${type} ${st}`;
        const out = $("#command-result");
        if (out) out.textContent = state.results[vmId];
        break;
      }
      await new Promise(res => setTimeout(res, 500));
    }
  } catch (e) { say(`${type} failed: ${e.message}`); }
  button.disabled = false;
  scheduleRefresh(100);
}

async function vmView(vmId) {
  const [d, tl, hb] = await Promise.all([
    api(`/api/v1/admin/vms/${encodeURIComponent(vmId)}`),
    api(`/api/v1/admin/vms/${encodeURIComponent(vmId)}/timeline?limit=200`),
    api(`/api/v1/admin/vms/${encodeURIComponent(vmId)}/heartbeats?limit=120`),
  ]);
  const v = d.vm;
  const beats = hb.heartbeats.slice().reverse();
  const cpu = beats.filter(b => b.cpu_percent != null).map(b => [Date.parse(b.received_at), b.cpu_percent]);
  const mem = beats.filter(b => b.memory_used_bytes != null && b.memory_total_bytes).map(b => [Date.parse(b.received_at), 100 * b.memory_used_bytes / b.memory_total_bytes]);
  const dl = el("dl", {},
    [["State", v.state], ["Health", v.health], ["Pool", v.pool_id], ["Boot", `${v.boot_id} (#${v.boot_seq}) since ${when(v.booted_at)}`],
     ["Runner", v.runner_state || "-"], ["Current job", job(v)], ["Last heartbeat", ago(v.last_heartbeat_at)],
     ["Link", v.connected ? "gRPC stream" : "HTTP polling"], ["Agent", v.agent_version || "-"]]
      .flatMap(([k, val]) => [el("dt", {}, k), el("dd", { "data-field": k.toLowerCase().replace(/ /g, "_") }, val)]));
  const drain = el("button", { type: "button", id: "drain", onclick: ev => confirm(`Drain ${vmId}? The running job finishes; no new one starts.`) && sendCommand(vmId, "drain", { reason: "dashboard" }, ev.target) }, "Drain");
  const shut = el("button", { type: "button", id: "shutdown", class: "danger", onclick: ev => confirm(`Shut ${vmId} down?`) && sendCommand(vmId, "shutdown", { reason: "dashboard", force: false }, ev.target) }, "Shut down");
  const timeline = el("table", { id: "timeline" },
    el("caption", {}, `Timeline (${tl.entries.length}${tl.truncated ? ", older entries left out" : ""})`),
    el("thead", {}, el("tr", {}, ["When (UTC)", "Source", "What", "Detail"].map(h => el("th", { scope: "col" }, h)))),
    el("tbody", {}, tl.entries.slice().reverse().map(e => el("tr", {},
      el("td", { class: "mono" }, when(e.at)), el("td", {}, e.source), el("td", {}, e.what),
      el("td", { class: "mono" }, e.detail || (e.data && typeof e.data === "object" ? Object.entries(e.data).filter(([k]) => !["vm_id", "pool_id", "org_id"].includes(k)).map(([k, x]) => `${k}=${typeof x === "object" ? JSON.stringify(x) : x}`).join(" ") : "")),
    ))));
  return [
    el("p", {}, el("a", { href: "#/" }, "← Fleet")),
    el("div", { class: "grid" },
      el("section", { class: "card", "aria-labelledby": "vm-title" }, el("h2", { id: "vm-title", class: "mono" }, vmId), dl,
        el("div", { class: "actions" }, drain, shut), el("p", { id: "command-result", "aria-live": "polite" }, state.results[vmId] || "")),
      el("section", { class: "card", "aria-label": "Health" }, el("h2", {}, "Health"),
        chart({ title: "CPU", unit: "%", max: 100, series: [{ label: "CPU", color: "#0969da", points: cpu }] }),
        chart({ title: "Memory", unit: "%", max: 100, series: [{ label: "memory used", color: "#8250df", points: mem }] }))),
    el("div", { class: "card" }, timeline),
  ];
}

async function eventsView() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const res = await api("/api/v1/admin/events?" + new URLSearchParams([...params].filter(([, v]) => v)).toString());
  const input = (name, label, ph) => el("label", {}, label, el("input", { name, id: "e-" + name, value: params.get(name) || "", placeholder: ph }));
  const form = el("form", { class: "filters", "aria-label": "Search events", onsubmit: ev => {
      ev.preventDefault(); location.hash = "#/events?" + new URLSearchParams(new FormData(ev.target)).toString();
    } },
    input("type", "Types", "job_started,job_completed"), input("vm", "VM", ""), input("pool", "Pool", ""),
    input("since", "Since", "2026-01-01T00:00:00Z"), input("q", "Text in data", "repository, run id…"),
    el("button", { type: "submit" }, "Search"));
  const table = el("table", { id: "events" },
    el("caption", {}, `Events (${res.events.length}, newest first)`),
    el("thead", {}, el("tr", {}, ["Received (UTC)", "VM", "Type", "Data"].map(h => el("th", { scope: "col" }, h)))),
    el("tbody", {}, res.events.map(e => el("tr", {},
      el("td", { class: "mono" }, when(e.received_at)),
      el("td", { class: "mono" }, el("a", { href: "#/vm/" + encodeURIComponent(e.vm_id) }, e.vm_id)),
      el("td", {}, e.type),
      el("td", { class: "mono" }, Object.entries(e.data || {}).filter(([k]) => !["vm_id", "pool_id", "org_id"].includes(k)).map(([k, x]) => `${k}=${typeof x === "object" ? JSON.stringify(x) : x}`).join(" "))))));
  return [el("div", { class: "card" }, form, table)];
}

async function jobsView() {
  const res = await api("/api/v1/admin/jobs?limit=200");
  const secs = ms => (ms === null || ms === undefined) ? "-" : (ms / 1000).toFixed(1) + " s";
  const at = ms => ms ? when(new Date(ms).toISOString()) : "-";
  const table = el("table", { id: "jobs" },
    el("caption", {}, `Jobs from GitHub: webhooks and the backstop poll (${res.jobs.length}, newest first)`),
    el("thead", {}, el("tr", {}, ["Queued (UTC)", "Repository", "Run", "Job", "Pool", "VM", "Status", "Result", "Waited", "Ran"].map(h => el("th", { scope: "col" }, h)))),
    el("tbody", {}, res.jobs.map(j => el("tr", { "data-job": j.job_id },
      el("td", { class: "mono" }, at(j.queued_at)),
      el("td", {}, j.repository),
      el("td", { class: "mono" }, String(j.run_id)),
      el("td", {}, j.name),
      el("td", {}, j.pool_id || "no pool"),
      el("td", { class: "mono" }, j.vm_id ? el("a", { href: "#/vm/" + encodeURIComponent(j.vm_id) }, j.vm_id) : "-"),
      el("td", {}, j.status),
      el("td", {}, j.conclusion || "-"),
      el("td", {}, secs(j.queue_ms)),
      el("td", {}, secs(j.duration_ms))))));
  return [el("div", { class: "card" }, table)];
}

let rendering = false;
async function render() {
  if (!state.token) { signOut(""); return; }
  if (rendering) { scheduleRefresh(300); return; }
  rendering = true;
  const focused = document.activeElement && document.activeElement.id;
  try {
    const hash = location.hash || "#/";
    let nodes;
    if (hash.startsWith("#/vm/")) nodes = await vmView(decodeURIComponent(hash.slice(5).split("?")[0]));
    else if (hash.startsWith("#/events")) nodes = await eventsView();
    else if (hash.startsWith("#/jobs")) nodes = await jobsView();
    else nodes = await fleetView();
    view().replaceChildren(...nodes);
    if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
  } catch (e) {
    if (e.message !== "unauthorized") say("Could not load: " + e.message);
  } finally {
    rendering = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", ev => {
    ev.preventDefault();
    state.token = $("#token").value.trim();
    sessionStorage.setItem("mig-token", state.token);
    $("#token").value = "";
    $("#login").hidden = true;
    $("#signout").hidden = false;
    say("");
    render();
    startLive();
  });
  $("#signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", render);
  setInterval(() => state.token && !document.hidden && autoRender(), 5000);
  if (state.token) { $("#signout").hidden = false; render(); startLive(); } else { $("#login").hidden = false; }
});
