// The beit3 serve page: no build step, no framework. Everything the server returns is put on the
// page with textContent (never as HTML), and images are fetched with the API key as blobs.
"use strict";

const $ = (id) => document.getElementById(id);
let image = null;      // the File the user chose or dropped
let tasks = {};        // endpoint -> model folder, from /health

function apiKey() { return localStorage.getItem("beit3-api-key") || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("X-API-Key", apiKey());
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) $("key-form").hidden = false;
  if (!response.ok) {
    let detail = response.statusText;
    try { const body = await response.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function form(fields) {
  const data = new FormData();
  for (const [name, value] of Object.entries(fields)) data.append(name, value);
  return data;
}

function showScores(list, rows, key) {
  list.replaceChildren();
  for (const row of rows) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name"; name.textContent = row[key]; name.title = row[key];
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("i");
    fill.style.width = `${Math.max(1, Math.round(row.score * 100))}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value"; value.textContent = row.score.toFixed(3);
    item.append(name, bar, value);
    list.append(item);
  }
}

function showMessage(element, text, isError) {
  element.replaceChildren();
  const target = element.tagName === "OL" ? document.createElement("li") : element;
  target.textContent = text;
  target.className = (element.tagName === "OL" ? "" : "answer ") + (isError ? "error" : "muted");
  if (target !== element) element.append(target);
}

async function caption() {
  if (!tasks.caption || !image) return;
  showMessage($("caption"), "captioning…");
  try {
    const body = await (await api("/caption", { method: "POST", body: form({ image }) })).json();
    $("caption").textContent = body.caption;
    $("caption").className = "answer";
  } catch (err) { showMessage($("caption"), err.message, true); }
}

async function classify() {
  if (!tasks.classify || !image) return;
  try {
    const body = await (await api("/classify", { method: "POST", body: form({ image, top_k: 5 }) })).json();
    showScores($("labels"), body.labels, "label");
  } catch (err) { showMessage($("labels"), err.message, true); }
}

async function zeroShot(event) {
  if (event) event.preventDefault();
  if (!tasks["zero-shot"]) return;
  if (!image) { showMessage($("zero-shot-labels"), "Upload an image first."); return; }
  try {
    const body = await (await api("/zero-shot", { method: "POST", body: form({ image, classes: $("classes").value, top_k: 5 }) })).json();
    showScores($("zero-shot-labels"), body.labels, "label");
  } catch (err) { showMessage($("zero-shot-labels"), err.message, true); }
}

async function ask(event) {
  event.preventDefault();
  if (!image) { showMessage($("answers"), "Upload an image first."); return; }
  try {
    const body = await (await api("/vqa", { method: "POST", body: form({ image, question: $("question").value, top_k: 5 }) })).json();
    showScores($("answers"), body.answers, "answer");
  } catch (err) { showMessage($("answers"), err.message, true); }
}

async function thumbnailInto(img, url) {
  try {
    const blob = await (await api(url)).blob();
    img.src = URL.createObjectURL(blob);
  } catch (err) {  // a blank picture, striped by the style sheet, instead of the broken-image icon
    img.classList.add("missing"); img.alt = ""; img.title = err.message;
    img.src = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' width='1' height='1'/%3E";
  }
}

function showHits(hits) {
  const grid = $("hits");
  grid.replaceChildren();
  if (!hits.length) { grid.textContent = "No hits."; return; }
  for (const hit of hits) {
    const figure = document.createElement("figure");
    figure.className = "hit";
    const img = document.createElement("img");
    img.alt = hit.name;
    img.dataset.id = hit.id;
    thumbnailInto(img, hit.thumbnail_url);
    img.addEventListener("click", async () => {
      const blob = await (await api(hit.image_url)).blob();
      window.open(URL.createObjectURL(blob), "_blank");
    });
    const label = document.createElement("figcaption");
    const name = document.createElement("span");
    name.textContent = hit.name; name.title = hit.name;
    const score = document.createElement("span");
    score.className = "muted"; score.textContent = hit.score.toFixed(3);
    label.append(name, score);
    figure.append(img, label);
    grid.append(figure);
  }
}

async function search(event) {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  try {
    const body = await (await api(`/search?k=12&q=${encodeURIComponent(query)}`)).json();
    showHits(body.hits);
  } catch (err) { $("hits").textContent = err.message; }
}

async function searchByImage() {
  if (!image) { $("hits").textContent = "Upload an image first."; return; }
  try {
    const body = await (await api("/search", { method: "POST", body: form({ image, k: 12 }) })).json();
    showHits(body.hits);
  } catch (err) { $("hits").textContent = err.message; }
}

function useImage(file) {
  if (!file) return;
  image = file;
  $("image-error").hidden = true;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = `${file.name} — drop another to replace it`;
  caption(); classify(); zeroShot();
}

async function start() {
  let health;
  try {
    health = await (await fetch("/health")).json();
  } catch (err) { $("status").textContent = `cannot reach the server: ${err.message}`; return; }
  tasks = health.tasks || {};
  if (health.index) tasks.search = true;
  $("key-form").hidden = !health.auth;
  $("api-key").value = apiKey();
  const names = Object.keys(tasks).filter((t) => t !== "search");
  $("status").textContent = `models: ${names.join(", ") || "none"}` +
    (health.index ? ` · index: ${health.index.images} images` : "") + ` · ${health.device}`;
  if (health.index) $("index-size").textContent = `(${health.index.images} images)`;
  let shown = 0;
  for (const card of document.querySelectorAll("[data-task]")) {
    card.hidden = !tasks[card.dataset.task];
    if (!card.hidden) shown += 1;
  }
  $("search-by-image").hidden = !tasks.search;
  $("nothing").hidden = shown > 0;
}

$("file").addEventListener("change", (event) => useImage(event.target.files[0]));
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const name of ["dragleave", "drop"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (event) => useImage(event.dataTransfer.files[0]));
$("vqa-form").addEventListener("submit", ask);
$("zero-shot-form").addEventListener("submit", zeroShot);
$("search-form").addEventListener("submit", search);
$("search-by-image").addEventListener("click", searchByImage);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("beit3-api-key", $("api-key").value.trim());
  caption(); classify();
});
start();
