// Reefline's web page: submit URLs to ingest, follow the batch at the sink, browse and export it.
// Plain browser JavaScript, served by the sink from its binary; nothing is loaded from elsewhere
// but the photos themselves (straight from their URLs), and only those the service fetched: a URL it
// refused (a private address, say) or failed on is never loaded, so that a link to this page cannot
// make an operator's browser reach into the intranet.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, batchId: null, batch: null, started: 0, timer: null };

function apiKey() {
  return localStorage.getItem("reefline-api-key") || "";
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

/// The API's own words for a failed call: `{"error": {"kind", "message"}}`, else the status.
async function failure(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${response.status} ${body.error.kind}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

/// The cells of one CSV line (quoted cells may hold commas and doubled quotes).
function cells(line) {
  const out = [];
  let cell = "", quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quoted && c === '"' && line[i + 1] === '"') { cell += '"'; i++; }
    else if (c === '"') quoted = !quoted;
    else if (c === "," && !quoted) { out.push(cell.trim()); cell = ""; }
    else cell += c;
  }
  out.push(cell.trim());
  return out;
}

/// URLs from pasted text or a file: one per line, or a CSV whose header has a `url` column.
function parseUrls(text) {
  const lines = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  if (!lines.length) return [];
  const column = cells(lines[0]).map((c) => c.toLowerCase()).indexOf("url");
  if (column < 0) return lines;
  return lines.slice(1).map((l) => cells(l)[column]).filter(Boolean);
}

function updateCount() {
  const n = parseUrls($("urls").value).length;
  $("count").textContent = n ? `${n} URL${n === 1 ? "" : "s"}` : "";
}

async function submit() {
  showError("");
  const urls = parseUrls($("urls").value);
  if (!urls.length) return showError("Paste at least one image URL, or load a file of them.");
  if (urls.length > 1000) return showError(`${urls.length} URLs: one submission takes at most 1,000.`);
  $("send").disabled = true;
  try {
    const response = await fetch(`${state.config.ingest_url}/v1/classify`, {
      method: "POST",
      headers: headers({ "content-type": "application/json" }),
      body: JSON.stringify({ images: urls }),
    });
    if (response.status !== 202 && response.status !== 200) return showError(await failure(response));
    const accepted = await response.json();
    follow(accepted.batch_id);
  } catch (e) {
    showError(`Ingest could not be reached (${state.config.ingest_url}): ${e.message}`);
  } finally {
    $("send").disabled = false;
  }
}

function follow(batchId) {
  state.batchId = batchId;
  state.started = performance.now();
  state.batch = null;
  $("batch-id").textContent = batchId;
  $("progress").hidden = false;
  $("results").hidden = false;
  history.replaceState(null, "", `#batch=${batchId}`);
  clearTimeout(state.timer);
  poll();
}

async function poll() {
  const batchId = state.batchId;
  try {
    const response = await fetch(`/v1/batches/${encodeURIComponent(batchId)}`, { headers: headers() });
    if (batchId !== state.batchId) return;
    if (response.status === 404) {
      $("status").textContent = "Accepted; waiting for the pipeline to register it…";
    } else if (!response.ok) {
      showError(await failure(response));
    } else {
      state.batch = await response.json();
      render();
      if (state.batch.done) return;
    }
  } catch (e) {
    showError(`The sink could not be reached: ${e.message}`);
  }
  state.timer = setTimeout(poll, 1000);
}

function render() {
  const b = state.batch;
  const seconds = (performance.now() - state.started) / 1000;
  const rate = b.completed / Math.max(seconds, 0.001);
  $("status").textContent = b.done
    ? `Done: ${b.total} images, ${b.ok} classified, ${b.error} failed.`
    : `${b.completed} of ${b.total} done (${b.ok} ok, ${b.error} failed), ${rate.toFixed(1)} images/s`;
  $("status").dataset.done = b.done;
  $("bar").max = b.total;
  $("bar").value = b.completed;
  const groups = [...new Set(b.results.map((r) => r.marine_group).filter(Boolean))].sort();
  const select = $("f-group");
  const chosen = select.value;
  select.replaceChildren(new Option("any", ""), ...groups.map((g) => new Option(g.replace(/_/g, " "), g)));
  select.value = groups.includes(chosen) ? chosen : "";
  renderGrid();
}

function visible() {
  if (!state.batch) return [];
  const status = $("f-status").value, group = $("f-group").value;
  const marine = $("f-marine").checked, minScore = Number($("f-score").value) || 0;
  return state.batch.results.filter((r) => {
    const top = r.predictions[0];
    if (status && r.status !== status) return false;
    if (marine && !r.marine) return false;
    if (group && r.marine_group !== group) return false;
    if (minScore > 0 && (!top || top.score < minScore)) return false;
    return true;
  });
}

/// Words for an error kind: `blocked_address` is "blocked address".
const words = (kind) => kind.replace(/_/g, " ");

/// The photo of a result the service fetched; for any other, a placeholder naming why there is none.
function photo(r) {
  if (r.status === "ok") {
    const image = document.createElement("img");
    image.loading = "lazy";
    image.alt = "";
    image.referrerPolicy = "no-referrer";
    image.src = r.url;
    return image;
  }
  const none = document.createElement("div");
  none.className = "no-photo";
  none.textContent = `no photo: ${r.error ? words(r.error.kind) : r.status}`;
  // app.css sizes images only; the placeholder takes their place in the card.
  Object.assign(none.style, { aspectRatio: "4 / 3", display: "grid", placeItems: "center", background: "#cdd" });
  return none;
}

