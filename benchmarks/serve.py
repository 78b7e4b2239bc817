"""Inference service benchmark (issue 7): ``python -m benchmarks.serve``.

Starts ``python -m covid_ray.serve`` on 127.0.0.1 once per exported graph (int8, fp32)
and times ``POST /predict`` from a client in this process: requests/s and p50/p95
latency at each concurrency, a bounded number of requests each, over loopback only.
Uploads are synthetic 299 px radiograph PNGs, so every request pays the real decode,
resize and crop. For context it also times the graph alone (ONNX Runtime, batch 1, no
HTTP) and, for int8, ``?gradcam=true`` requests (torch members, serialized by a lock).
Writes a section of BENCHMARKS.md (``--no-write``: print only).

    python -m benchmarks.serve                          # results/demo/ensemble
    python -m benchmarks.serve --model-dir results/NAME/ensemble --requests 400

When ``results/demo/ensemble`` holds no export (a build with ``--export none`` removes
it), the demo's top 5 are exported under ``data/bench_serve/demo/`` instead, leaving
``results/demo`` alone; without a demo search at all, a stand-in of two random-weight
ResNet-18s at 64 px (latency does not depend on the weights) under ``data/bench_serve/``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import REPO, machine_note, markdown_table, today, write_section
from benchmarks.ports import free_port
from covid_ray.artifacts.bundle import (
    CACHE_DIRNAME, FP32_FILE, GRAPH_FILES, INT8_FILE, PREPROCESS_FILE, read_json_object, write_preprocess_json,
)
from covid_ray.artifacts.experiment import ENSEMBLE_DIRNAME, EXPERIMENT_FILE, SPLIT_FILE, TRIALS_FILE

HEADING = "Inference service: `/predict` throughput and latency, int8 vs fp32 (`python -m benchmarks.serve`)"
DEMO_EXPERIMENT = REPO / "results" / "demo"
DEFAULT_MODEL_DIR = DEMO_EXPERIMENT / ENSEMBLE_DIRNAME
STANDIN_DIR = REPO / "data" / "bench_serve"
SYNTHETIC = REPO / "data" / "synthetic"


def upload_images(n: int = 32) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of ``n`` synthetic radiographs spread over the classes."""
    from covid_ray.data.prepare import ensure_synthetic

    root = ensure_synthetic(SYNTHETIC)
    files = sorted(root.glob("*/images/*.png"))
    step = max(1, len(files) // n)
    return [(p.name, p.read_bytes()) for p in files[::step][:n]]


def export_demo_copy(demo: Path = DEMO_EXPERIMENT, out: Path = STANDIN_DIR / "demo") -> Path:
    """The demo search's top-5 ensemble exported under ``out`` (results/demo itself is left alone).

    For when ``results/demo/ensemble`` holds no ONNX files (a build with ``--export none``
    deletes them): the search's tables are copied and ``ensemble.build`` runs on the copy;
    the trials' checkpoints stay where they are.
    """
    import shutil

    from ensemble.build import BuildOptions, build_ensemble

    out.mkdir(parents=True, exist_ok=True)
    for name in (EXPERIMENT_FILE, SPLIT_FILE, TRIALS_FILE):
        shutil.copy(demo / name, out / name)
    cache = Path(ENSEMBLE_DIRNAME, CACHE_DIRNAME)
    if (demo / cache).is_dir():  # member probabilities: spares predicting them again
        shutil.copytree(demo / cache, out / cache, dirs_exist_ok=True)
    build_ensemble(out, BuildOptions(top=5, n_boot=100, latency_repeats=0, lung_cam_images=0))
    return out / ENSEMBLE_DIRNAME


def build_standin(out: Path = STANDIN_DIR) -> Path:
    """A two-member ResNet-18 ensemble at 64 px, exported fp32 + int8, under ``out/ensemble``."""
    import torch

    from covid_ray.artifacts.checkpoint import save_checkpoint
    from covid_ray.data.io import read_grayscale, resize_square
    from covid_ray.data.layout import KAGGLE_CLASSES
    from covid_ray.data.transforms import EvalPreset, resize_for
    from covid_ray.models import create_model
    from ensemble.export import EnsembleModule, export_onnx, preprocess_json
    from ensemble.quantize import quantize_int8
    from ensemble.select import load_trial

    classes, size = list(KAGGLE_CLASSES), 64
    members = []
    for i in range(2):
        torch.manual_seed(i)
        folder = save_checkpoint(out / "train" / f"r{i}", create_model("resnet18", len(classes)), classes=classes,
                                 image_size=size, metrics={}, epoch=0, config={"data": str(SYNTHETIC)})
        members.append(load_trial({"trial_id": f"r{i}", "checkpoint": str(folder)}, 0.0, classes))
    module = EnsembleModule(members, [0.5, 0.5], 1.0, classes)
    ens = out / ENSEMBLE_DIRNAME
    ens.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(module, ens / FP32_FILE)
    preset = EvalPreset(image_size=size, in_chans=1)
    calib = [resize_square(read_grayscale(p)[0].array, resize_for(size)) for p in sorted(SYNTHETIC.glob("*/images/*.png"))[:32]]
    quantize_int8(fp32, ens / INT8_FILE, preset(torch.from_numpy(np.stack(calib))).numpy())
    write_preprocess_json(preprocess_json(module, classes, synthetic=True), ens / PREPROCESS_FILE)
    return ens


class Service:
    """``python -m covid_ray.serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, *, threads: int, gradcam: bool):
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "covid_ray.serve", "--model", str(model), "--port", str(self.port),
               "--threads", str(threads), "--log-level", "warning"] + ([] if gradcam else ["--no-gradcam"])
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self):
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not come up within 180 s")
            time.sleep(0.3)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load_test(url: str, images: list[tuple[str, bytes]], *, requests: int, concurrency: int,
              params: dict | None = None) -> dict:
    """``requests`` POSTs from ``concurrency`` threads sharing one keep-alive client.

    Returns the per-request latencies (s), the wall time and the count of non-200 answers.
    """
    latencies: list[float] = []
    errors = 0
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(i: int) -> None:
            nonlocal errors
            name, data = images[i % len(images)]
            start = time.perf_counter()
            r = client.post(f"{url}/predict", files={"file": (name, data, "image/png")}, params=params)
            latencies.append(time.perf_counter() - start)
            errors += r.status_code != 200

        for i in range(min(requests, 2 * concurrency)):  # warm-up: connections, ORT's first runs
            one(i)
        latencies.clear()
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "wall": wall, "errors": errors}


def summarize(runs: list[dict]) -> dict:
    """requests/s (all requests over the summed wall time) and latency percentiles (ms) of some rounds."""
    ms = 1000 * np.concatenate([r["latencies"] for r in runs])
    wall = sum(r["wall"] for r in runs)
    return {"requests": len(ms), "rps": len(ms) / wall, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "errors": sum(r["errors"] for r in runs)}


def direct_latency(model: Path, images: list[tuple[str, bytes]], *, threads: int, repeats: int = 100) -> dict:
    """The graph alone: preprocessing and ``session.run`` at batch 1 in this process (p50, ms)."""
    from covid_ray.data.io import decode_grayscale
    from covid_ray.inference import load_model

    m = load_model(model, threads=threads)
    pre, run = [], []
    for i in range(repeats + 5):  # the first 5: warm-up
        name, data = images[i % len(images)]
        t0 = time.perf_counter()
        x = m.prepare(decode_grayscale(data, name=name).array).x
        t1 = time.perf_counter()
        m.predict(x)
        if i >= 5:
            pre.append(t1 - t0)
            run.append(time.perf_counter() - t1)
    return {"decode_preprocess": 1000 * float(np.median(pre)), "run": 1000 * float(np.median(run))}


def describe_ensemble(model_dir: Path) -> str:
    meta = read_json_object(model_dir / PREPROCESS_FILE)
    models = [m.get("model", "?") for m in meta["members"]]
    arch = ", ".join(f"{models.count(a)} x {a}" for a in dict.fromkeys(models)) if "?" not in models \
        else f"{len(models)} members"
    return (f"`{model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir}`: {arch}, "
            f"{meta['image_size']} px from {meta['resize']} px, {len(meta['classes'])} classes"
            + (" (synthetic data)" if meta.get("synthetic") else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="an exported ensemble folder")
    p.add_argument("--requests", type=int, default=200, help="timed requests per model and concurrency")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client concurrencies (default 1,8)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per request in the service")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds the requests are split into")
    p.add_argument("--gradcam-requests", type=int, default=20, help="timed ?gradcam=true requests (0: skip)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    model_dir = args.model_dir.resolve()
    if not (model_dir / PREPROCESS_FILE).is_file() and model_dir == DEFAULT_MODEL_DIR:
        if (STANDIN_DIR / "demo" / ENSEMBLE_DIRNAME / PREPROCESS_FILE).is_file():
            model_dir = STANDIN_DIR / "demo" / ENSEMBLE_DIRNAME
        elif (DEMO_EXPERIMENT / TRIALS_FILE).is_file():
            print(f"no exported ensemble at {model_dir}; exporting the demo's top 5 under {STANDIN_DIR}", flush=True)
            model_dir = export_demo_copy()
        else:
            print(f"no exported ensemble at {model_dir}; building a stand-in under {STANDIN_DIR}", flush=True)
            model_dir = build_standin()
    if not (model_dir / PREPROCESS_FILE).is_file():
        print(f"error: no exported ensemble ({PREPROCESS_FILE}) in {model_dir}", file=sys.stderr)
        return 2
    images = upload_images()
    load_before = os.getloadavg()
    notes = []
    variants = {}
    for variant in GRAPH_FILES:
        if (model_dir / variant).is_file():
            variants[variant] = model_dir / variant
        else:
            notes.append(f"`{variant}` is absent (int8 is only written when it passes its parity gate): not measured.")
    sizes = {v: f"{p.stat().st_size / 1e6:.0f} MB" for v, p in variants.items()}
    cam_variant = next(iter(variants)) if args.gradcam_requests > 0 and variants else None
    # Both services run at once and are measured in alternating rounds, so that the load of
    # other jobs on this shared machine falls on both alike.
    runs: dict[tuple[str, int], list[dict]] = {}
    with contextlib.ExitStack() as stack:
        services = {v: stack.enter_context(Service(p, threads=args.threads, gradcam=v == cam_variant))
                    for v, p in variants.items()}
        per_round = max(1, args.requests // args.rounds)
        for c in concurrencies:
            for _ in range(args.rounds):
                for v, svc in services.items():
                    runs.setdefault((v, c), []).append(load_test(svc.url, images, requests=per_round, concurrency=c))
        cam_result = None
        if cam_variant:
            svc = services[cam_variant]
            if httpx.get(f"{svc.url}/model").json()["gradcam"]["available"]:
                cam_result = summarize([load_test(svc.url, images, requests=args.gradcam_requests, concurrency=1,
                                                  params={"gradcam": "true"})])
            else:
                notes.append("Grad-CAM unavailable (member checkpoints not found): not measured.")
    direct = {v: direct_latency(p, images, threads=args.threads) for v, p in variants.items()}

    rows = []
    if len(variants) == 2:
        for c in concurrencies:
            a, b = (summarize(runs[(v, c)]) for v in variants)
            notes.append(f"Concurrency {c}: int8 serves {a['rps'] / b['rps']:.1f}x the requests/s of fp32 "
                         f"(p50 {a['p50']:.1f} vs {b['p50']:.1f} ms).")
    for v in variants:
        for c in concurrencies:
            r = summarize(runs[(v, c)])
            print(f"{v} c={c}: {r['rps']:.1f} req/s p50 {r['p50']:.1f} ms p95 {r['p95']:.1f} ms", flush=True)
            rows.append([f"`{v}`", sizes[v], str(c), str(r["requests"]), f"{r['rps']:.1f}", f"{r['p50']:.1f}",
                         f"{r['p95']:.1f}", str(r["errors"])])
        if v == cam_variant and cam_result:
            r = cam_result
            rows.append([f"`{v}` + `?gradcam=true`", sizes[v], "1", str(r["requests"]), f"{r['rps']:.1f}",
                         f"{r['p50']:.1f}", f"{r['p95']:.1f}", str(r["errors"])])
        rows.append([f"(`{v}` alone: ORT `run`, batch 1, no HTTP)", sizes[v], "1", "100", "",
                     f"{direct[v]['run']:.1f}", "", ""])
    rows.append(["(decode + preprocess of one 299 px PNG, in process)", "", "1", "100", "",
                 f"{direct[next(iter(variants))]['decode_preprocess']:.1f}" if variants else "", "", ""])
    load_after = os.getloadavg()

    header = ["graph", "file", "concurrency", "requests", "requests/s", "p50 ms", "p95 ms", "errors"]
    table = markdown_table(header, rows)
    print("\n" + table)
    body = "\n".join([
        f"Command: `python -m benchmarks.serve{' ' + ' '.join(argv) if argv else ''}` &nbsp; Date: {today()}",
        f"Machine: {machine_note()}; load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end.",
        "",
        f"Model: {describe_ensemble(model_dir)}. Service: `python -m covid_ray.serve` (uvicorn, one process) on "
        f"127.0.0.1 with ONNX Runtime at {args.threads} intra-op thread(s) per request; the client (httpx, "
        "keep-alive, one thread per concurrent request) runs on the same machine. Each request uploads one of 32 "
        "synthetic 299 px PNGs (multipart) and is decoded, resized and cropped by the service. Both graphs are "
        f"served at once and measured in {args.rounds} alternating rounds per concurrency, so background load "
        "falls on both alike. Latency is per request, from the client; requests/s is timed requests over wall "
        "time, after a short warm-up per round.",
        "",
        table,
        "",
        *[f"- {n}" for n in notes],
        "- The service and the client share the 2 cores (and other jobs), so the numbers are a lower bound of "
        "what a dedicated machine serves; compare int8 with fp32 within this run.",
        "- Grad-CAM requests run the torch members forward and backward under a lock, one request at a time.",
    ])
    if not args.no_write:
        print(f"\nwrote {write_section(HEADING, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
