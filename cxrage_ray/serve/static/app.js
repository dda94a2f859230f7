// The cxrage serve page: drop films, POST each to /v1/score, show the result; no framework, no CDN.
// Everything scored in this page session is kept in `entries` (in this tab only) for the CSV download.
"use strict";

(function () {
  const CONCURRENT_UPLOADS = 4;
  const CSV_COLUMNS = ["filename", "status", "error", "cxr_age", "raw", "raw_sd", "chronological_age",
    "chronological_age_source", "cxr_age_gap", "qc", "orientation", "rotation_source", "modality",
    "view_position", "patient_sex", "weights_sha256", "preprocess", "tta", "decode", "device"];

  const entries = [];  // {file, result, card, ageTyped, overlays: {method: dataURI}}
  const queue = [];
  let running = 0;

  const $ = (selector, root = document) => root.querySelector(selector);
  const drop = $("#drop");
  const input = $("#file-input");
  const statusLine = $("#status");
  const results = $("#results");
  const csvButton = $("#csv");

  function overlayMethod() {
    return $("input[name=overlay]:checked").value;
  }

  function setStatus() {
    const done = entries.filter((e) => e.result).length;
    const pending = entries.length - done;
    statusLine.textContent = pending ? `Scoring ${pending} film(s)…` : (done ? `${done} film(s) scored.` : "");
    csvButton.disabled = done === 0;
  }

  function fmt(value, digits) {
    return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
  }

  function addFiles(fileList) {
    for (const file of fileList) {
      const card = $("#card-template").content.firstElementChild.cloneNode(true);
      $(".filename", card).textContent = file.name;
      $("[data-field=cxr_age]", card).textContent = "…";
      results.prepend(card);
      const entry = { file, result: null, card, ageTyped: null, overlays: {} };
      entries.push(entry);
      $("input[data-field=chronological_age]", card).addEventListener("input", (event) => {
        const value = event.target.value.trim();
        entry.ageTyped = value === "" ? null : Number(value);
        showGap(entry);
      });
      queue.push(entry);
    }
    setStatus();
    pump();
  }

  function pump() {
    while (running < CONCURRENT_UPLOADS && queue.length) {
      const entry = queue.shift();
      running += 1;
      score(entry).finally(() => {
        running -= 1;
        setStatus();
        pump();
      });
    }
  }

  async function post(file, query) {
    const form = new FormData();
    form.append("files", file, file.name);
    const response = await fetch(`/v1/score?${query}`, { method: "POST", body: form });
    let body;
    try {
      body = await response.json();
    } catch (err) {
      body = { status: "error", error: `HTTP ${response.status}` };
    }
    if (Array.isArray(body)) return body[0];
    if (body.status) return body;  // a one-file 415/422 answer: the file's error object
    return { status: "error", error: body.detail ? String(body.detail) : `HTTP ${response.status}` };
  }

  async function score(entry) {
    let result;
    try {
      result = await post(entry.file, "picture=true");
    } catch (err) {
      result = { status: "error", error: `NetworkError: ${err.message || err}` };
    }
    entry.result = result;
    entry.picture = result.picture || null;
    show(entry);
    applyOverlay(entry);
  }

  function show(entry) {
    const { card, result } = entry;
    const ok = result.status === "ok";
    card.classList.toggle("failed", !ok);
    const age = $("[data-field=cxr_age]", card);
    age.textContent = ok ? fmt(result.cxr_age, 1) : "–";
    age.dataset.value = ok ? String(result.cxr_age) : "";
    $("[data-field=raw_sd]", card).textContent = fmt(result.raw_sd, 3);
    const chrono = $("input[data-field=chronological_age]", card);
    if (result.chronological_age !== null && result.chronological_age !== undefined) {
      chrono.value = result.chronological_age;
      chrono.readOnly = true;
      $(".from-dicom", card).hidden = false;
    }
    const flagged = Boolean(result.qc && result.qc.length);
    const qc = $("[data-field=qc]", card);
    qc.textContent = flagged ? result.qc.join(", ") : (ok ? "none" : "–");
    qc.classList.toggle("flagged", flagged);
    $("[data-field=weights_sha256]", card).textContent = result.weights_sha256 || "–";
    const orientation = result.orientation ? `corrected ${result.orientation}° (${result.rotation_source})`
      : (ok ? "upright" : "–");
    $("[data-field=orientation]", card).textContent = orientation;
    const error = $("[data-field=error]", card);
    error.hidden = ok;
    error.textContent = ok ? "" : result.error;
    if (entry.picture) $("img.film", card).src = entry.picture;
    showGap(entry);
  }

  function chronologicalAge(entry) {
    const fromFile = entry.result && entry.result.chronological_age;
    if (fromFile !== null && fromFile !== undefined) return { age: fromFile, source: "dicom" };
    if (entry.ageTyped !== null && !Number.isNaN(entry.ageTyped)) return { age: entry.ageTyped, source: "typed" };
    return { age: null, source: "" };
  }

  function gapOf(entry) {
    const { age } = chronologicalAge(entry);
    const r = entry.result;
    return r && r.status === "ok" && age !== null ? r.cxr_age - age : null;
  }

  function showGap(entry) {
    const gap = gapOf(entry);
    $("[data-field=cxr_age_gap]", entry.card).textContent =
      gap === null ? "–" : `${gap >= 0 ? "+" : ""}${gap.toFixed(1)} years`;
  }

  async function applyOverlay(entry) {
    const method = overlayMethod();
    const img = $("img.film", entry.card);
    if (!entry.result || entry.result.status !== "ok") return;
    if (method === "none") {
      if (entry.picture) img.src = entry.picture;
      return;
    }
    if (!entry.overlays[method]) {
      try {
        const result = await post(entry.file, `saliency=${method}`);
        if (result.status === "ok" && result.saliency) entry.overlays[method] = result.saliency;
      } catch (err) {
        statusLine.textContent = `Could not compute the ${method} map: ${err.message || err}`;
        return;
      }
    }
    if (overlayMethod() === method && entry.overlays[method]) img.src = entry.overlays[method];
  }

  function csvCell(value) {
    if (value === null || value === undefined) return "";
    const text = Array.isArray(value) ? value.join(";") : String(value);
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function downloadCsv() {
    const lines = [CSV_COLUMNS.join(",")];
    for (const entry of entries) {
      if (!entry.result) continue;
      const { age, source } = chronologicalAge(entry);
      const row = {
        ...entry.result, filename: entry.file.name, chronological_age: age,
        chronological_age_source: source, cxr_age_gap: gapOf(entry),
      };
      lines.push(CSV_COLUMNS.map((c) => csvCell(row[c])).join(","));
    }
    const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "cxr-age.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/model");
      const model = await response.json();
      $("#weights-sha").textContent = model.weights_sha256;
      $("#model-line").textContent = `Model: ${model.weights_file}, ${model.device}, TTA ${model.tta}, ` +
        `cxrage-ray ${model.versions.cxrage_ray}, torch ${model.versions.torch}, ray ${model.versions.ray}.`;
    } catch (err) {
      $("#weights-sha").textContent = "unavailable";
    }
  }

  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") input.click();
  });
  for (const radio of document.querySelectorAll("input[name=overlay]")) {
    radio.addEventListener("change", () => entries.forEach(applyOverlay));
  }
  csvButton.addEventListener("click", downloadCsv);
  loadModel();
})();
