"""Load a trained model for inference and feed it exactly as it was evaluated.

Shared by ``covid_ray.predict`` (the CLI) and ``covid_ray.serve`` (the HTTP service).
A model is either

* an exported ensemble (``ensemble.deploy`` writes it): ``ensemble_int8.onnx`` or
  ``ensemble_fp32.onnx`` with ``preprocess.json`` beside it, or the folder holding them
  (int8 preferred: it only exists when it passed its parity gate against fp32); or
* one training checkpoint (``covid_ray.checkpoint``): a folder with ``model.pt``, or the
  file itself.

Either way the eval preprocessing recorded with the model is applied, and nothing
else: decode as 8-bit grayscale with the project's defensive decoder
(:func:`covid_ray.data.io.decode_grayscale`), :func:`~covid_ray.data.io.resize_square`
to the recorded working resolution ``resize`` (as the decode cache does before
training and evaluation), then :class:`~covid_ray.data.transforms.EvalPreset`
(centre crop ``image_size``, /255, normalize). Recorded values that this pipeline
cannot reproduce (another crop, other normalization statistics) are refused when the
model is loaded rather than approximated.

ONNX Runtime's ``InferenceSession.run`` and a torch module in eval mode under
``inference_mode`` may both be called from several threads at once, so one loaded
model serves concurrent requests; Grad-CAM (:mod:`covid_ray.gradcam`) is not, and
keeps its own copies and lock.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from covid_ray.checkpoint import MODEL_FILE, load_checkpoint, model_from_checkpoint
from covid_ray.data.io import MAX_ASPECT, BadImageError, resize_square
from covid_ray.data.layout import KAGGLE_DIRNAME, SYNTHETIC_MARKER
from covid_ray.data.transforms import EvalPreset, normalization_for, resize_for
from covid_ray.ood import NO_OOD_NOTE, OOD_OUTPUT, ood_fields

logger = logging.getLogger(__name__)

# The names ensemble.deploy writes (not imported from there: it pulls in the ONNX
# quantization tool chain, seconds of start-up a CLI call should not pay; a test checks
# that they agree).
INT8_FILE, FP32_FILE, PREPROCESS_FILE = "ensemble_int8.onnx", "ensemble_fp32.onnx", "preprocess.json"
METRICS_FILE, TRIALS_FILE = "metrics.json", "trials.csv"


class ModelLoadError(ValueError):
    """The path is not a usable model; the message names the file and what was expected."""


@dataclass(frozen=True)
class Preprocess:
    """The eval preprocessing of a model: resize to ``resize``, centre-crop ``image_size``, normalize."""

    image_size: int
    resize: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, d: dict, *, source: str | Path) -> Preprocess:
        """Read and check the ``preprocess`` of a checkpoint or ``preprocess.json``.

        Raises:
            ModelLoadError: a missing key, or values EvalPreset would not reproduce.
        """
        try:
            image_size, in_chans = int(d["image_size"]), int(d["in_chans"])
            resize = int(d.get("resize") or resize_for(image_size))
            mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: preprocessing is missing or malformed ({type(exc).__name__}: {exc})") from None
        if d.get("crop", "center") != "center":
            raise ModelLoadError(f"{source}: unsupported crop {d.get('crop')!r}; expected 'center'")
        if resize < image_size:
            raise ModelLoadError(f"{source}: resize {resize} is smaller than image_size {image_size}")
        try:
            expected = normalization_for(in_chans)
        except ValueError as exc:
            raise ModelLoadError(f"{source}: {exc}") from None
        if not all(len(a) == len(b) and np.allclose(a, b, atol=1e-6) for a, b in zip((mean, std), expected)):
            raise ModelLoadError(
                f"{source}: normalization mean={list(mean)} std={list(std)} differs from the one EvalPreset applies "
                f"for in_chans={in_chans} (mean={list(expected[0])}, std={list(expected[1])})"
            )
        return cls(image_size, resize, in_chans, mean, std)

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size, "resize": self.resize, "crop": "center", "in_chans": self.in_chans,
            "mean": list(self.mean), "std": list(self.std), "value_range": "uint8 / 255 before normalization",
        }

    def resized(self, gray: np.ndarray) -> np.ndarray:
        """(resize, resize) uint8: shorter side to ``resize``, centre crop (as the decode cache).

        Raises:
            BadImageError: an aspect ratio no radiograph has (see ``MAX_ASPECT``).
        """
        h, w = gray.shape
        if max(h, w) > MAX_ASPECT * min(h, w):
            raise BadImageError(f"aspect ratio {w}x{h} is beyond {MAX_ASPECT:g}:1; not a radiograph")
        return resize_square(gray, self.resize)

    def tensor(self, resized: np.ndarray) -> torch.Tensor:
        """(1, C, S, S) float32: the model input for one (resize, resize) uint8 image."""
        preset = EvalPreset(image_size=self.image_size, in_chans=self.in_chans)
        return preset(torch.from_numpy(np.array(resized, dtype=np.uint8))[None])  # a copy: decoded arrays may be read-only

    def crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(top, left, box height, box width) of the model's input crop in original pixels.

        Follows ``resize_square`` (scale the shorter side, centre crop) and then
        EvalPreset's centre crop, mapped back through the resize scale factors.
        """
        r, s = self.resize, self.image_size
        scale = r / min(height, width)
        nh, nw = max(r, round(height * scale)), max(r, round(width * scale))
        inner = int(round((r - s) / 2.0))
        sy, sx = nh / height, nw / width
        return ((nh - r) // 2 + inner) / sy, ((nw - r) // 2 + inner) / sx, s / sy, s / sx


@dataclass
class Prepared:
    """One decoded image on its way to the model."""

    gray: np.ndarray  # (H, W) uint8 as decoded
    resized: np.ndarray  # (R, R) uint8
    x: torch.Tensor  # (1, C, S, S) float32


@dataclass
class LoadedModel:
    """A model ready to predict: ``predict(x)`` maps (B, C, S, S) float32 to (B, K) probabilities."""

    kind: str  # "onnx" or "checkpoint"
    path: Path  # the model file (.onnx or model.pt)
    classes: list[str]
    preprocess: Preprocess
    synthetic: bool | None  # None when the training data can no longer be found
    meta: dict  # preprocess.json, or the checkpoint's payload without weights
    session: Any = None  # onnxruntime.InferenceSession for kind "onnx"
    module: nn.Module | None = None  # the torch model for kind "checkpoint"
    metrics: dict | None = None  # metrics.json beside an exported ensemble
    input_name: str = "images"
    notes: list[str] = field(default_factory=list)
    ood: dict | None = None  # preprocess.json's "ood", its threshold the one fitted for this graph file


    @property
    def name(self) -> str:
        return str(self.path)

    def prepare(self, gray: np.ndarray) -> Prepared:
        resized = self.preprocess.resized(gray)
        return Prepared(gray, resized, self.preprocess.tensor(resized))

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, K) float64 class probabilities in ``classes`` order."""
        return self.predict_with_ood(x)[0]

    def predict_with_ood(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, K) class probabilities and the (B,) OOD scores (None for a model without them)."""
        if self.kind == "onnx":
            arr = x.numpy() if isinstance(x, torch.Tensor) else x
            names = [self.session.get_outputs()[0].name] + ([OOD_OUTPUT] if self.ood else [])
            outs = self.session.run(names, {self.input_name: np.ascontiguousarray(arr, dtype=np.float32)})
            return outs[0].astype(np.float64), (outs[1].astype(np.float64) if self.ood else None)
        with torch.inference_mode():
            logits = self.module(torch.as_tensor(x, dtype=torch.float32))
        return torch.softmax(logits.double(), dim=1).numpy(), None

    def classify(self, x: np.ndarray | torch.Tensor) -> dict:
        """The JSON fields of the prediction for a batch of one image (``image`` is added by the caller)."""
        probs, ood = self.predict_with_ood(x)
        return self.result(probs[0], None if ood is None else float(ood[0]))

    def result(self, probs: np.ndarray, ood_score: float | None = None) -> dict:
        """The JSON fields of one prediction, with its OOD verdict (see :func:`ood_fields`)."""
        k = int(np.argmax(probs))
        row = {
            "class": self.classes[k],
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
            "model": self.name,
            "synthetic": self.synthetic,
        }
        return {**row, **ood_fields(self.ood, ood_score)}

    def describe(self) -> dict:
        """What ``GET /model`` reports: classes, preprocessing, members, test metrics."""
        info: dict = {
            "model": self.name,
            "kind": self.kind,
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            "synthetic": self.synthetic,
        }
        if self.kind == "onnx":
            info["temperature"] = self.meta.get("temperature")
            # Not the checkpoint paths: a client has no use for the server's file system layout.
            info["members"] = [{k: m[k] for k in ("trial_id", "model", "weight") if k in m}
                               for m in self.meta.get("members", [])]
            info["metrics"] = metrics_summary(self.metrics) if self.metrics else None
        else:
            spec = self.meta.get("model", {})
            info["members"] = [{"model": spec.get("name"), "weight": 1.0}]
            vm = self.meta.get("metrics", {})
            keys = ("val_accuracy", "val_macro_f1", "val_balanced_accuracy", "val_loss", "val_images", "epoch")
            info["metrics"] = {"split": "val", **{k: vm[k] for k in keys if k in vm}} if vm else None
        info["ood"] = ({**self.ood, "available": True} if self.ood else
                       {"available": False, "note": NO_OOD_NOTE})
        measured = (self.metrics or {}).get("ood") or {}
        if self.ood and measured.get("status") == "ok":  # the build's test-split and OOD-set rates
            info["ood"]["measured"] = {k: measured.get(k) for k in ("test_accept_rate", "test_images", "benchmark")}
        if self.notes:
            info["notes"] = list(self.notes)
        return info


