// The page of review.py: it uses the same JSON API a script would (GET /api/state, /api/queue, POST
// /api/decisions, /api/undo, GET /api/export). Everything from the data (image names, attribute names, messages)
// is put on the page with textContent, never as HTML.
//
// Pace: a key moves to the next item at once, from items fetched ahead and images preloaded; the decision is
// sent meanwhile. Decisions and undos go to the server one after another, in the order of the keys; a decision
// counts as saved only when the server has answered (after its transaction committed).
"use strict";

const CHUNK = 50; // queue items per GET /api/queue
const PRELOAD = 6; // images fetched ahead of the current item
const CAM_AHEAD = 2; // Grad-CAMs fetched ahead
const KEEP_IMAGES = 40; // preloaded images kept
const KEEP_CAMS = 24; // Grad-CAM pictures kept (object URLs, revoked beyond)
const POLL_MS = 4000; // progress and the labels file's state, from /api/state

let state = null;
let filter = { attribute: "", kind: "" };
let total = 0;
let pos = 0;
let items = new Map(); // position in the filtered queue -> item
let loading = new Map(); // chunk start -> promise of its items
let reviewer = null;
let chain = Promise.resolve(); // the decisions and undos, one after another
let done = []; // this tab's saved decisions, newest last: {id, item, pos} (pos: null after a filter change)
let saving = 0;
let writes = 0; // counts up as each of this page's decisions and undos starts and ends: an answer to a queue
                // fetch sent before it may not overwrite what the page already shows
let lastSeen = null; // state.last_id when the items were last refreshed
let generation = 0; // bumped on each filter change, so late answers for the old filter are dropped
const images = new Map(); // row -> preloaded Image
const cams = new Map(); // "row/column" -> promise of {url} or {error}
const timings = []; // milliseconds from a key to the next item on screen: <body data-timings> (the tests read it)
let saved = 0; // decisions of this tab the server acknowledged: <body data-saved>

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text, error) {
  const box = $("status");
  box.textContent = text;
  box.className = error ? "error" : "";
}

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let answer = null;
  try {
    answer = await response.json();
  } catch (e) {
    answer = null;
  }
  if (!response.ok) {
    throw new Error(response.status + ": " + (answer && answer.error ? answer.error : response.statusText));
  }
  return answer;
}

// ---- the queue, fetched in chunks ----

function chunkStart(p) {
  return Math.floor(p / CHUNK) * CHUNK;
}

function queueUrl(offset) {
  const q = new URLSearchParams({ attribute: filter.attribute, kind: filter.kind, offset: String(offset),
    limit: String(CHUNK) });
  return "/api/queue?" + q.toString();
}

function loadChunk(start, refresh) {
  if (loading.has(start) && !refresh) return loading.get(start);
  const mine = generation;
  const stamp = writes;
  const promise = api("GET", queueUrl(start)).then((answer) => {
    if (mine !== generation) return answer;
    total = answer.total;
    answer.items.forEach((item, i) => {
      if (!items.has(start + i) || (stamp === writes && !items.get(start + i).pending)) items.set(start + i, item);
    });
    return answer;
  });
  loading.set(start, promise);
  promise.catch(() => loading.delete(start));
  return promise;
}

function ensure(p) {
  if (p < 0 || (total && p >= total)) return Promise.resolve();
  return items.has(p) ? Promise.resolve() : loadChunk(chunkStart(p));
}

// ---- images and Grad-CAMs, fetched ahead ----

function imageUrl(row) {
  return "/api/image/" + row;
}

function preloadImage(row) {
  if (images.has(row)) {
    const picture = images.get(row);
    images.delete(row);
    images.set(row, picture); // most recent last
    return;
  }
  const picture = new Image();
  picture.src = imageUrl(row);
  picture.decode().catch(() => {});
  images.set(row, picture);
  while (images.size > KEEP_IMAGES) images.delete(images.keys().next().value);
}