function renderGrid() {
  const cards = visible().map((r) => {
    const card = document.createElement("button");
    card.className = `card ${r.status}`;
    card.type = "button";
    card.dataset.requestId = r.request_id;
    const image = photo(r);
    const label = document.createElement("span");
    label.className = "label";
    const top = r.predictions[0];
    label.textContent = top ? top.label : (r.error ? words(r.error.kind) : r.status);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = top ? `${(top.score * 100).toFixed(1)} %` : "";
    const group = document.createElement("span");
    group.className = "group";
    group.textContent = r.marine_group ? r.marine_group.replace(/_/g, " ") : "";
    card.append(image, label, score, group);
    card.addEventListener("click", () => detail(r));
    return card;
  });
  $("grid").replaceChildren(...cards);
}

/// What the photo says of itself, as rows of the detail view.
function exifRows(exif) {
  if (!exif) return [["EXIF", "—"]];
  const gps = exif.gps_latitude !== null && exif.gps_latitude !== undefined
    ? `${exif.gps_latitude.toFixed(6)}, ${exif.gps_longitude.toFixed(6)}` +
      (exif.gps_altitude !== null && exif.gps_altitude !== undefined ? `, ${exif.gps_altitude} m` : "")
    : "—";
  const camera = [exif.camera_make, exif.camera_model].filter(Boolean).join(" ") || "—";
  const size = exif.width ? `${exif.width} × ${exif.height} px` : "—";
  return [["Taken", exif.taken_at || "—"], ["GPS", gps], ["Camera", camera], ["Size", size]];
}

function detail(r) {
  // Only a photo the service fetched (app.css's `display: block` outranks `hidden`).
  const image = $("d-image");
  image.style.display = r.status === "ok" ? "" : "none";
  if (r.status === "ok") image.src = r.url;
  else image.removeAttribute("src");
  $("d-title").textContent = r.predictions[0] ? r.predictions[0].label : `${r.status}: ${r.error ? r.error.kind : ""}`;
  const rows = r.predictions.map((p, i) => {
    const row = document.createElement("tr");
    const name = p.scientific_name ? `${p.label} (${p.scientific_name})` : p.label;
    for (const text of [String(i + 1), name, `${(p.score * 100).toFixed(2)} %`]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  });
  $("d-top5").tBodies[0].replaceChildren(...rows);
  const meta = [
    ["URL", r.url], ["Status", r.status], ["Marine group", r.marine_group || "—"],
    ["Model", `${r.model.name} ${r.model.version}`], ["Error", r.error ? `${r.error.kind}: ${r.error.message}` : "—"],
    ["Submitted", r.submitted_at], ["Completed", r.completed_at],
    ...exifRows(r.exif),
    ["SHA-256", r.sha256 ? `${r.sha256}${r.cached ? " (predictions reused: classified before)" : ""}` : "—"],
    ...Object.entries(r.metadata || {}),
  ];
  $("d-meta").replaceChildren(...meta.flatMap(([k, v]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    return [dt, dd];
  }));
  $("detail").showModal();
}

/// The results shown, as CSV: one row per image, the top-5 as columns.
function csv() {
  const quote = (v) => {
    const s = v === null || v === undefined ? "" : String(v);
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  };
  const head = ["request_id", "batch_index", "url", "status", "error_kind", "label", "index", "score", "marine",
    "marine_group"];
  for (let i = 2; i <= 5; i++) head.push(`label_${i}`, `score_${i}`);
  head.push("model", "model_version", "submitted_at", "completed_at");
  const rows = visible().map((r) => {
    const [top, ...rest] = r.predictions;
    const row = [r.request_id, r.batch_index, r.url, r.status, r.error ? r.error.kind : "", top ? top.label : "",
      top ? top.index : "", top ? top.score : "", r.marine, r.marine_group || ""];
    for (let i = 0; i < 4; i++) row.push(rest[i] ? rest[i].label : "", rest[i] ? rest[i].score : "");
    row.push(r.model.name, r.model.version, r.submitted_at, r.completed_at);
    return row;
  });
  const text = [head, ...rows].map((row) => row.map(quote).join(",")).join("\r\n") + "\r\n";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  link.download = `reefline-${state.batchId}.csv`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

/// Every result of the batch in a field format, as the sink exports it (with the key, so a link will not do).
async function exportBatch() {
  const format = $("export-format").value;
  const url = `/v1/batches/${encodeURIComponent(state.batchId)}/results?format=${encodeURIComponent(format)}`;
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) return showError(await failure(response));
  const extension = { ndjson: "ndjson", "camtrap-dp": "zip" }[format] ?? "json";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `reefline-${state.batchId}-${format}.${extension}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

async function start() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", (e) => localStorage.setItem("reefline-api-key", e.target.value.trim()));
  $("urls").addEventListener("input", updateCount);
  $("file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) {
      $("urls").value = parseUrls(await file.text()).join("\n");
      updateCount();
    }
  });
  $("send").addEventListener("click", submit);
  for (const id of ["f-status", "f-marine", "f-group", "f-score"]) $(id).addEventListener("input", renderGrid);
  $("csv").addEventListener("click", csv);
  $("export").addEventListener("click", exportBatch);
  state.config = await (await fetch("/config.json")).json();
  const match = location.hash.match(/batch=([\w-]+)/);
  if (match) follow(match[1]);
}

start();