def metrics_summary(m: dict) -> dict:
    """The test-split headline numbers of ``metrics.json`` (ensemble.build's output)."""
    e = m.get("ensemble", {})
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc_macro", "ece", "nll", "covid_sensitivity")
    out = {"split": "test", "test_images": m.get("test_images"), **{k: e.get(k) for k in keys if k in e}}
    if m.get("lung_cam"):
        out["lung_cam_share_mean"] = m["lung_cam"].get("mean")
        out["lung_cam_images"] = m["lung_cam"].get("images")
    gate = m.get("export", {}).get("gate")
    if gate:
        out["int8_gate_passed"] = gate.get("passed")
    return out


# --------------------------------------------------------------------------- loading


def _onnx_session(path: Path, threads: int | None):
    import onnxruntime as ort  # imported here: a checkpoint-only run does not need it

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # notes about unused initializers are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for a damaged file
        raise ModelLoadError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def load_onnx(path: Path, *, threads: int | None = None) -> LoadedModel:
    """An exported ensemble graph and the ``preprocess.json`` beside it."""
    meta_path = path.parent / PREPROCESS_FILE
    if not meta_path.is_file():
        raise ModelLoadError(f"{path}: no {PREPROCESS_FILE} beside it (ensemble.build writes both into one folder)")
    meta = _read_json(meta_path)
    preprocess = Preprocess.from_dict(meta, source=meta_path)
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ModelLoadError(f"{meta_path}: 'classes' must be a non-empty list of names, got {classes!r}")
    session = _onnx_session(path, threads)
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    shape = list(inp.shape)
    expected = [preprocess.in_chans, preprocess.image_size, preprocess.image_size]
    if len(shape) != 4 or [d for d in shape[1:]] != expected:
        raise ModelLoadError(f"{path}: graph input {inp.name} has shape {shape}; {meta_path} describes [batch, *{expected}]")
    if len(out.shape) != 2 or out.shape[1] != len(classes):
        raise ModelLoadError(f"{path}: graph output has shape {out.shape}, expected [batch, {len(classes)}]")
    ood = _ood_section(meta.get("ood"), session, path, meta_path)
    metrics_path = path.parent / METRICS_FILE
    metrics = None
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable %s: %s", metrics_path, exc)
    notes = []
    exported = set((metrics or {}).get("export", {}).get("weights") or {})
    if metrics is not None and exported != {str(m.get("trial_id")) for m in meta.get("members", [])}:
        notes.append(f"{metrics_path} describes another build than {path.name} (members differ): not reported")
        metrics = None
    synthetic = meta.get("synthetic")
    return LoadedModel(
        kind="onnx", path=path, classes=list(classes), preprocess=preprocess,
        synthetic=None if synthetic is None else bool(synthetic), meta=meta, session=session,
        metrics=metrics, input_name=inp.name, notes=notes, ood=ood,
    )