function camFor(item) {
  if (!state.gradcam) return Promise.resolve({ error: state.gradcam_missing });
  const key = item.row + "/" + item.column;
  if (cams.has(key)) return cams.get(key);
  const promise = fetch("/api/gradcam/" + key).then(async (response) => {
    if (response.ok) return { url: URL.createObjectURL(await response.blob()) };
    let message = response.statusText;
    try {
      message = (await response.json()).error;
    } catch (e) { /* not JSON */ }
    if (response.status === 503) cams.delete(key); // busy: asked again next time
    return { error: message };
  }, (e) => {
    cams.delete(key);
    return { error: "Grad-CAM not fetched (" + e.message + ")" };
  });
  cams.set(key, promise);
  while (cams.size > KEEP_CAMS) {
    const [oldest, old] = cams.entries().next().value;
    cams.delete(oldest);
    old.then((c) => { if (c.url) URL.revokeObjectURL(c.url); });
  }
  return promise;
}

function preload(p) {
  for (let q = p + 1; q <= p + PRELOAD; q++) {
    const item = items.get(q);
    if (item) preloadImage(item.row);
  }
  for (let q = p; q <= p + CAM_AHEAD; q++) {
    const item = items.get(q);
    if (item) camFor(item);
  }
  const ahead = p + PRELOAD + CHUNK / 2;
  if (ahead < total && !items.has(ahead)) loadChunk(chunkStart(ahead)).then(() => preload(pos), () => {});
}

// ---- showing an item ----

function decidedText(item) {
  if (item.pending !== undefined && item.pending !== null) return ["saving " + item.pending + "…", "pending"];
  if (!item.decided) return ["not reviewed", ""];
  const d = item.decided;
  return [d.after + " by " + d.reviewer + ", " + d.time.replace("T", " ").slice(0, 19) + " UTC", "done"];
}

function renderItem(item) {
  $("item-name").textContent = item.image;
  const kind = $("item-kind");
  kind.textContent = item.kind === "known" ? "known cell: is the given label wrong?" :
    "NA cell: the suggestion fills it";
  kind.className = "kind " + item.kind;
  $("item-attribute").textContent = item.attribute;
  $("item-given").textContent = item.given;
  $("item-probability").textContent = item.probability.toFixed(3);
  $("item-fill").style.width = (100 * item.probability).toFixed(1) + "%";
  $("item-suggested").textContent = item.suggested;
  $("item-score").textContent = item.score === null ? "none (NA is never wrong)" : item.score.toFixed(3);
  const [text, cls] = decidedText(item);
  const decided = $("item-decided");
  decided.textContent = text;
  decided.className = cls;
  const body = $("others").querySelector("tbody");
  body.replaceChildren();
  for (const other of item.others) {
    const tr = el("tr", other.value !== other.given ? "changed" : "");
    tr.append(el("td", "", other.attribute), el("td", "", other.given), el("td", "", other.value),
      el("td", "", other.probability.toFixed(3)));
    body.appendChild(tr);
  }
  $("position").textContent = "item " + (pos + 1) + " of " + total +
    (filter.attribute || filter.kind ? " (filtered)" : "");
}

function renderCam(item) {
  const picture = $("cam");
  const note = $("cam-note");
  $("cam-caption").textContent = "Grad-CAM of " + item.attribute;
  camFor(item).then((cam) => {
    if (items.get(pos) !== item) return; // moved on meanwhile
    if (cam.url) {
      picture.src = cam.url;
      picture.hidden = false;
      note.textContent = "";
    } else {
      picture.hidden = true;
      note.textContent = cam.error;
    }
  });
}

function showEmpty(text) {
  $("photo").removeAttribute("src");
  $("cam").hidden = true;
  $("cam-note").textContent = "";
  for (const id of ["item-name", "item-kind", "item-attribute", "item-given", "item-probability", "item-suggested",
    "item-score", "item-decided"]) $(id).textContent = "";
  $("others").querySelector("tbody").replaceChildren();
  $("position").textContent = text;
}

async function show(p, t0) {
  if (!total) {
    showEmpty("the queue is empty");
    return;
  }
  p = Math.max(0, Math.min(total - 1, p));
  pos = p;
  if (!items.has(p)) {
    setStatus("loading…");
    try {
      await ensure(p);
    } catch (e) {
      setStatus("the queue could not be fetched: " + e.message, true);
      return;
    }
    if (pos !== p) return;
    setStatus("");
  }
  const item = items.get(p);
  if (!item) return;
  const photo = $("photo");
  const url = imageUrl(item.row);
  if (photo.getAttribute("src") !== url) photo.src = url;
  photo.alt = item.image;
  renderItem(item);
  renderCam(item);
  if (t0 !== undefined) {
    const shown = () => requestAnimationFrame(() => {
      timings.push(Math.round(10 * (performance.now() - t0)) / 10);
      if (timings.length > 1000) timings.shift();
      document.body.dataset.timings = JSON.stringify(timings);
    });
    photo.decode().then(shown, shown);
  }
  preload(p);
}

