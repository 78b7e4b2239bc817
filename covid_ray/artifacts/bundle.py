"""The exported ensemble folder (``<experiment>/ensemble/``): its files, ``preprocess.json``, and their checks.

``ensemble.build`` writes, and inference (``covid_ray.inference``, the CLI, the service
and its page) reads:

* ``ensemble_int8.onnx`` (only when it passed its parity gate) and ``ensemble_fp32.onnx``:
  one graph, input ``images`` (B, C, S, S) float32, output ``probs`` (B, K) and, with an
  OOD score, ``ood_score`` (B,);
* ``preprocess.json``: how to feed the graph (:func:`preprocess_json`: the eval
  preprocessing, the classes in output order, the temperature, the members and their
  checkpoints, the synthetic flag; later the ``tta`` views and the ``ood`` object);
* ``metrics.json`` (the build's numbers), ``report.md``, ``MODEL_CARD.md`` and
  ``metadata.json`` (the card and the MONAI-style description), ``ood_head.npz`` (the
  OOD head's numbers for the torch path), the figures and ``cache/``.

Nothing here imports torch, onnx or pandas at module level: a prediction CLI reads
these names without paying for the export tool chain.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from covid_ray.artifacts.experiment import TRIALS_FILE
from covid_ray.artifacts.plain import write_json

logger = logging.getLogger(__name__)

INT8_FILE, FP32_FILE = "ensemble_int8.onnx", "ensemble_fp32.onnx"
GRAPH_FILES = (INT8_FILE, FP32_FILE)  # inference's order of preference: int8 exists only when it passed its gate
PREPROCESS_FILE = "preprocess.json"
PREPROCESS_FORMAT = "covid-ray-ensemble/1"
METRICS_FILE, REPORT_FILE = "metrics.json", "report.md"
CARD_FILE, METADATA_FILE = "MODEL_CARD.md", "metadata.json"
OOD_PARAMS_FILE = "ood_head.npz"
CACHE_DIRNAME = "cache"  # member probabilities and outputs, keyed by checkpoint digest
CONFUSION_PLOT, ROC_PLOT, RELIABILITY_PLOT = "confusion_matrix.png", "roc.png", "reliability.png"
# The graph's input and outputs.
INPUT_NAME, OUTPUT_NAME, OOD_OUTPUT = "images", "probs", "ood_score"
VALUE_RANGE = "uint8 / 255 before normalization"


class ModelLoadError(ValueError):
    """The path is not a usable model; the message names the file and what was expected."""


def preprocess_json(preprocess: dict, *, classes: list[str], temperature: float, members: list[dict],
                    synthetic: bool) -> dict:
    """``preprocess.json``: what a client needs to feed the exported graph (MONAI-style metadata).

    Args:
        preprocess: the graph input's eval preprocessing (``Preprocess.to_dict()``).
        members: ``{trial_id, weight, model, checkpoint, sha256}`` per member in the graph.
    """
    s, r, c = preprocess["image_size"], preprocess["resize"], preprocess["in_chans"]
    return {
        "format": PREPROCESS_FORMAT,
        "input": {"name": INPUT_NAME, "shape": ["batch", c, s, s], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "meaning": "class probabilities"},
        **preprocess,
        "steps": [
            "decode as 8-bit grayscale",
            f"resize the shorter side to {r} (bilinear, antialiased, as PIL) and centre-crop {r}x{r}",
            f"centre-crop {s}x{s}",
            "divide by 255",
            *(["replicate the gray channel to 3 channels"] if c == 3 else []),
            "subtract mean and divide by std per channel",
        ],
        "classes": list(classes),
        "temperature": temperature,
        # trial_id and weight as before; model, checkpoint (its model.pt) and sha256 added for Grad-CAM.
        "members": list(members),
        "synthetic": bool(synthetic),
    }


def write_preprocess_json(meta: dict, path: str | Path) -> Path:
    return write_json(path, meta)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object.

    Raises:
        ModelLoadError: unreadable, not JSON, or not an object (naming the file).
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def read_preprocess_json(graph: Path) -> dict:
    """The ``preprocess.json`` beside an exported graph, with its classes checked.

    Raises:
        ModelLoadError: the file is missing or malformed.
    """
    meta_path = graph.parent / PREPROCESS_FILE
    if not meta_path.is_file():
        raise ModelLoadError(f"{graph}: no {PREPROCESS_FILE} beside it (ensemble.build writes both into one folder)")
    meta = read_json_object(meta_path)
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ModelLoadError(f"{meta_path}: 'classes' must be a non-empty list of names, got {classes!r}")
    return meta


def ood_section(meta: dict, graph: Path) -> dict | None:
    """``preprocess.json``'s ``ood`` for the graph file ``graph``, with that file's own threshold (None: no score).

    Raises:
        ModelLoadError: the object does not name its score or has no finite threshold.
    """
    ood, meta_path = meta.get("ood"), graph.parent / PREPROCESS_FILE
    if ood is None:
        return None
    if not isinstance(ood, dict) or not isinstance(ood.get("score"), str):
        raise ModelLoadError(f"{meta_path}: 'ood' must be an object naming its 'score', got {ood!r}")
    threshold = (ood.get("thresholds_by_graph") or {}).get(graph.name, ood.get("threshold"))
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ModelLoadError(f"{meta_path}: 'ood.threshold' must be a finite number, got {threshold!r}")
    return {**ood, "threshold": float(threshold)}


def read_metrics(graph: Path, meta: dict) -> tuple[dict | None, list[str]]:
    """``metrics.json`` beside ``graph`` when it describes this build, and notes on why not.

    An unreadable file is logged and ignored; a file of another build (other members)
    is not reported, with a note saying so.
    """
    path = graph.parent / METRICS_FILE
    if not path.is_file():
        return None, []
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None, []
    exported = set((metrics or {}).get("export", {}).get("weights") or {})
    if exported != {str(m.get("trial_id")) for m in meta.get("members", [])}:
        return None, [f"{path} describes another build than {graph.name} (members differ): not reported"]
    return metrics, []


def member_checkpoints(graph: Path, meta: dict) -> list[dict]:
    """The torch members behind an exported graph: ``{trial_id, weight, checkpoint, sha256}``.

    ``preprocess.json`` names each member's checkpoint (files written since Grad-CAM
    support; a relative path is taken from the folder); older files only have trial
    ids, which are looked up in the search's ``trials.csv`` (``<experiment>/ensemble/../trials.csv``).

    Raises:
        ModelLoadError: no members, or a member's checkpoint cannot be located.
    """
    folder, meta_path = graph.parent, graph.parent / PREPROCESS_FILE
    members = meta.get("members") or []
    if not members:
        raise ModelLoadError(f"{meta_path}: lists no members")
    trials_file = folder.parent / TRIALS_FILE
    table: dict[str, str] | None = None
    out = []
    for m in members:
        ckpt = m.get("checkpoint")
        if ckpt and not Path(ckpt).is_absolute():
            ckpt = str(folder / ckpt)
        if not ckpt or not Path(ckpt).exists():
            if table is None:
                table = _trial_checkpoints(trials_file)
            ckpt = table.get(str(m.get("trial_id")))
        if not ckpt or not Path(ckpt).exists():
            raise ModelLoadError(
                f"{meta_path}: checkpoint of member {m.get('trial_id')!r} not found "
                f"({m.get('checkpoint') or 'not recorded'}; not in {trials_file} either)"
            )
        out.append({"trial_id": str(m.get("trial_id")), "weight": float(m.get("weight", 1.0)),
                    "checkpoint": Path(ckpt), "sha256": m.get("sha256")})
    return out


def _trial_checkpoints(path: Path) -> dict[str, str]:
    """trial_id -> checkpoint folder from a search's ``trials.csv`` (empty when absent)."""
    from covid_ray.artifacts.experiment import read_trials  # pandas: only for exports older than Grad-CAM

    if not path.is_file():
        return {}
    trials = read_trials(path.parent)
    return {t: c for t, c in zip(trials["trial_id"], trials["checkpoint"]) if c}
