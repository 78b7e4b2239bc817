"""Write the deployable files: ONNX fp32, gated int8, ``preprocess.json``, with sizes and latency.

The export stage of ``ensemble.build``. It never decides anything from the test split:
the graph is fixed before, and the test images only check it (fp32 against torch,
int8 against fp32 in the parity gate).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covid_ray.artifacts.bundle import (
    FP32_FILE, INPUT_NAME, INT8_FILE, OOD_PARAMS_FILE, OUTPUT_NAME, PREPROCESS_FILE, write_preprocess_json,
)
from covid_ray.artifacts.experiment import Experiment

from ensemble.export import EnsembleModule, ExportRefused, export_onnx, input_preset, preprocess_json
from ensemble.graph import trusted
from ensemble.members import load_split_dataset, preprocessed_batches, sample_rows
from ensemble.quantize import (
    cpu_threads,
    file_size,
    latency_table,
    parity_gate,
    quantize_int8,
    run_onnx,
    session,
)
from ensemble.select import Member

logger = logging.getLogger(__name__)

EXPORTS = ("onnx-int8", "onnx", "none")
# Agreement expected between the exported fp32 graph and torch (the acceptance criterion).
FP32_TOLERANCE = 1e-4


def remove_stale(out_dir: Path) -> None:
    """Delete export files of an earlier build, so the folder never mixes two ensembles."""
    for name in (FP32_FILE, INT8_FILE, PREPROCESS_FILE, OOD_PARAMS_FILE):  # the OOD head: ensemble.abstain's
        for path in (out_dir / name, out_dir / (name + ".data")):
            path.unlink(missing_ok=True)


@torch.no_grad()
def torch_probs(module: EnsembleModule, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    module.eval()
    parts = [_probs_of(module(torch.from_numpy(x[i : i + batch_size]))).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float64)


def _probs_of(out):
    """The probabilities of a module's output: a graph with an OOD score returns (probs, ood_score)."""
    return out[0] if isinstance(out, tuple) else out


def _gated_int8(fp32_path: Path, candidate: Path, calibration: np.ndarray, batches, fp32: np.ndarray,
                labels: np.ndarray, threads: int) -> tuple:
    """Quantize to ``candidate`` and run the parity gate; returns (gate, int8 session)."""
    quantize_int8(fp32_path, candidate, calibration)
    session_int8 = session(candidate, threads=threads)
    int8 = np.concatenate([run_onnx(session_int8, x) for x, _ in batches()])
    return parity_gate(fp32, int8, labels), session_int8