def _ood_section(ood, session, path: Path, meta_path: Path) -> dict | None:
    """preprocess.json's ``ood``, checked against the graph, with this file's own threshold."""
    if ood is None:
        return None
    if not isinstance(ood, dict) or not isinstance(ood.get("score"), str):
        raise ModelLoadError(f"{meta_path}: 'ood' must be an object naming its 'score', got {ood!r}")
    threshold = (ood.get("thresholds_by_graph") or {}).get(path.name, ood.get("threshold"))
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise ModelLoadError(f"{meta_path}: 'ood.threshold' must be a finite number, got {threshold!r}")
    if OOD_OUTPUT not in {o.name for o in session.get_outputs()}:
        raise ModelLoadError(f"{path}: {meta_path.name} describes an OOD score but the graph has no "
                             f"{OOD_OUTPUT!r} output")
    return {**ood, "threshold": float(threshold)}


def checkpoint_synthetic(payload: dict) -> bool | None:
    """Whether the checkpoint's training data was synthetic; None when that data is gone."""
    data = (payload.get("config") or {}).get("data")
    if not data:
        return None
    root = Path(data)
    for folder in (root, root / KAGGLE_DIRNAME):
        if (folder / SYNTHETIC_MARKER).is_file():
            return True
    return False if root.is_dir() else None


