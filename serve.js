// The page of serve.py: it calls the same JSON API a script would (GET /model, POST /predict, POST /explain).
// Everything a user sent (file names, error messages) is put on the page with textContent, never as HTML.
"use strict";

let model = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function headers() {
  const token = document.getElementById("token").value;
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text) {
  document.getElementById("status").textContent = text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return response.status + ": " + body.error;
  } catch (e) {
    return response.status + ": " + response.statusText;
  }
}

function bars(result) {
  const box = el("div", "bars");
  for (const name of model.attributes) {
    const p = result.probabilities[name];
    const t = result.thresholds[name];
    const row = el("div", "row" + (p >= t ? " on" : ""));
    row.dataset.attribute = name;
    row.appendChild(el("span", "label", name));
    const track = el("div", "track");
    const fill = el("div", "fill");
    fill.style.width = (100 * p).toFixed(1) + "%";
    const mark = el("div", "mark");
    mark.style.left = "calc(" + (100 * t).toFixed(1) + "% - 1px)";
    mark.title = "threshold " + t.toFixed(2);
    track.append(fill, mark);
    row.append(track, el("span", "value", p.toFixed(3) + " (thr " + t.toFixed(2) + ")"));
    box.appendChild(row);
  }
  return box;
}

async function explain(file, card, button) {
  button.disabled = true;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("/explain", { method: "POST", body: form, headers: headers() });
    if (!response.ok) {
      setStatus("Grad-CAM of " + file.name + ": " + (await errorText(response)));
      return;
    }
    const picture = el("img");
    picture.alt = "Grad-CAM per attribute";
    picture.src = URL.createObjectURL(await response.blob());
    const box = card.querySelector(".cam");
    box.replaceChildren(picture);
  } finally {
    button.disabled = false;
  }
}

function card(file, result) {
  const node = el("div", "card");
  const thumb = el("img", "thumb");
  thumb.alt = "";
  thumb.src = URL.createObjectURL(file);
  node.append(thumb, el("div", "name", result.image));
  if (result.error !== undefined) {
    node.appendChild(el("div", "error", result.error));
    return node;
  }
  node.appendChild(el("div", "present", "Present: " + (result.present.length ? result.present.join(", ") : "none")));
  node.appendChild(bars(result));
  if (model.explain) {
    const button = el("button", "explain", "Grad-CAM");
    button.addEventListener("click", () => explain(file, node, button));
    node.append(button, el("div", "cam"));
  }
  return node;
}

async function predict(files) {
  const results = document.getElementById("results");
  setStatus("");
  for (let start = 0; start < files.length; start += model.max_files) {
    const chunk = files.slice(start, start + model.max_files);
    const form = new FormData();
    for (const file of chunk) form.append("file", file, file.name);
    const response = await fetch("/predict", { method: "POST", body: form, headers: headers() });
    let answers;
    if (response.ok) {
      answers = await response.json();
    } else if (response.status === 400) {
      const body = await response.json();
      if (!body.images) { setStatus("400: " + body.error); return; }
      answers = body.images;
    } else {
      if (response.status === 401) document.getElementById("token-row").hidden = false;
      setStatus(await errorText(response));
      return;
    }
    answers.forEach((result, i) => results.appendChild(card(chunk[i], result)));
  }
}

async function start() {
  const response = await fetch("/model");
  model = await response.json();
  const facts = model.model + ": " + model.backbone + ", " + model.image_size + " px, " +
    model.attributes.length + " attributes" + (model.explain ? ", Grad-CAM" : "");
  document.getElementById("facts").textContent = facts;
  document.getElementById("token-row").hidden = !model.token;
  const input = document.getElementById("files");
  input.addEventListener("change", () => { predict(Array.from(input.files)); input.value = ""; });
  const drop = document.getElementById("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    predict(Array.from(e.dataTransfer.files));
  });
}

start();
