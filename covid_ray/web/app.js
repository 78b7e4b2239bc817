// covid-ray page: reads GET /model, sends uploads to POST /predict?gradcam=true, shows the answer.
// Every string that comes from an upload or the service is set with textContent (never as
// markup): a file name such as "<img src=x onerror=...>.png" stays text. The page's CSP
// also requires Trusted Types, so an innerHTML assignment would throw.
"use strict";

const $ = (id) => document.getElementById(id);

// Labels of the metrics GET /model reports (covid_ray.inference.metrics_summary and the
// checkpoint's validation summary); unknown keys are shown under their own name.
const METRIC_LABELS = {
  accuracy: "Accuracy",
  balanced_accuracy: "Balanced accuracy",
  macro_f1: "Macro-F1",
  roc_auc_macro: "ROC-AUC (macro)",
  covid_sensitivity: "COVID sensitivity",
  ece: "Calibration error (ECE)",
  nll: "Log loss",
  lung_cam_share_mean: "Mean Grad-CAM share in the lungs",
  lung_cam_images: "Images for the lung share",
  int8_gate_passed: "int8 parity gate passed",
  val_accuracy: "Accuracy",
  val_balanced_accuracy: "Balanced accuracy",
  val_macro_f1: "Macro-F1",
  val_loss: "Loss",
  epoch: "Epoch",
};
const NOT_METRICS = new Set(["split", "test_images", "val_images"]);

let modelInfo = null;
let previewUrl = null;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function pct(x, digits = 1) {
  return `${(100 * x).toFixed(digits)}%`;
}

function fmt(value) {
  // Four significant digits: metrics (0.7333) and OOD scores (5.593) alike.
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4)));
  if (typeof value === "boolean") return value ? "yes" : "no";
  return value === null || value === undefined ? "n/a" : String(value);
}

// ------------------------------------------------------------------ the model panel

function addFact(dl, term, value) {
  dl.append(el("dt", term), el("dd", value));
}

function showModel(info) {
  modelInfo = info;
  $("model-status").hidden = true;
  $("synthetic-badge").hidden = info.synthetic !== true;
  const dl = $("model-facts");
  dl.replaceChildren();
  addFact(dl, "Model", info.model);
  addFact(dl, "Kind", info.kind === "onnx" ? "exported ensemble (ONNX)" : "training checkpoint");
  addFact(dl, "Classes", (info.classes || []).join(", "));
  const members = (info.members || []).map((m) =>
    [m.trial_id, m.model, m.weight !== undefined ? `weight ${fmt(m.weight)}` : null].filter(Boolean).join(" · "));
  addFact(dl, "Members", members.join("; ") || "n/a");
  const pre = info.preprocess || {};
  addFact(dl, "Input", `${pre.image_size} px crop of ${pre.resize} px, ${pre.in_chans} channel(s)`);
  addFact(dl, "Training data", info.synthetic === true ? "synthetic" : info.synthetic === false ? "real" : "unknown");
  // GET /model's ood: preprocess.json's ood object (ensemble.abstain) with "available", or a note.
  const ood = info.ood || {};
  if (ood.available) {
    const measured = ood.measured || {};
    const parts = [ood.score, `abstains above ${fmt(ood.threshold)}`];
    if (measured.test_accept_rate !== undefined && measured.test_accept_rate !== null) {
      parts.push(`accepts ${pct(measured.test_accept_rate)} of the test radiographs`);
    }
    addFact(dl, "Out-of-distribution check", parts.join(", "));
  } else {
    addFact(dl, "Out-of-distribution check", ood.note || "none: every upload gets a class");
  }
  const cam = info.gradcam || {};
  addFact(dl, "Grad-CAM", cam.available ? "available" : `unavailable (${cam.reason || "no reason given"})`);
  for (const note of info.notes || []) addFact(dl, "Note", note);
  showMetrics(info.metrics, info.synthetic);
  const card = info.model_card || {};
  $("card-link").hidden = card.available === false;
  $("card-note").textContent = card.available === false ? "No model card ships with this model." : "";
}