// ---- decisions ----

function renderSaving() {
  $("saving").textContent = saving ? saving + " saving…" : "";
}

function applyValue(image, attribute, value, decided) {
  // Every cached item of the cell (and the others-table of the image's other items) shows the value now.
  for (const item of items.values()) {
    if (item.image !== image) continue;
    if (item.attribute === attribute) {
      item.decided = decided;
      item.value = value;
    } else {
      for (const other of item.others) if (other.attribute === attribute) other.value = value;
    }
  }
}

function decide(value) {
  const item = items.get(pos);
  if (!item || !reviewer) return;
  const at = pos;
  const t0 = performance.now();
  item.pending = value;
  saving += 1;
  renderSaving();
  if (at + 1 < total) show(at + 1, t0); else renderItem(item);
  chain = chain.then(() => {
    writes += 1;
    return api("POST", "/api/decisions", { image: item.image, attribute: item.attribute, value, reviewer });
  }).then((stored) => {
    item.pending = null;
    applyValue(stored.image, stored.attribute, stored.after, stored);
    done.push({ id: stored.id, item, pos: at });
    saved += 1;
    document.body.dataset.saved = String(saved);
    setStatus("saved: " + stored.image + " " + stored.attribute + " = " + stored.after);
  }, (e) => {
    item.pending = null;
    setStatus("NOT saved: " + item.image + " " + item.attribute + " = " + value + " (" + e.message + ")", true);
  }).finally(() => {
    writes += 1;
    saving -= 1;
    renderSaving();
    if (items.get(pos)) renderItem(items.get(pos));
    refreshState();
  });
}

function undo() {
  if (!reviewer) return;
  chain = chain.then(async () => {
    const last = done.pop();
    const body = { reviewer };
    if (last) body.id = last.id;
    let answer;
    writes += 1;
    try {
      answer = await api("POST", "/api/undo", body);
    } catch (e) {
      setStatus("nothing undone (" + e.message + ")", true);
      return;
    } finally {
      writes += 1;
    }
    const u = answer.undone;
    applyValue(u.image, u.attribute, answer.value, answer.decided);
    setStatus("undone: " + u.image + " " + u.attribute + " = " + u.after + " (now " + answer.value + ")");
    let target = last && last.pos !== null ? last.pos : null;
    if (target === null) {
      for (const [p, item] of items) if (item.image === u.image && item.attribute === u.attribute) target = p;
    }
    if (target !== null) show(target, performance.now()); else if (items.get(pos)) renderItem(items.get(pos));
    refreshState();
  });
}

function act(action) {
  const item = items.get(pos);
  if (action === "next") show(pos + 1, performance.now());
  else if (action === "previous") show(pos - 1, performance.now());
  else if (action === "undo") undo();
  else if (!item) return;
  else if (action === "suggestion") decide(item.suggested);
  else if (action === "keep") decide(item.given);
  else if (action === "1" || action === "0" || action === "NA") decide(action);
}

const KEYS = { "1": "1", "0": "0", n: "NA", N: "NA", Enter: "suggestion", k: "keep", K: "keep", u: "undo", U: "undo",
  ArrowRight: "next", ArrowDown: "next", ArrowLeft: "previous", ArrowUp: "previous" };
const MOVES = new Set(["next", "previous"]);

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.target.closest && e.target.closest("input, select, textarea, #who")) return;
  const action = KEYS[e.key];
  if (!action) return;
  e.preventDefault(); // no scrolling on arrows, no button activation on Enter
  if (e.repeat && !MOVES.has(action)) return; // a held key decides once
  if (!reviewer) {
    askReviewer();
    return;
  }
  act(action);
}

// ---- progress, the labels file, the reviewer ----

