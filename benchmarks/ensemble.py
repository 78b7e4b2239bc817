"""Ensemble benchmark (issue 5): ``python -m benchmarks.ensemble``.

On the synthetic test split: the top-K ensemble (``soft``, ``weighted``, ``greedy``)
against its best single member (macro-F1, accuracy, ECE, NLL), and for the exported
graph the file sizes and CPU latency of torch fp32, ONNX fp32 and ONNX int8 at batch 1
and 32, with the int8 parity gate's verdict. Writes a section of BENCHMARKS.md
(``--no-write``: print only).

    # on a finished search (results/NAME, as covid_ray.tune writes it)
    python -m benchmarks.ensemble --experiment NAME --top 5

    # without a search: train a few members with plain PyTorch (no Ray) on the demo's
    # synthetic data, written as a finished search under --work, then benchmark
    python -m benchmarks.ensemble --train-members

The stand-in search trains each member as a search trial does (the same
:func:`covid_ray.engine.setup_run` and :func:`~covid_ray.engine.run_epoch`, with
BatchNorm momentum 0.1) for a few epochs and keeps its best validation epoch, as a
trial's checkpoint is its best epoch.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import machine_note, markdown_table, today, write_section
from covid_ray.artifacts.bundle import INT8_FILE
from covid_ray.artifacts.checkpoint import MODEL_FILE, save_checkpoint
from covid_ray.artifacts.experiment import ENSEMBLE_DIRNAME, SPLIT_FILE, TRIALS_FILE, read_trials, write_experiment
from covid_ray.data.prepare import DEFAULT_SYNTHETIC_DIR, ensure_synthetic, is_synthetic, split_dataset
from covid_ray.data.scan import find_dataset_root
from covid_ray.data.split import manifest_classes, read_manifest
from covid_ray.config import TrialConfig
from covid_ray.engine import run_epoch, setup_run
from ensemble.build import BuildOptions, build_ensemble
from ensemble.combine import METHODS

HEADING = "Ensemble: top-K vs best single member, int8 vs fp32 (`python -m benchmarks.ensemble`)"
# (model, seed, lr, epochs) of the stand-in search, all at one image size so the whole
# ensemble exports as one graph. On the 5% synthetic set at 64 px only ResNet-18 learns
# well within a few CPU epochs (measured: val macro-F1 ~0.69 after 6 epochs, while
# seed_cnn and MobileNetV3-Small stay near 0.2-0.3), so the members are ResNet-18s of
# different seeds and learning rates plus one weak MobileNetV3 that the fitted methods
# should learn to down-weight.
MEMBERS = [
    ("resnet18", 0, 1e-3, 6),
    ("resnet18", 1, 2e-3, 6),
    ("resnet18", 2, 5e-4, 6),
    ("resnet18", 3, 1e-3, 6),
    ("mobilenet_v3_small", 4, 3e-3, 8),
]


def train_member(data_dir: Path, split: Path, cache_dir: Path, name: str, seed: int, lr: float, epochs: int, *,
                 image_size: int, out: Path) -> dict:
    """Train one member as a search trial trains (:mod:`covid_ray.engine`), keeping its best
    validation epoch's checkpoint; returns its trials.csv fields."""
    cfg = TrialConfig.from_flat({
        "data": str(find_dataset_root(data_dir)), "split": str(split), "cache_dir": str(cache_dir), "model": name,
        "seed": seed, "lr": lr, "epochs": epochs, "image_size": image_size, "batch_size": 32,
        "early_stop_patience": 0,  # every epoch: the stand-in search has no scheduler to stop it
    })
    run = setup_run(cfg, device=torch.device("cpu"))
    for epoch in range(epochs):
        step = run_epoch(run, epoch)
        if step.improved:
            save_checkpoint(out, run.model, classes=run.classes, image_size=image_size, metrics=step.metrics,
                            epoch=epoch + 1, config=cfg.to_flat(), train_state=run.train_state())
        print(f"  {name} seed {seed} epoch {epoch + 1}: val macro-F1 {step.metrics['val_macro_f1']:.4f}", flush=True)
    return {"config/model": name, "config/seed": seed, "config/lr": lr, "config/image_size": image_size,
            "best_val_macro_f1": run.early.best, "best_epoch": run.early.best_epoch, "checkpoint": str(out.resolve())}