function showMetrics(metrics, synthetic) {
  const body = $("metrics").tBodies[0];
  body.replaceChildren();
  if (!metrics) {
    $("metrics-caption").textContent = "No held-out metrics are recorded with this model.";
    return;
  }
  const n = metrics.test_images ?? metrics.val_images;
  const split = metrics.split === "val" ? "validation split" : "test split";
  $("metrics-caption").textContent = `${split}${n !== undefined && n !== null ? `, ${n} images` : ""}` +
    (synthetic === true ? " (synthetic data)" : "");
  for (const [key, value] of Object.entries(metrics)) {
    if (NOT_METRICS.has(key)) continue;
    const row = el("tr");
    row.append(el("th", METRIC_LABELS[key] || key), el("td", fmt(value)));
    body.append(row);
  }
}

async function loadModel() {
  try {
    const response = await fetch("/model", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    showModel(await response.json());
  } catch (err) {
    $("model-status").textContent = `Could not read the model description: ${err.message}`;
  }
}

// ------------------------------------------------------------------ uploads

function chosen(input, label) {
  const file = input.files && input.files[0];
  label.textContent = file ? `${file.name} (${Math.max(1, Math.round(file.size / 1024))} kB)` : "";
}

function wireDropZone(zone, input, label) {
  input.addEventListener("change", () => chosen(input, label));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || !files.length) return;
    const one = new DataTransfer();
    one.items.add(files[0]);
    input.files = one.files;
    chosen(input, label);
  });
}

// FastAPI answers {"detail": "message"}, or for a missing field a list of {loc, msg}.
function detailText(body, response) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => (d && d.msg ? `${d.msg}${d.loc ? ` (${d.loc.join(".")})` : ""}` : JSON.stringify(d)))
      .join("; ");
  }
  return `${response.status} ${response.statusText || "error"}`;
}

function showError(message) {
  $("error-message").textContent = message;
  $("error").hidden = false;
}

function clearResult() {
  $("error").hidden = true;
  $("result").hidden = true;
}

async function submit(event) {
  event.preventDefault();
  clearResult();
  const file = $("file").files[0];
  if (!file) {
    showError("Choose a radiograph first.");
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const mask = $("mask").files[0];
  if (mask) form.append("mask", mask, mask.name);
  $("submit").disabled = true;
  $("busy").hidden = false;
  try {
    const response = await fetch("/predict?gradcam=true", { method: "POST", body: form });
    const text = await response.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      // JSON {"detail"} from the endpoint; plain text from the server's own body limit (413).
      let message = body ? detailText(body, response) : (text.trim().slice(0, 300) || response.statusText);
      const limit = modelInfo && modelInfo.limits && modelInfo.limits.max_upload_bytes;
      if (response.status === 413 && limit) message += ` (this service accepts uploads up to ${fmt(limit / 1e6)} MB)`;
      showError(`${response.status}: ${message}`);
    } else if (!body) {
      showError(`The service answered ${response.status} without JSON: ${text.slice(0, 200)}`);
    } else {
      showResult(body, file, Boolean(mask));
    }
  } catch (err) {
    showError(`The service could not be reached: ${err.message}`);
  } finally {
    $("submit").disabled = false;
    $("busy").hidden = true;
  }
}

// ------------------------------------------------------------------ the answer

function showResult(row, file, withMask) {
  $("result-name").textContent = row.image;
  const abstained = row.class === null || row.in_distribution === false;
  const verdict = $("verdict");
  verdict.classList.toggle("abstain", abstained);
  if (abstained) {
    $("verdict-label").textContent = "No prediction";
    $("verdict-class").textContent = "Not a chest radiograph, no prediction";
    $("verdict-reason").textContent = row.abstain_reason ||
      "The image lies outside what the model was trained on.";
  } else {
    const p = row.probabilities ? row.probabilities[row.class] : undefined;
    $("verdict-label").textContent = "Predicted class";
    $("verdict-class").textContent = row.class;
    $("verdict-reason").textContent = p !== undefined ? `probability ${pct(p)}` : "";
  }
  showBars(row.probabilities || {}, abstained ? null : row.class, abstained);
  showOod(row);
  showImages(row, file, withMask);
  showLungShare(row, withMask, abstained);
  const notes = $("notes");
  notes.replaceChildren();
  const all = [...(row.notes || []), ...(row.synthetic === true ? ["Synthetic-data model: not clinical evidence."] : [])];
  for (const note of all) notes.append(el("li", note));
  $("result").hidden = false;
}