def export_ensemble(
    members: Sequence[Member],
    weights: Sequence[float],
    temperature: float,
    experiment: Experiment,
    manifest: pd.DataFrame,
    out_dir: Path,
    *,
    kind: str = "onnx-int8",
    data_cache_dir: str | Path | None = None,
    calibration_images: int = 128,
    latency_repeats: int = 10,
    views: Sequence[str] = (),
    ood=None,
) -> dict:
    """Export the ensemble; returns the ``export`` section of metrics.json.

    ``views`` (``--tta``) and ``ood`` (an :class:`ensemble.abstain.OodFit`) go into the
    graph (:mod:`ensemble.graph`); the OOD threshold is fitted after, by
    :func:`ensemble.abstain.finish_ood`.

    ``status`` is ``ok``, ``refused`` (no exact single graph, e.g. mixed image sizes;
    ``message`` says why), or ``int8_rejected`` (the parity gate failed or quantization
    raised; the fp32 file is still written).
    """
    if kind not in EXPORTS:
        raise ValueError(f"unknown export {kind!r}; choose one of {EXPORTS}")
    remove_stale(out_dir)
    info: dict = {"requested": kind}
    if kind == "none":
        return {**info, "status": "skipped"}
    try:
        module = trusted(EnsembleModule(members, weights, temperature, experiment.classes), views=views,
                         ood_score=ood.score if ood else None, fits=ood.fits if ood else None)
    except ExportRefused as exc:
        logger.error("%s", exc)
        return {**info, "status": "refused", "message": str(exc)}
    spec = module.spec
    info.update(input=INPUT_NAME, output=OUTPUT_NAME, preprocess=spec, status="ok", files={})
    preset = input_preset(spec)
    test_set = load_split_dataset(experiment, manifest, "test", resize=spec["resize"], data_cache_dir=data_cache_dir)

    def batches():
        return preprocessed_batches(test_set, preset)

    fp32_path = export_onnx(module, out_dir / FP32_FILE)
    info["files"][FP32_FILE] = file_size(fp32_path)
    threads = torch.get_num_threads()  # the same thread count for torch and ONNX Runtime
    session_fp32 = session(fp32_path, threads=threads)
    reference, fp32, labels = [], [], []
    for x, y in batches():
        reference.append(torch_probs(module, x))
        fp32.append(run_onnx(session_fp32, x))
        labels.append(y)
    reference, fp32, labels = np.concatenate(reference), np.concatenate(fp32), np.concatenate(labels)
    info["fp32_vs_torch_max_abs_diff"] = float(np.abs(fp32 - reference).max())
    if info["fp32_vs_torch_max_abs_diff"] > FP32_TOLERANCE:
        logger.warning("ONNX fp32 differs from torch by %.2e (> %.0e)", info["fp32_vs_torch_max_abs_diff"], FP32_TOLERANCE)

    runners = {
        "torch fp32": lambda x: torch_probs(module, x, batch_size=len(x)),
        "ONNX fp32": lambda x: run_onnx(session_fp32, x, batch_size=len(x)),
    }
    # Quantized beside the final name and renamed only if it passes the gate.
    candidate = out_dir / "ensemble_int8.candidate.onnx"
    if kind == "onnx-int8":
        try:
            # Activation ranges from training images only: the test split judges the result.
            train_set = load_split_dataset(experiment, manifest, "train", resize=spec["resize"],
                                           data_cache_dir=data_cache_dir)
            rows = sample_rows(len(train_set), calibration_images)
            calibration = np.concatenate([x for x, _ in preprocessed_batches(train_set, preset, rows=rows)])
            gate, session_int8 = _gated_int8(fp32_path, candidate, calibration, batches, fp32, labels, threads)
            info["gate"] = gate.to_dict()
            info["int8_size_bytes"] = file_size(candidate)
            runners["ONNX int8" if gate.passed else "ONNX int8 (rejected)"] = (
                lambda x: run_onnx(session_int8, x, batch_size=len(x))
            )
            if gate.passed:
                candidate.replace(out_dir / INT8_FILE)
                info["files"][INT8_FILE] = file_size(out_dir / INT8_FILE)
            else:
                logger.error("int8 model rejected by the parity gate: %s", gate.reason)
                info["status"] = "int8_rejected"
        except Exception as exc:  # quantization of an unusual graph: keep fp32, say why
            logger.exception("int8 quantization failed")
            info.update(status="int8_rejected", int8_error=f"{type(exc).__name__}: {exc}")
    if latency_repeats > 0:
        sample = next(preprocessed_batches(test_set, preset, batch_size=32))[0]
        info["latency_ms"] = latency_table(runners, sample, repeats=latency_repeats)
        info.update(latency_repeats=latency_repeats, threads=threads, cpu_threads_available=cpu_threads())
    for path in (candidate, candidate.with_name(candidate.name + ".data")):
        path.unlink(missing_ok=True)  # a rejected model (kept until its latency was measured)

    meta = preprocess_json(module, experiment.classes, synthetic=experiment.synthetic)
    meta.update(module.preprocess_extra() if hasattr(module, "preprocess_extra") else {})  # TTA views, outputs
    write_preprocess_json(meta, out_dir / PREPROCESS_FILE)
    info["files"][PREPROCESS_FILE] = file_size(out_dir / PREPROCESS_FILE)
    info["weights"] = dict(zip(module.trial_ids, module.weights))
    return info