def make_search(data_dir: Path, work: Path, *, image_size: int, cache_dir: Path, members=MEMBERS) -> Path:
    """Split the dataset, train ``members`` (default ``MEMBERS``) and write a finished search folder ``work/search``.

    A folder already complete (its trials.csv and every checkpoint there) is reused.
    """
    folder = work / "search"
    done = (folder / TRIALS_FILE).is_file() and all(Path(c, MODEL_FILE).is_file()
                                                     for c in read_trials(folder)["checkpoint"])
    if done:
        print(f"reusing the stand-in search in {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    split = folder / SPLIT_FILE
    if not split.is_file():
        split_dataset(data_dir, split)
    manifest = read_manifest(split)
    classes = manifest_classes(manifest)
    rows = []
    for i, (name, seed, lr, epochs) in enumerate(members):
        t0 = time.perf_counter()
        row = train_member(data_dir, split, cache_dir, name, seed, lr, epochs, image_size=image_size,
                           out=work / "trials" / f"trial_{i}" / "checkpoint")
        rows.append({"trial_id": f"trial_{i}", "status": "TERMINATED", **row, "error": "",
                     "wall_time_s": time.perf_counter() - t0})
    pd.DataFrame(rows).to_csv(folder / TRIALS_FILE, index=False)
    write_experiment(folder, {
        "name": "ensemble-benchmark", "data": str(find_dataset_root(data_dir).resolve()), "split": SPLIT_FILE,
        "synthetic": is_synthetic(data_dir), "metric": "val_macro_f1", "mode": "max", "classes": classes,
    })
    return folder


def run_builds(folder: Path, *, top: int, cache_dir: Path | None, repeats: int) -> dict:
    """One build per method; only ``soft`` exports (each build clears the previous export)."""
    results = {}
    for method in sorted(METHODS, key=lambda m: m == "soft"):  # soft last, so its files stay
        opts = BuildOptions(top=top, method=method, export="onnx-int8" if method == "soft" else "none",
                            data_cache_dir=str(cache_dir) if cache_dir else None, latency_repeats=repeats)
        t0 = time.perf_counter()
        result = build_ensemble(folder, opts)
        results[method] = {**result.metrics, "build_s": time.perf_counter() - t0}
    return {m: results[m] for m in METHODS}


def _cells(m: dict) -> list[str]:
    return [f"{m['macro_f1']:.4f}", f"{m['accuracy']:.4f}", f"{m['ece']:.4f}", f"{m['nll']:.4f}"]


def render(results: dict, command: str) -> str:
    soft = results["soft"]
    top = soft["members"][0]  # members are in rank order
    oracle = max(soft["members"], key=lambda r: r["macro_f1"])
    ci = soft["ensemble"]["ci95"]["macro_f1"]
    rows = [
        [f"single member chosen on validation ({top['model']}, {top['trial_id']})", *_cells(top)],
        [f"best member on test, an oracle pick ({oracle['model']}, {oracle['trial_id']})", *_cells(oracle)],
    ]
    for method, m in results.items():
        rows.append([f"ensemble `{method}`, T = {m['calibration']['temperature']:.2f}", *_cells(m["ensemble"])])
        rows.append([f"ensemble `{method}`, before temperature", *_cells(m["ensemble_uncalibrated"])])
    member_rows = [[r["trial_id"], r["model"], f"{r['best_val_macro_f1']:.4f}", *_cells(r)] for r in soft["members"]]
    parts = [
        f"Command: `{command}` &nbsp; Date: {today()}",
        f"Machine: {machine_note()}; torch intra-op threads: {torch.get_num_threads()}.",
        "",
        f"Dataset `{Path(soft['dataset']).name}`{' (**synthetic**)' if soft['synthetic'] else ''}: "
        f"test split {soft['test_images']} images, validation {soft['val_images']}. "
        f"{soft['members_used']} members (top {soft['top']} by validation macro-F1). Weights, greedy selection "
        "and the temperature are fitted on validation only.",
        "",
        markdown_table(["model", "macro-F1", "accuracy", "ECE", "NLL"], rows),
        "",
        f"Soft ensemble macro-F1 95% bootstrap CI: [{ci[0]:.3f}, {ci[1]:.3f}].",
        "",
        *[f"- `{method}` weights: " + ", ".join(f"{t} {w:.2f}" for t, w in m["weights"].items() if w > 0)
          for method, m in results.items()],
        "",
        "Members (test split):",
        "",
        markdown_table(["trial", "model", "val macro-F1", "macro-F1", "accuracy", "ECE", "NLL"], member_rows),
        "",
    ]
    x = soft["export"]
    if x["status"] == "refused":
        return "\n".join(parts + [f"Export refused: {x['message']}"])
    sizes = {name: size for name, size in x["files"].items() if name.endswith(".onnx")}
    if "int8_size_bytes" in x and INT8_FILE not in sizes:
        sizes["int8 (rejected by the gate)"] = x["int8_size_bytes"]
    gate = x.get("gate", {})
    lat = x.get("latency_ms", {})
    lat_rows = [[name, f"{v['batch_1']:.1f}", f"{v['batch_32']:.1f}"] for name, v in lat.items()]
    parts += [
        "Export of the soft ensemble (one ONNX graph, weighted mean and temperature inside):",
        "",
        *[f"- `{name}`: {size / 1e6:.2f} MB" for name, size in sizes.items()],
        f"- ONNX fp32 vs torch: max |Δp| {x['fp32_vs_torch_max_abs_diff']:.1e}",
    ]
    if gate:
        parts.append(
            f"- int8 parity gate **{'passed' if gate['passed'] else 'failed'}**: argmax agreement "
            f"{gate['agreement']:.2%}, macro-F1 {gate['macro_f1_fp32']:.4f} -> {gate['macro_f1_int8']:.4f}, "
            f"max |Δp| {gate['max_abs_diff']:.3f}"
        )
    if lat_rows:
        parts += ["", f"CPU latency, median of {x['latency_repeats']} runs, {x['threads']} thread(s):", "",
                  markdown_table(["runtime", "batch 1 (ms)", "batch 32 (ms)"], lat_rows)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ensemble", description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--experiment", help="a finished search under --results-root")
    where.add_argument("--train-members", action="store_true", help="train a stand-in search first (no Ray)")
    p.add_argument("--results-root", default="results")
    p.add_argument("--data", default=str(DEFAULT_SYNTHETIC_DIR), help="dataset for --train-members (made if absent)")
    p.add_argument("--work", default="/tmp/covid-ray-ensemble-bench", help="where --train-members writes")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime intra-op threads")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--no-write", action="store_true", help="print the section without writing BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache_dir = None
    if args.train_members:
        work = Path(args.work)
        cache_dir = work / "cache"
        data = ensure_synthetic(args.data) if args.data == str(DEFAULT_SYNTHETIC_DIR) else Path(args.data)
        folder = make_search(Path(data), work, image_size=args.image_size, cache_dir=cache_dir)
        command = "python -m benchmarks.ensemble --train-members"
    else:
        folder = Path(args.results_root) / args.experiment
        command = f"python -m benchmarks.ensemble --experiment {args.experiment} --top {args.top}"
    results = run_builds(folder, top=args.top, cache_dir=cache_dir, repeats=args.latency_repeats)
    (folder / ENSEMBLE_DIRNAME / "benchmark_ensemble.json").write_text(json.dumps(results, indent=2) + "\n")
    body = render(results, command)
    print(f"## {HEADING}\n\n{body}")
    if not args.no_write:
        print(f"\nwrote {write_section(HEADING, body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
