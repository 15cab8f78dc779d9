// The page at "/": reads /metadata, sends an uploaded, dropped, pasted or drawn picture to
// /classify and shows the label and a bar chart of the probabilities, or the error /classify
// answers (a model that is not a classifier: 422 naming its outputs and routes). Nothing external.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_BARS = 20;
let meta = null;
const dims = (shape) => `[${shape.map((d) => (d === null ? "N" : d)).join(",")}]`;

async function loadMetadata() {
  const response = await fetch("/metadata");
  meta = await response.json();
  const input = meta.input;
  $("title").textContent = meta.model.name;
  const accuracy = meta.model.test_accuracy == null ? "" : ` · test accuracy ${(100 * meta.model.test_accuracy).toFixed(2)}%`;
  const what = meta.classifier ? `${meta.labels.length} classes`
    : `not a classifier: outputs ${meta.outputs.map((o) => `${o.name} ${dims(o.shape)}`).join(", ")}`;
  $("model-line").textContent = `${input.layout} ${JSON.stringify(input.shape)} · ${what}` +
    (input.background ? ` · expects ${input.background === "dark" ? "light objects on a dark" : "dark objects on a light"} background` : "") +
    accuracy;
  const pictures = input.layout === "NCHW" || input.layout === "NHWC";
  if (!meta.classifier) {
    // The classify action stays for image models: /classify answers 422 with this same message.
    $("label").textContent = "Not a classifier";
    $("notice").hidden = false;
    $("notice").textContent = `${meta.classify_refusal} (see the API docs).`;
    $("drop").hidden = !pictures;
    $("draw").hidden = !pictures;
  } else if (!input.classify) {
    $("drop").hidden = true;
    $("draw").hidden = true;
    $("notice").hidden = false;
    $("notice").textContent = `This model takes ${input.layout} tensors of shape ${JSON.stringify(input.shape)}, ` +
      "not pictures: send them to POST /predict (see the API docs).";
  }
}

function showError(message) {
  $("error").textContent = message;
  $("result").dataset.state = "error";
}

function render(prediction) {
  const labels = meta.labels;
  const rows = prediction.probabilities.map((p, i) => ({ label: labels[i], p, i }));
  rows.sort((a, b) => b.p - a.p);
  const shown = rows.slice(0, MAX_BARS);
  const bars = $("bars");
  bars.replaceChildren();
  for (const row of shown) {
    const bar = document.createElement("div");
    bar.className = "bar" + (row.i === prediction.class_id ? " top" : "");
    bar.dataset.label = row.label;
    bar.dataset.p = String(row.p);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = row.label;
    name.title = row.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * row.p).toFixed(2)}%`;
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * row.p).toFixed(1)}%`;
    bar.append(name, track, value);
    bars.appendChild(bar);
  }
  $("label").textContent = prediction.label;
  $("note").textContent = rows.length > shown.length ? `the ${shown.length} most likely of ${rows.length} classes` : "";
  $("error").textContent = "";
  $("result").dataset.state = "done";
}

async function classify(blob, name) {
  if (!meta) return;
  $("result").dataset.state = "busy";
  $("preview").src = URL.createObjectURL(blob);
  $("preview").hidden = false;
  const form = new FormData();
  form.append("image", blob, name);
  if ($("invert").value !== "auto") form.append("invert", $("invert").value);
  try {
    const response = await fetch("/classify", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      showError(`${response.status}: ${body.error}`);
      return;
    }
    render(body);
  } catch (err) {
    showError(`request failed: ${err}`);
  }
}

function takeFile(file) {
  if (!file) return;
  if (!/^image\/(png|jpeg)$/.test(file.type)) {
    showError(`${file.name}: not a PNG or JPEG`);
    return;
  }
  classify(file, file.name);
}

// --- upload, drag and drop, paste ---
$("file").addEventListener("change", (e) => takeFile(e.target.files[0]));
const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => takeFile(e.dataTransfer.files[0]));
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData || { items: [] }).items].find((i) => i.kind === "file");
  if (item) takeFile(item.getAsFile());
});

// --- drawing: dark strokes on white; /classify inverts for dark-background models by itself ---
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
function clearCanvas() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}
clearCanvas();
ctx.lineCap = "round";
ctx.lineJoin = "round";
ctx.lineWidth = 18;
ctx.strokeStyle = "#000";
let drawing = false;
function point(e) {
  const box = canvas.getBoundingClientRect();
  return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
}
canvas.addEventListener("pointerdown", (e) => {
  drawing = true;
  canvas.setPointerCapture(e.pointerId);
  const [x, y] = point(e);
  ctx.beginPath();
  ctx.moveTo(x, y);
  ctx.lineTo(x + 0.01, y);
  ctx.stroke();
});
canvas.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const [x, y] = point(e);
  ctx.lineTo(x, y);
  ctx.stroke();
});
for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { drawing = false; });
$("clear").addEventListener("click", clearCanvas);
$("classify-drawing").addEventListener("click", () => canvas.toBlob((blob) => classify(blob, "drawing.png"), "image/png"));

loadMetadata().catch((err) => showError(`cannot read /metadata: ${err}`));
