"""int8 by ONNX Runtime static quantization, the parity gate, and CPU latency.

``quantize_int8`` writes a QDQ model with per-channel int8 weights and uint8
activations whose ranges are calibrated (MinMax) on a sample of *training* images:
never on validation or test images, which judge the result. The parity gate then
compares int8 with fp32 on the test split: the argmax must agree on at least 98% of
images and macro-F1 may drop by at most one point; otherwise the int8 file is not
kept. The gate's verdict holds for the CPU it ran on: x86 kernels without VNNI compute
uint8 x int8 products differently (with possible saturation), so rebuild there when
deploying to such a machine.

Why uint8 activations ("U8S8") rather than int8 ("S8S8"): ONNX Runtime's x86 CPU
kernels fuse U8S8 QDQ pairs around every convolution into ``QLinearConv``, while with
S8S8 about half the convolutions stayed fp32 between Q/DQ pairs. Measured on a
5-member ResNet-18/MobileNetV3 ensemble at 64 px, 1 thread: U8S8 4.7 ms (batch 1) and
110 ms (batch 32) against 22 and 332 ms for fp32; S8S8 18 and 405 ms.

The ensemble head (member softmaxes, weighted mean, log, temperature: every node from
a ``Softmax`` on) stays fp32: an int8 output would have a 1/255 step in probability,
too coarse for calibration (ECE) and for clinical thresholds, and it costs nothing.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from covid_ray.metrics import macro_f1

logger = logging.getLogger(__name__)

MIN_AGREEMENT = 0.98
MAX_F1_DROP = 0.01  # one point of macro-F1 on the 0-1 scale


def session(path: str | Path, *, threads: int | None = None):
    """A CPU ``InferenceSession``; ``threads`` caps intra-op threads (None: ORT's default)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(sess, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Outputs of the first output for ``x``, in batches."""
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float64)