function showBars(probs, predicted, abstained) {
  const list = $("prob-list");
  list.replaceChildren();
  list.classList.toggle("faded", abstained);
  $("prob-note").hidden = !abstained;
  for (const [name, p] of Object.entries(probs)) {
    const item = el("li", null, name === predicted ? "top" : "");
    const track = el("span", null, "track");
    const fill = el("span", null, "fill");
    fill.style.width = pct(Math.min(1, Math.max(0, p)), 2); // CSSOM, which the CSP allows
    track.append(fill);
    item.append(el("span", name, "name"), track, el("span", pct(p), "value"));
    list.append(item);
  }
}

function showOod(row) {
  const out = $("ood");
  if (row.ood_score === null || row.ood_score === undefined) {
    out.textContent = row.in_distribution === false ? "Outside the training distribution." :
      `Not checked: ${row.ood_note || "this model has no out-of-distribution score."}`;
    return;
  }
  const threshold = row.ood_threshold !== null && row.ood_threshold !== undefined ?
    ` (threshold ${fmt(row.ood_threshold)})` : "";
  const verdict = row.in_distribution === false ? "outside the training distribution" :
    row.in_distribution === true ? "within the training distribution" : "no decision";
  out.textContent = `Score ${fmt(row.ood_score)}${threshold}: ${verdict}.`;
}

function showImages(row, file, withMask) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  const preview = $("preview");
  preview.hidden = false;
  preview.onerror = () => { preview.hidden = true; }; // e.g. a TIFF the browser cannot show
  preview.src = previewUrl;
  const overlay = $("overlay");
  if (row.gradcam_png) {
    overlay.src = `data:image/png;base64,${row.gradcam_png}`;
    overlay.hidden = false;
    $("cam-caption").textContent = `Grad-CAM for ${row.class || "the highest-scoring class"}: warmer colours mark ` +
      "the evidence the model used" + (withMask ? "; the magenta line is the lung outline from the mask." : ".");
  } else {
    overlay.removeAttribute("src");
    overlay.hidden = true;
    $("cam-caption").textContent = row.gradcam_error ? `No Grad-CAM: ${row.gradcam_error}` : "No Grad-CAM overlay.";
  }
}

function showLungShare(row, withMask, abstained) {
  const out = $("lung-share");
  if (row.lung_cam_share !== undefined && row.lung_cam_share !== null) {
    const area = row.lung_area_share !== null && row.lung_area_share !== undefined ?
      ` The lungs cover ${pct(row.lung_area_share)} of the model's view, the share a uniform map would get;` +
      " much less evidence inside than that suggests a shortcut." : "";
    out.textContent = `${pct(row.lung_cam_share)} of the Grad-CAM evidence lies inside the lungs.${area}`;
  } else if (row.lung_cam_note) {
    out.textContent = row.lung_cam_note;
  } else if (withMask) {
    out.textContent = "Not computed.";
  } else {
    out.textContent = abstained ? "Not applicable: no prediction for this image." :
      "Upload the lung mask too to see how much of the evidence lies inside the lungs.";
  }
}

// ------------------------------------------------------------------ start

function clearAll() {
  $("upload-form").reset();
  $("file-name").textContent = "";
  $("mask-name").textContent = "";
  clearResult();
}

document.addEventListener("DOMContentLoaded", () => {
  wireDropZone($("drop-file"), $("file"), $("file-name"));
  wireDropZone($("drop-mask"), $("mask"), $("mask-name"));
  $("upload-form").addEventListener("submit", submit);
  $("clear").addEventListener("click", clearAll);
  loadModel();
});
