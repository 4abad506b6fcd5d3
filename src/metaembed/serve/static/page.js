// The search page: a query (words and/or an image), a budget slider over the ladder (or "auto", where the
// server has a calibrated policy: each search then says the budget it ended at), results as a grid.
// It only calls the service's public JSON API: GET v1/budgets once, POST v1/search per search, and
// v1/thumbnail for images. Paths are relative so the page also works behind a proxy prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_IMAGE_SIDE = 1024; // larger images are scaled down here: the server's request limits stay far away
const state = { budgets: [], auto: null, thumbnails: false, image: null, ticket: 0, searches: 0, timer: null };

function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

function formatQuality(quality) {
  const parts = Object.entries(quality || {}).map(([name, v]) => `${name} ${v <= 1 ? (100 * v).toFixed(1) + " %" : v}`);
  return parts.length ? `model card: ${parts.join(", ")}` : "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error(body && body.error ? body.error.message : `${response.status} ${response.statusText}`);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function currentBudget() {
  return state.budgets[Number($("budget").value)];
}

function autoOn() {
  return state.auto !== null && $("auto").checked;
}

function showBudget() {
  $("budget").disabled = autoOn();
  if (autoOn()) {
    const steps = state.auto.steps;
    $("budget-label").textContent = "auto";
    $("budget-note").textContent = `${steps[0]} first, up to ${steps[steps.length - 1]} when the ranking is unsure`;
    $("quality").textContent = "";
    return;
  }
  const info = currentBudget();
  if (!info) return;
  $("budget-label").textContent = info.budget;
  const bytes = info.index_bytes === null ? "" : `reads ${formatBytes(info.index_bytes)} per query`;
  $("budget-note").textContent = bytes;
  $("quality").textContent = formatQuality(info.quality);
}

function queryValue() {
  const text = $("query").value.trim();
  if (state.image) return text ? { text, image: state.image } : { image: state.image };
  return text || null;
}

async function search() {
  clearTimeout(state.timer);
  const query = queryValue();
  if (query === null) return;
  const body = {
    query,
    budget: autoOn() ? "auto" : currentBudget().budget,
    k: Math.max(1, Number($("k").value) || 12),
    two_stage: $("two-stage").checked,
  };
  const ticket = ++state.ticket;
  try {
    const result = await api("v1/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (ticket !== state.ticket) return; // a newer search (the slider moved on) already went out
    showError("");
    render(result);
  } catch (error) {
    if (ticket === state.ticket) showError(error.message);
  }
}

function searchSoon() {
  clearTimeout(state.timer);
  state.timer = setTimeout(search, 150);
}

function render(result) {
  $("encode-ms").textContent = result.timings.encode_ms.toFixed(1);
  $("score-ms").textContent = result.timings.score_ms.toFixed(2);
  $("bytes-read").textContent = formatBytes(result.index_bytes_read);
  const info = state.budgets.find((b) => b.budget === result.budget);
  $("quality").textContent = formatQuality(info ? info.quality : {});
  state.searches += 1;
  $("stats").dataset.searches = String(state.searches);
  $("stats").dataset.budget = result.budget;
  $("stats").dataset.auto = result.auto ? "yes" : "no";
  $("auto-stat").hidden = !result.auto;
  if (result.auto) {
    const n = result.auto.escalations;
    $("auto-budget").textContent = result.budget;
    const climbed = `(${n} escalation${n === 1 ? "" : "s"} from ${result.auto.cheap})`;
    $("auto-escalations").textContent = n ? climbed : "(the cheap budget was sure)";
  }
  const grid = $("results");
  grid.replaceChildren();
  result.results.forEach((hit, i) => grid.append(card(hit, i + 1)));
  if (!result.results.length) grid.textContent = "The index is empty.";
}

function card(hit, rank) {
  const meta = hit.metadata || {};
  const figure = document.createElement("figure");
  figure.className = "hit";
  figure.dataset.id = hit.id;
  if (state.thumbnails && String(meta.kind || "").includes("image")) {
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = meta.caption || hit.id;
    img.src = `v1/thumbnail?id=${encodeURIComponent(hit.id)}`;
    figure.append(img);
  } else {
    const snippet = document.createElement("p");
    snippet.className = "snippet";
    snippet.textContent = meta.caption || meta.text || hit.id;
    figure.append(snippet);
  }
  const caption = document.createElement("figcaption");
  const line = document.createElement("div");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `#${rank}  ${hit.score.toFixed(3)}`;
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = `  ${hit.id}`;
  line.append(score, id);
  caption.append(line);
  if (meta.caption && figure.querySelector("img")) {
    const text = document.createElement("div");
    text.className = "caption";
    text.textContent = meta.caption;
    caption.append(text);
  }
  figure.append(caption);
  return figure;
}

function readImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("that is not an image file");
    return;
  }
  const url = URL.createObjectURL(file);
  const picture = new Image();
  picture.onload = () => {
    const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(picture.width, picture.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(picture.width * scale));
    canvas.height = Math.max(1, Math.round(picture.height * scale));
    canvas.getContext("2d").drawImage(picture, 0, 0, canvas.width, canvas.height);
    URL.revokeObjectURL(url);
    setImage(canvas.toDataURL("image/png"));
  };
  picture.onerror = () => {
    URL.revokeObjectURL(url);
    showError("the browser cannot read that image");
  };
  picture.src = url;
}

function setImage(dataUrl) {
  state.image = dataUrl;
  $("query-image").src = dataUrl || "";
  $("query-image").hidden = !dataUrl;
  $("clear-image").hidden = !dataUrl;
  if (dataUrl) search();
}

async function init() {
  const info = await api("v1/budgets");
  state.budgets = info.budgets;
  state.thumbnails = info.thumbnails;
  state.auto = info.auto || null;
  $("auto-choice").hidden = state.auto === null;
  $("model").textContent = `model ${info.model}`;
  $("index-size").textContent = info.index_size === null ? "no index" : `${info.index_size.toLocaleString()} items`;
  const slider = $("budget");
  slider.max = String(state.budgets.length - 1);
  slider.value = String(Math.max(0, state.budgets.findIndex((b) => b.budget === info.default)));
  $("ticks").replaceChildren(
    ...state.budgets.map((b) => Object.assign(document.createElement("span"), { textContent: b.budget })),
  );
  showBudget();
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
$("budget").addEventListener("input", () => {
  showBudget();
  searchSoon();
});
$("auto").addEventListener("change", () => {
  showBudget();
  searchSoon();
});
$("k").addEventListener("change", searchSoon);
$("two-stage").addEventListener("change", searchSoon);
$("image-input").addEventListener("change", (event) => readImage(event.target.files[0]));
$("clear-image").addEventListener("click", () => {
  setImage(null);
  $("image-input").value = "";
  search();
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  readImage(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const file = Array.from(event.clipboardData.files || []).find((f) => f.type.startsWith("image/"));
  if (file) {
    event.preventDefault();
    readImage(file);
  }
});
init().catch((error) => showError(`cannot load the budgets: ${error.message}`));