def head_nodes(path: str | Path) -> list[str]:
    """Names of every ``Softmax`` node and all nodes downstream of one.

    In the ensemble graph that is the head: member softmaxes, weighted mean, log and
    temperature. (A member with a softmax inside, e.g. attention, would keep the rest
    of its layers in fp32 too: slower, never wrong.) Also every node only the
    ``ood_score`` output needs (:mod:`ensemble.graph`'s OOD head): quantized, its
    distances clipped to one value for every image (measured: AUROC 1.0 -> 0.77).
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    head: set[str] = set()
    frontier = [n for n in graph.node if n.op_type == "Softmax"]
    while frontier:
        node = frontier.pop()
        if node.name in head:
            continue
        head.add(node.name)
        for name in node.output:
            frontier.extend(consumers.get(name, []))
    outputs = [o.name for o in graph.output]
    if "ood_score" in outputs:
        needed = [_ancestors(graph, o) for o in outputs]
        head |= needed[outputs.index("ood_score")] - set().union(*(n for o, n in zip(outputs, needed) if o != "ood_score"))
    return sorted(head)


def _ancestors(graph, output: str) -> set[str]:
    """Names of the nodes ``output`` depends on."""
    producer = {name: node for node in graph.node for name in node.output}
    seen: set[str] = set()
    stack = [output]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            stack.extend(node.input)
    return seen


class ImageReader(CalibrationDataReader):
    """Calibration data: preprocessed training images, in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int):
        self._batches = iter([{input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: np.ndarray,
    *,
    batch_size: int = 16,
) -> Path:
    """Static QDQ quantization (per-channel int8 weights, uint8 activations) of an fp32 model.

    The model is first run through ``quant_pre_process`` (shape inference and graph
    optimization, as ONNX Runtime recommends); if that fails the raw model is used.
    Nodes from the first ``Softmax`` on (the ensemble head) are left in fp32.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre))
        source = pre
    except Exception as exc:  # a graph ORT's optimizer or shape inference cannot take
        logger.warning("quant_pre_process failed (%s); quantizing the model as exported", exc)
        source = fp32_path
    reader = ImageReader(session(source).get_inputs()[0].name, calibration_images.astype(np.float32), batch_size)
    # int8 weights are a quarter of fp32's: only a > 7 GB fp32 graph needs a side file.
    large = file_size(fp32_path) > 4 * 1_800_000_000
    try:
        quantize_static(
            str(source), str(out_path), reader,
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=head_nodes(source), use_external_data_format=large,
        )
    finally:
        pre.unlink(missing_ok=True)
    return out_path


@dataclass
class GateResult:
    """Outcome of the int8 parity gate on the test split."""

    passed: bool
    agreement: float  # fraction of images with the same argmax
    macro_f1_fp32: float
    macro_f1_int8: float
    max_abs_diff: float  # largest probability difference
    reason: str  # empty when passed

    @property
    def f1_drop(self) -> float:
        return self.macro_f1_fp32 - self.macro_f1_int8

    def to_dict(self) -> dict:
        return {**asdict(self), "f1_drop": self.f1_drop, "min_agreement": MIN_AGREEMENT, "max_f1_drop": MAX_F1_DROP}


def parity_gate(
    fp32_probs: np.ndarray,
    int8_probs: np.ndarray,
    labels: np.ndarray,
    *,
    min_agreement: float = MIN_AGREEMENT,
    max_f1_drop: float = MAX_F1_DROP,
) -> GateResult:
    """Whether int8 predictions may replace fp32 ones (both (images, classes))."""
    # Rows are renormalized only to satisfy the metrics' input check; argmax is unchanged.
    fp32_probs = fp32_probs / fp32_probs.sum(axis=1, keepdims=True)
    int8_probs = np.clip(int8_probs, 0, None)
    int8_probs = int8_probs / np.maximum(int8_probs.sum(axis=1, keepdims=True), 1e-12)
    agreement = float((fp32_probs.argmax(axis=1) == int8_probs.argmax(axis=1)).mean())
    f1_fp32, f1_int8 = macro_f1(labels, fp32_probs), macro_f1(labels, int8_probs)
    reasons = []
    if agreement < min_agreement:
        reasons.append(f"int8 agrees with fp32 on {agreement:.1%} of test images (needs >= {min_agreement:.0%})")
    if f1_fp32 - f1_int8 > max_f1_drop:
        reasons.append(
            f"macro-F1 drops {100 * (f1_fp32 - f1_int8):.2f} points ({f1_fp32:.4f} -> {f1_int8:.4f}; "
            f"allowed {100 * max_f1_drop:.0f})"
        )
    return GateResult(
        passed=not reasons,
        agreement=agreement,
        macro_f1_fp32=f1_fp32,
        macro_f1_int8=f1_int8,
        max_abs_diff=float(np.abs(fp32_probs - int8_probs).max()),
        reason="; ".join(reasons),
    )


def latency_ms(fn: Callable[[np.ndarray], object], x: np.ndarray, *, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn(x)`` in milliseconds after ``warmup`` calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def batch_of(images: np.ndarray, size: int) -> np.ndarray:
    """``size`` images, repeating ``images`` when there are fewer."""
    reps = -(-size // len(images))
    return np.concatenate([images] * reps)[:size]


def file_size(path: str | Path) -> int:
    """Bytes of an ONNX model, with its external-data file when there is one."""
    path = Path(path)
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def latency_table(
    runners: dict[str, Callable[[np.ndarray], object]], images: np.ndarray, *, batches: Sequence[int] = (1, 32),
    repeats: int = 10,
) -> dict[str, dict[str, float]]:
    """``{runner: {"batch_1": ms, "batch_32": ms}}`` on the same inputs."""
    return {
        name: {f"batch_{b}": latency_ms(fn, batch_of(images, b), repeats=repeats) for b in batches}
        for name, fn in runners.items()
    }