def load_torch_checkpoint(path: Path) -> LoadedModel:
    """One training checkpoint (folder with ``model.pt``, or the file)."""
    try:
        module, payload = model_from_checkpoint(path)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a usable covid-ray checkpoint ({type(exc).__name__}: {exc})") from None
    file = path / MODEL_FILE if path.is_dir() else path
    preprocess = Preprocess.from_dict(payload.get("preprocess", {}), source=file)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    synthetic = checkpoint_synthetic(payload)
    notes = [] if synthetic is not None else [
        f"training data {meta.get('config', {}).get('data')!r} not found: cannot tell whether it was synthetic"
    ]
    return LoadedModel(
        kind="checkpoint", path=file, classes=list(payload["classes"]), preprocess=preprocess,
        synthetic=synthetic, meta=meta, module=module.eval(), notes=notes,
    )


def resolve_model_path(path: str | Path) -> tuple[str, Path]:
    """(kind, file) for a ``--model`` argument; see the module docstring for what is accepted.

    Raises:
        ModelLoadError: nothing usable at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        for name in (INT8_FILE, FP32_FILE):
            if (path / name).is_file():
                return "onnx", path / name
        if (path / MODEL_FILE).is_file():
            return "checkpoint", path / MODEL_FILE
        if (path / "ensemble").is_dir():
            return resolve_model_path(path / "ensemble")  # an experiment folder
        raise ModelLoadError(
            f"{path}: no {INT8_FILE}, {FP32_FILE} or {MODEL_FILE} in this folder "
            "(give an exported ensemble folder, an .onnx file, or a checkpoint)"
        )
    if not path.is_file():
        raise ModelLoadError(f"model not found: {path}")
    if path.suffix == ".onnx":
        return "onnx", path
    if path.suffix in (".pt", ".pth"):
        return "checkpoint", path
    raise ModelLoadError(f"{path}: expected an .onnx file or a checkpoint's model.pt")


def load_model(path: str | Path, *, threads: int | None = None) -> LoadedModel:
    """Load an exported ensemble or a training checkpoint (see the module docstring).

    Args:
        threads: ONNX Runtime intra-op threads (None: its default, one per core).

    Raises:
        ModelLoadError: the path is not a usable model; the message says why.
    """
    kind, file = resolve_model_path(path)
    model = load_onnx(file, threads=threads) if kind == "onnx" else load_torch_checkpoint(file)
    logger.info("loaded %s model %s (%d classes, %d px)", kind, file, len(model.classes), model.preprocess.image_size)
    return model


def ensemble_member_checkpoints(model: LoadedModel) -> list[dict]:
    """The torch members behind an exported ensemble: ``{trial_id, weight, checkpoint, sha256}``.

    ``preprocess.json`` names each member's checkpoint (files written since Grad-CAM
    support); older files only have trial ids, which are looked up in the search's
    ``trials.csv`` (``<experiment>/ensemble/../trials.csv``).

    Raises:
        ModelLoadError: a member's checkpoint cannot be located.
    """
    meta_path = model.path.parent / PREPROCESS_FILE
    members = model.meta.get("members") or []
    if not members:
        raise ModelLoadError(f"{meta_path}: lists no members")
    table: dict[str, str] | None = None
    out = []
    for m in members:
        ckpt = m.get("checkpoint")
        if ckpt and not Path(ckpt).is_absolute():
            ckpt = str(model.path.parent / ckpt)
        if not ckpt or not Path(ckpt).exists():
            if table is None:
                table = _trials_checkpoints(model.path.parent.parent / TRIALS_FILE)
            ckpt = table.get(str(m.get("trial_id")))
        if not ckpt or not Path(ckpt).exists():
            raise ModelLoadError(
                f"{meta_path}: checkpoint of member {m.get('trial_id')!r} not found "
                f"({m.get('checkpoint') or 'not recorded'}; not in {model.path.parent.parent / TRIALS_FILE} either)"
            )
        out.append({"trial_id": str(m.get("trial_id")), "weight": float(m.get("weight", 1.0)),
                    "checkpoint": Path(ckpt), "sha256": m.get("sha256")})
    return out


def _trials_checkpoints(path: Path) -> dict[str, str]:
    """trial_id -> checkpoint folder from a search's ``trials.csv`` (empty when absent)."""
    import csv

    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["trial_id"]: row["checkpoint"] for row in csv.DictReader(f) if row.get("checkpoint")}


def load_member(checkpoint: Path, *, classes: list[str], preprocess: Preprocess) -> tuple[nn.Module, dict]:
    """Rebuild one ensemble member, checking it matches the ensemble's classes and image size."""
    payload = load_checkpoint(checkpoint)
    if sorted(payload["classes"]) != sorted(classes):
        raise ModelLoadError(f"{checkpoint}: classes {payload['classes']} differ from the ensemble's {classes}")
    own = Preprocess.from_dict(payload["preprocess"], source=checkpoint)
    if (own.image_size, own.resize) != (preprocess.image_size, preprocess.resize):
        raise ModelLoadError(
            f"{checkpoint}: {own.image_size}px from {own.resize}px, the ensemble uses "
            f"{preprocess.image_size}px from {preprocess.resize}px"
        )
    module, payload = model_from_checkpoint(payload)
    return module, payload
