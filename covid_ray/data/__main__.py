"""Dataset CLI: ``python -m covid_ray.data {split,synth,cache} ...``.

Thin argparse wrappers over :mod:`covid_ray.data.scan`, :mod:`~covid_ray.data.split`,
:mod:`~covid_ray.data.synth` and :mod:`~covid_ray.data.cache`. Long steps show progress
on stderr (``COVID_RAY_PROGRESS=0`` turns it off; see :mod:`covid_ray.progress`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from covid_ray.data import prepare


def _split(args: argparse.Namespace) -> int:
    from covid_ray.data.split import parse_ratios

    try:
        ratios = parse_ratios(args.ratios)
        result = prepare.split_dataset(
            args.data,
            args.out,
            seed=args.seed,
            ratios=ratios,
            near_duplicate_bits=args.near_duplicate_bits,
            workers=args.workers,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary)
    print(f"manifest: {result.manifest}")
    print(f"report:   {result.report_path}")
    return 0 if result.usable else 1


def _synth(args: argparse.Namespace) -> int:
    from covid_ray.data.synth import synthesize

    try:
        counts = synthesize(
            args.out, per_class=args.per_class, scale=args.scale, size=args.size, seed=args.seed, workers=args.workers,
            progress=True,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(counts.values())
    print(f"synthetic dataset (Kaggle layout), {total} images: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"written to {args.out}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from covid_ray.data.cache import build_cache
    from covid_ray.data.scan import find_dataset_root
    from covid_ray.data.split import read_manifest

    try:
        df = read_manifest(args.split)
        store = build_cache(find_dataset_root(args.data), df, args.resize, cache_dir=args.cache_dir,
                            workers=args.workers, progress=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cache: {store.path} ({len(store)} images at {args.resize}x{args.resize})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m covid_ray.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="scan a dataset folder and write a leak-free train/val/test manifest")
    p.add_argument("--data", required=True, help="dataset root (Kaggle layout or ImageFolder)")
    p.add_argument("--out", required=True, type=Path, help="manifest CSV to write; data_report.json goes beside it")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ratios", default="0.7,0.1,0.2", help="train,val,test shares (default 0.7,0.1,0.2)")
    p.add_argument("--near-duplicate-bits", type=int, default=None, help="pHash Hamming distance for near-duplicates")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count)")
    p.set_defaults(func=_split)

    p = sub.add_parser("synth", help="write a synthetic dataset in the Kaggle layout")
    p.add_argument("--out", required=True, type=Path)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--per-class", type=int, default=None, help="images per class")
    size.add_argument("--scale", type=float, default=None, help="fraction of the real class counts")
    p.add_argument("--size", type=int, default=299, help="image side in pixels (masks are 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_synth)

    p = sub.add_parser("cache", help="decode a manifest's images once into the uint8 cache")
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--resize", type=int, default=256, help="working resolution (Resize before the crop)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
