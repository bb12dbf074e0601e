// The console's few behaviours: the token (kept for this tab only), selections, replay and purge
// jobs with progress, and the live panel.  Changes are JSON POSTs with the X-Console-Token header.
"use strict";

const $ = (selector) => document.querySelector(selector);
const esc = (text) => String(text ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function token() {
  const input = $("#token");
  return input ? input.value : "";
}

function cell(text, cls) {
  return `<td${cls ? ` class="${cls}"` : ""}>${esc(text)}</td>`;
}

function renderLive(state) {
  $("#queues tbody").innerHTML = Object.entries(state.queues).map(([name, q]) =>
    `<tr>${cell(name)}${cell(q ? `${q.ready} ready, ${q.consumers} consumer(s)` : "absent", "n")}</tr>`).join("");
  const w = state.worker;
  const rows = [];
  if (!w.reachable) {
    rows.push(`<tr>${cell("metrics")}${cell(`unreachable (${w.error || "?"})`, "open")}</tr>`);
  } else {
    rows.push(`<tr>${cell("in flight")}${cell(w.inflight, "n")}</tr>`);
    for (const [provider, breaker] of Object.entries(w.breakers)) {
      rows.push(`<tr>${cell(`breaker ${provider}`)}${cell(breaker, breaker === "closed" ? "closed" : "open")}</tr>`);
    }
    for (const [status, rate] of Object.entries(w.rates || {})) {
      rows.push(`<tr>${cell(`${status}/s`)}${cell(rate.toFixed(1), "n")}</tr>`);
    }
  }
  $("#worker tbody").innerHTML = rows.join("");
  const counts = Object.entries(state.results.counts);
  $("#results tbody").innerHTML = counts.length
    ? counts.map(([status, n]) => `<tr>${cell(status, `st-${status}`)}<td class="n" id="results-${esc(status)}">${n}</td></tr>`).join("")
    : `<tr>${cell("none yet")}</tr>`;
  $("#recent").innerHTML = state.results.recent.map((r) =>
    `<li><span class="st-${esc(r.status)}">${esc(r.status)}</span>${r.duplicate ? " (duplicate)" : ""} ${esc(r.command_id)}${r.code ? ` · ${esc(r.code)}` : ""}</li>`).join("");
}

async function pollLive() {
  try {
    const answer = await fetch("/api/state", { cache: "no-store" });
    if (answer.ok) renderLive(await answer.json());
  } catch (err) { /* the next poll tries again */ }
}

function showJob(text, done, total, failed) {
  const box = $("#job");
  if (!box) return;
  box.hidden = false;
  box.classList.toggle("error", Boolean(failed));
  $("#job-text").textContent = text;
  const bar = $("#job-bar");
  bar.max = Math.max(total, 1);
  bar.value = done;
}

function describe(job) {
  const verb = job.kind === "replay" ? "replayed" : "purged";
  let text = `${verb} ${job.done} of ${job.total}`;
  if (job.refused) text += `, ${job.refused} could not be published`;
  if (job.error) text += ` — ${job.error}`;
  return job.finished ? `done: ${text}` : `${job.kind}: ${text}…`;
}

async function follow(job) {
  for (;;) {
    showJob(describe(job), job.done, job.total, job.error);
    if (job.finished) break;
    await new Promise((resolve) => setTimeout(resolve, 300));
    job = await (await fetch(`/api/jobs/${job.id}`, { cache: "no-store" })).json();
  }
  sessionStorage.setItem("cw-last-job", JSON.stringify(job));
  setTimeout(() => location.reload(), 800);
}

async function act(button) {
  const keys = button.dataset.selection
    ? [...document.querySelectorAll(".pick:checked")].map((box) => box.value)
    : button.dataset.keys.split(",").filter(Boolean);
  if (!keys.length) { showJob("nothing selected", 0, 1, true); return; }
  const label = button.dataset.label || `${keys.length} selected`;
  if (button.dataset.action === "purge" && !confirm(`Purge ${label} for good?`)) return;
  const answer = await fetch(`/api/${button.dataset.action}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Console-Token": token() },
    body: JSON.stringify({ keys }),
  });
  const reply = await answer.json();
  if (!answer.ok) { showJob(`refused (${answer.status}): ${reply.error}`, 0, 1, true); return; }
  await follow(reply.job);
}

document.addEventListener("DOMContentLoaded", () => {
  const input = $("#token");
  if (input) {
    input.value = sessionStorage.getItem("cw-token") || "";
    input.addEventListener("input", () => sessionStorage.setItem("cw-token", input.value));
  }
  const last = sessionStorage.getItem("cw-last-job");
  if (last) {
    sessionStorage.removeItem("cw-last-job");
    const job = JSON.parse(last);
    showJob(describe(job), job.done, job.total, job.error);
  }
  const all = $("#select-all");
  if (all) all.addEventListener("change", () => {
    document.querySelectorAll(".pick").forEach((box) => { box.checked = all.checked; });
  });
  document.querySelectorAll("button.act").forEach((button) =>
    button.addEventListener("click", () => act(button)));
  pollLive();
  setInterval(pollLive, 2000);
});
