// The admin page: reads /adapters and /metrics, sends admin actions, with the API key kept for this tab
// (sessionStorage) and sent as a Bearer token. No framework, nothing fetched from elsewhere.
"use strict";

const KEY = "adapterServiceApiKey";
const $ = (id) => document.getElementById(id);
let lastTokens = null; // {total, at}: the previous scrape, for throughput

// ---- the API --------------------------------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(method, path, body) {
  const response = await fetch(path, { method, body, headers: authHeaders() });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || text || response.statusText;
    const error = new Error(response.status + ": " + message);
    error.status = response.status;
    throw error;
  }
  return data;
}

function show(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
}

function explain(error, action) {
  if (error.status === 401) return action + " needs an API key: " + error.message;
  if (error.status === 403) return action + " is not allowed with this key: " + error.message;
  return action + " failed: " + error.message;
}

// ---- adapters -------------------------------------------------------------------------------------------

function formatBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(label, onClick, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

let rendered = null; // the listing on screen: rows are rebuilt only when it changed (a button stays put)

function render(listing) {
  const text = JSON.stringify(listing);
  if (text === rendered) return;
  rendered = text;
  const body = $("adapters").tBodies[0];
  body.replaceChildren();
  for (const a of listing.adapters) {
    const row = body.insertRow();
    row.dataset.id = a.id;
    if (a.active) row.className = "active-row";
    const usage = a.usage || {};
    // Module names without their paths (model.layers.0.self_attn.q_proj -> q_proj); the full list on hover.
    const full = Array.isArray(a.target_modules) ? a.target_modules : [a.target_modules || ""];
    const targets = [...new Set(full.map((m) => m.split(".").pop()))].join(", ");
    cell(row, a.id);
    cell(row, a.type);
    cell(row, String(a.rank), "num");
    cell(row, targets).title = full.join(", ");
    cell(row, formatBytes(a.resident_bytes), "num");
    cell(row, a.served === false ? "unloaded" : a.resident ? "yes" : "no");
    cell(row, a.active ? "active" : "");
    cell(row, usage.requests == null ? "–" : String(usage.requests), "num");
    cell(row, usage.requests == null ? "–" : usage.prompt_tokens + " / " + usage.completion_tokens, "num");
    cell(row, usage.last_used ? new Date(usage.last_used).toLocaleString() : "never");
    cell(row, usage.loads == null ? "–" : usage.loads + " / " + usage.evictions, "num");
    const actions = cell(row, "", "actions");
    if (!a.active && a.served !== false) actions.append(button("Activate", () => activate(a.id), "activate"));
    actions.append(button("Delete", () => remove(a.id), "danger delete"));
  }
  $("empty").hidden = listing.adapters.length > 0;
  $("active-line").textContent = listing.active ? "active: " + listing.active : "active: none (base model)";
  document.body.dataset.adapters = String(listing.adapters.length); // tests wait on this
}

async function refreshAdapters() {
  try {
    render(await api("GET", "/adapters"));
  } catch (error) {
    show(explain(error, "Listing adapters"), "error");
  }
}

async function act(action, doing, done) {
  let outcome;
  try {
    const result = await doing();
    outcome = [typeof done === "function" ? done(result) : done, "ok"];
  } catch (error) {
    outcome = [explain(error, action), "error"];
  }
  // The list and the tiles first, then the message: what it says is on screen when it shows.
  await Promise.all([refreshAdapters(), refreshMetrics()]);
  show(...outcome);
}

function activate(id) {
  if (!confirm("Activate " + id + "? Requests that name no adapter will use it.")) return;
  return act("Activating " + id, () => api("PUT", "/adapters/" + encodeURIComponent(id) + "/activate"),
    "Activated " + id + ".");
}

function remove(id) {
  if (!confirm("Delete " + id + " and its stored files? This cannot be undone.")) return;
  return act("Deleting " + id, () => api("DELETE", "/adapters/" + encodeURIComponent(id)), "Deleted " + id + ".");
}

function deactivate() {
  if (!confirm("Deactivate? Requests that name no adapter will use the base model.")) return;
  return act("Deactivating", () => api("DELETE", "/adapters/active"), "No adapter is active.");
}

// ---- upload ---------------------------------------------------------------------------------------------

async function upload(files, suggestedId) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const id = $("upload-id").value.trim() || suggestedId;
  if (id) form.append("adapter_id", id);
  show("Uploading " + files.map((f) => f.name).join(", ") + "…", "ok");
  await act("Uploading", () => api("POST", "/adapters", form), (info) => "Uploaded " + info.id + ".");
  $("upload-id").value = "";
  $("file-input").value = "";
}

