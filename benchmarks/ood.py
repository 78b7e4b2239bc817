"""OOD abstention benchmark: ``python -m benchmarks.ood --experiment demo``.

Builds the ensemble of a finished search (``ensemble.build``: the OOD score chosen on
validation vs proxies, its threshold fitted to accept 95% of the validation images,
exported in the graph) and reports, for the deployed graph: the acceptance of the
validation and test radiographs, and per OOD set (natural photographs, handwritten
digits, rendered text, uniform noise, test radiographs upside down) the AUROC and the
false-accept rate. For information, every candidate score is also measured on the same
sets with the members' torch outputs (the choice never sees them). Writes a section of
BENCHMARKS.md (``--no-write``: print only). All numbers on the synthetic data say so.

    python -m benchmarks.ood --experiment demo              # results/demo, as `make demo` leaves it
    python -m benchmarks.ood --train-members                # no search at hand: the stand-in of benchmarks.ensemble
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import machine_note, markdown_table, today, write_section
from covid_ray.artifacts.bundle import CACHE_DIRNAME
from covid_ray.artifacts.experiment import ENSEMBLE_DIRNAME, read_experiment
from covid_ray.data.split import read_manifest
from ensemble.abstain import candidate_benchmark, fit_ood
from ensemble.build import BuildOptions, build_ensemble
from ensemble.select import load_trial

HEADING = "OOD abstention: AUROC and false accepts per OOD set (`python -m benchmarks.ood`)"


def run(folder: Path, *, top: int, tta: str, cache_dir: Path | None, repeats: int) -> dict:
    """Build the ensemble, then score every candidate on the benchmark sets (cached member outputs).

    The build's prediction cache is cleared first, so its stage times include every forward pass.
    """
    shutil.rmtree(folder / ENSEMBLE_DIRNAME / CACHE_DIRNAME, ignore_errors=True)
    t0 = time.perf_counter()
    result = build_ensemble(folder, BuildOptions(top=top, tta=tta, latency_repeats=repeats,
                                                 data_cache_dir=str(cache_dir) if cache_dir else None))
    build_s = time.perf_counter() - t0
    m = result.metrics
    if (m.get("ood") or {}).get("status") != "ok":
        raise SystemExit(f"the build has no OOD section: {m.get('ood')}")
    experiment = read_experiment(folder)
    manifest = read_manifest(experiment.split)
    weights = [r["weight"] for r in m["members"]]
    members = [load_trial({"trial_id": r["trial_id"], "checkpoint": r["checkpoint"]}, 0.0, experiment.classes)
               for r in m["members"]]
    cache = result.out_dir / CACHE_DIRNAME
    data_cache = str(cache_dir) if cache_dir else None
    fit = fit_ood(members, weights, m["calibration"]["temperature"], experiment, manifest, cache_dir=cache,
                  data_cache_dir=data_cache)
    m["ood"]["candidates_benchmark"] = candidate_benchmark(fit, experiment, manifest, cache_dir=cache,
                                                           data_cache_dir=data_cache)
    m["build_s"] = build_s
    return m


def render(m: dict, command: str) -> str:
    o = m["ood"]
    tag = " (**synthetic**)" if m["synthetic"] else ""
    t = o["targets"]
    rows = [[name, str(r["images"]), f"{r['auroc']:.4f}", f"{100 * r['false_accept_rate']:.1f}%",
             "yes" if o["targets_met"]["auroc"][name] else "**no**"] for name, r in o["benchmark"].items()]
    cands = o["candidates_benchmark"]
    cand_rows = [[c + (" (chosen)" if c == o["score"] else ""), f"{o['candidates'][c]['mean']:.4f}",
                  f"{100 * cands[c]['test_accept_rate']:.1f}%"]
                 + [f"{cands[c]['benchmark'][n]['auroc']:.4f}" for n in o["benchmark"]] for c in cands]
    missed = [n for n, ok in o["targets_met"]["auroc"].items() if not ok]
    verdict = [f"AUROC target (>= {t['auroc_min']}) missed for: {', '.join(missed)}." if missed
               else f"AUROC >= {t['auroc_min']} on every set."]
    accept_ok = o["targets_met"]["test_accept"]
    lo, hi = o["test_accept_ci95"]
    verdict.append(f"Test acceptance {100 * o['test_accept_rate']:.1f}% (binomial 95% CI {100 * lo:.1f}-{100 * hi:.1f}%; "
                   f"target {100 * t['test_accept'][0]:.0f}-"
                   f"{100 * t['test_accept'][1]:.0f}%): {'met' if accept_ok else '**missed**'}"
                   + ("" if accept_ok else f"; the threshold is a quantile of only {o['val_images']} validation "
                      f"scores and the test split has {o['test_images']} images, so a few images move it by points")
                   + ".")
    tta = []
    if m["tta"].get("enabled") and "test" in m["tta"]:
        w, wo = m["tta"]["test"]["with"], m["tta"]["test"]["without"]
        tta = ["", f"TTA ({', '.join(m['tta']['views'])}), test split, same members and weights, each with its own "
               "temperature:", "",
               markdown_table(["", "macro-F1", "accuracy", "ECE", "NLL"],
                              [[name, *(f"{x[k]:.4f}" for k in ("macro_f1", "accuracy", "ece", "nll"))]
                               for name, x in (("without TTA", wo), ("with TTA", w))])]
    return "\n".join([
        f"Command: `{command}` &nbsp; Date: {today()}",
        f"Machine: {machine_note()}; torch intra-op threads: {torch.get_num_threads()}.",
        "",
        f"Dataset `{Path(m['dataset']).name}`{tag}: {m['test_images']} test radiographs, {m['val_images']} validation; "
        f"ensemble of {sum(1 for r in m['members'] if r['weight'] > 0)} members "
        f"(TTA: {', '.join(m['tta']['views']) if m['tta'].get('enabled') else 'none'}). OOD score "
        f"**{o['score']}** chosen on validation vs proxies ({', '.join(o['proxies'])}); threshold "
        f"{o['threshold']:.4g} fitted on the validation scores of `{o['runtime']}` "
        f"(accepts {100 * o['val_accept_rate']:.1f}% of them).",
        "",
        f"Deployed graph `{o['runtime']}`{tag}:",
        "",
        markdown_table(["OOD set", "images", "AUROC", "false-accept rate", f"AUROC >= {t['auroc_min']}"], rows),
        "",
        *[f"- {v}" for v in verdict],
        "",
        "Every candidate (members' torch outputs, each with its own 95% validation threshold; for information, "
        "the choice used only the proxies):",
        "",
        markdown_table(["score", "proxy mean AUROC", "test acceptance", *[f"{n} AUROC" for n in o["benchmark"]]],
                       cand_rows),
        "",
        f"OOD stage wall time in the build: fit {o.get('fit_seconds')} s, threshold and benchmark "
        f"{o.get('seconds')} s (whole build {m['build_s']:.0f} s).",
        *tta,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--experiment", help="a finished search under --results-root")
    where.add_argument("--train-members", action="store_true", help="train benchmarks.ensemble's stand-in search first")
    p.add_argument("--results-root", default="results")
    p.add_argument("--work", default="/tmp/covid-ray-ensemble-bench", help="where --train-members writes")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--tta", default="", help="views for the build, e.g. flip,rot5 (default none)")
    p.add_argument("--cache-dir", default=None, help="image decode cache (default: the search's, else covid_ray's)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime intra-op threads")
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print the section without writing BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    if args.train_members:
        from benchmarks.ensemble import make_search
        from covid_ray.data.prepare import DEFAULT_SYNTHETIC_DIR, ensure_synthetic

        work = Path(args.work)
        cache_dir = cache_dir or work / "cache"
        folder = make_search(Path(ensure_synthetic(DEFAULT_SYNTHETIC_DIR)), work, image_size=64, cache_dir=cache_dir)
        command = "python -m benchmarks.ood --train-members"
    else:
        folder = Path(args.results_root) / args.experiment
        command = f"python -m benchmarks.ood --experiment {args.experiment}"
    command += f" --tta {args.tta}" if args.tta else ""
    m = run(folder, top=args.top, tta=args.tta, cache_dir=cache_dir, repeats=args.latency_repeats)
    (folder / ENSEMBLE_DIRNAME / "benchmark_ood.json").write_text(json.dumps(m["ood"], indent=2, default=float) + "\n")
    body = render(m, command)
    print(f"## {HEADING}\n\n{body}")
    if not args.no_write:
        print(f"\nwrote {write_section(HEADING, body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
