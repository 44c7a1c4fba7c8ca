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
        el("span", { class: "chip" }, `${p.scaling.queued_jobs} jobs queued`)) : null,
      p.scaling && p.scaling.last_error
        ? el("div", { class: "chip health-lost", role: "alert" }, `Provider: ${p.scaling.last_error}`)
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
  return [poolCards, el("div", { class: "card" }, form, table)];
}

function chart(points, label, max) {
  const w = 600, h = 140;
  if (points.length < 2) return el("p", { class: "legend" }, `${label}: not enough heartbeats yet`);
  const xs = points.map(p => p[0]), x0 = Math.min(...xs), x1 = Math.max(...xs) || x0 + 1;
  const top = max || Math.max(...points.map(p => p[1]), 1);
  const d = points.map(([x, y], i) => `${i ? "L" : "M"}${((x - x0) / (x1 - x0 || 1) * (w - 10) + 5).toFixed(1)},${(h - 5 - (y / top) * (h - 10)).toFixed(1)}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${label}, last ${points.length} heartbeats, latest ${points[points.length - 1][1].toFixed(1)}`);
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", d); path.setAttribute("fill", "none"); path.setAttribute("stroke", "#0969da"); path.setAttribute("stroke-width", "2");
  svg.append(path);
  return el("figure", {}, svg, el("figcaption", { class: "legend" }, `${label} (latest ${points[points.length - 1][1].toFixed(1)})`));
}

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
      el("section", { class: "card", "aria-label": "Health" }, el("h2", {}, "Health"), chart(cpu, "CPU %", 100), chart(mem, "Memory %", 100))),
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
    el("caption", {}, `Jobs from GitHub's webhook (${res.jobs.length}, newest first)`),
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