function renderState() {
  $("facts").textContent = state.labels + " · " + state.source;
  $("progress").textContent = state.reviewed + " reviewed / " + state.queue + " in queue · " + state.changed +
    " changed · " + state.na_filled + " NA filled · " + state.kept + " kept";
  const left = $("not-learnt");
  left.hidden = !state.not_learnt_message;
  left.textContent = state.not_learnt_message || "";
  const banner = $("changed");
  banner.hidden = !state.labels_changed;
  banner.textContent = state.labels_message || "";
}

let polling = null;

// The server's state into `state`, shown; false (and said) when the server does not answer.
async function fetchState() {
  try {
    state = await api("GET", "/api/state");
  } catch (e) {
    setStatus("the server does not answer (" + e.message + ")", true);
    return false;
  }
  renderState();
  return true;
}

async function refreshState() {
  if (!(await fetchState())) return;
  if (lastSeen !== null && state.last_id !== lastSeen && saving === 0 && total) {
    // another page or server decided meanwhile: the items around here are fetched again
    await loadChunk(chunkStart(pos), true).catch(() => {});
    if (items.get(pos)) renderItem(items.get(pos));
  }
  lastSeen = state.last_id;
}

function poll() {
  clearTimeout(polling);
  polling = setTimeout(async () => {
    await refreshState();
    poll();
  }, POLL_MS);
}

function setReviewer(name) {
  reviewer = name;
  $("reviewer-name").textContent = name || "?";
}

function askReviewer() {
  if (state && state.reviewer) return; // fixed by --reviewer
  $("who").hidden = false;
  $("who-name").value = reviewer || "";
  $("who-name").focus();
}

function onReviewer(e) {
  e.preventDefault();
  const name = $("who-name").value.trim();
  if (!name) return;
  try {
    localStorage.setItem("review-reviewer", name);
  } catch (err) { /* storage off: asked again next time */ }
  setReviewer(name);
  $("who").hidden = true;
  $("who-name").blur();
}

// ---- filters, export, start ----

async function applyFilter() {
  filter = { attribute: $("filter-attribute").value, kind: $("filter-kind").value };
  $("filter-attribute").blur(); // the keys go to the review again
  $("filter-kind").blur();
  generation += 1;
  items = new Map();
  loading = new Map();
  for (const d of done) d.pos = null;
  await startQueue();
}

async function startQueue() {
  let answer;
  try {
    answer = await loadChunk(0);
  } catch (e) {
    setStatus("the queue could not be fetched: " + e.message, true);
    return;
  }
  total = answer.total;
  // continue where the last review stopped: the first item without a decision
  const first = answer.first_pending === null ? 0 : answer.first_pending;
  if (answer.first_pending === null && total) setStatus("every item here has a decision");
  await show(first);
}

async function exportLabels() {
  await chain; // the decisions still being sent are in the export
  const link = el("a");
  link.href = "/api/export";
  link.download = "";
  document.body.appendChild(link);
  link.click();
  link.remove();
}

async function start() {
  if (!(await fetchState())) return;
  lastSeen = state.last_id;
  const select = $("filter-attribute");
  for (const attribute of state.attributes) {
    const option = el("option", "", attribute);
    option.value = attribute;
    select.appendChild(option);
  }
  let stored = null;
  try {
    stored = localStorage.getItem("review-reviewer");
  } catch (e) { /* storage off */ }
  setReviewer(state.reviewer || stored);
  $("change-reviewer").hidden = Boolean(state.reviewer);
  document.addEventListener("keydown", onKey);
  for (const button of document.querySelectorAll("#actions button")) {
    button.addEventListener("click", () => {
      button.blur(); // keys go to the page, not to the last button clicked
      if (!reviewer) askReviewer(); else act(button.dataset.action);
    });
  }
  $("who-form").addEventListener("submit", onReviewer);
  $("change-reviewer").addEventListener("click", (e) => { e.currentTarget.blur(); askReviewer(); });
  $("export").addEventListener("click", (e) => { e.currentTarget.blur(); exportLabels(); });
  $("filter-attribute").addEventListener("change", applyFilter);
  $("filter-kind").addEventListener("change", applyFilter);
  if (!reviewer) askReviewer();
  await startQueue();
  poll();
}

start();