function readEntry(entry) {
  // A dropped folder: its files (one level; a PEFT adapter folder is flat).
  if (entry.isFile) return new Promise((resolve, reject) => entry.file((f) => resolve([f]), reject));
  return new Promise((resolve, reject) => entry.createReader().readEntries(async (entries) => {
    const files = await Promise.all(entries.filter((e) => e.isFile).map(readEntry));
    resolve(files.flat());
  }, reject));
}

async function onDrop(event) {
  event.preventDefault();
  $("drop-zone").classList.remove("over");
  const items = Array.from(event.dataTransfer.items || []);
  const entries = items.map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  if (entries.length === 1 && entries[0].isDirectory) {
    return upload(await readEntry(entries[0]), entries[0].name); // named after its folder
  }
  return upload(Array.from(event.dataTransfer.files));
}

// ---- live metrics (the same text /metrics serves) -------------------------------------------------------

function parseMetrics(text) {
  // {name: [{labels: {...}, value}]} from the Prometheus text format (comments skipped).
  const samples = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2];
    }
    (samples[match[1]] = samples[match[1]] || []).push({ labels, value: Number(match[4]) });
  }
  return samples;
}

function total(samples, name, labels) {
  return (samples[name] || [])
    .filter((s) => Object.entries(labels || {}).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0);
}

async function refreshMetrics() {
  let samples;
  try {
    const response = await fetch("/metrics", { headers: authHeaders() });
    if (!response.ok) return;
    samples = parseMetrics(await response.text());
  } catch (_) {
    return;
  }
  const now = performance.now();
  const tokens = total(samples, "adapter_service_generated_tokens_total");
  if (lastTokens !== null && now > lastTokens.at) {
    const rate = Math.max(0, tokens - lastTokens.total) / ((now - lastTokens.at) / 1000);
    $("throughput").textContent = rate.toFixed(1);
  }
  lastTokens = { total: tokens, at: now };
  $("running").textContent = String(total(samples, "adapter_service_running_batch_size"));
  $("queue").textContent = String(total(samples, "adapter_service_queue_depth"));
  $("resident-count").textContent = total(samples, "adapter_service_adapters", { state: "resident" }) + " / " +
    total(samples, "adapter_service_adapters", { state: "registered" });
  $("adapter-memory").textContent = formatBytes(total(samples, "adapter_service_adapter_bytes"));
  $("process-memory").textContent = formatBytes(total(samples, "process_resident_memory_bytes"));
  document.body.dataset.metrics = "loaded";
}

// ---- the key, and start-up ------------------------------------------------------------------------------

function showKeyState() {
  $("key-state").textContent = sessionStorage.getItem(KEY) ? "key set for this tab" : "no key";
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  $("api-key").value = "";
  $("message").hidden = true;
  showKeyState();
  refreshAdapters();
});
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  showKeyState();
  refreshAdapters();
});
$("deactivate").addEventListener("click", deactivate);
$("file-input").addEventListener("change", (event) => upload(Array.from(event.target.files)));
const zone = $("drop-zone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", onDrop);

fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = "model " + h.model; })
  .catch(() => {});
showKeyState();
refreshAdapters();
refreshMetrics();
setInterval(refreshMetrics, 2000);
setInterval(refreshAdapters, 5000);
