"""From a dataset folder to a split manifest on disk: the steps every entry point shares.

``split_dataset`` scans, groups, splits and writes ``SPLIT.csv`` with
``data_report.json`` beside it. ``ensure_split`` reuses a manifest when one exists
(training and the search call it), and ``ensure_synthetic`` generates the embedded
synthetic default when no dataset is given.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from covid_ray.data.layout import SYNTHETIC_MARKER
from covid_ray.data.scan import DatasetNotFoundError, find_dataset_root, scan_dataset
from covid_ray.data.split import (
    DEFAULT_RATIOS,
    NEAR_DUPLICATE_BITS,
    build_report,
    make_manifest,
    summary_line,
    write_manifest,
    write_report,
)

logger = logging.getLogger(__name__)

# Where `make demo`, the tests' defaults and `covid_ray.tune` without --data put the
# synthetic dataset, relative to the working directory. 5% of the real counts
# (1,058 images) keeps the quick profile inside its time budget on 2 CPU cores.
DEFAULT_SYNTHETIC_DIR = Path("data") / "synthetic"
DEFAULT_SYNTHETIC_SCALE = 0.05


@dataclass
class SplitResult:
    manifest: Path
    report_path: Path
    report: dict
    summary: str
    usable: bool


def split_dataset(
    data: str | Path,
    out: str | Path,
    *,
    seed: int = 42,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    near_duplicate_bits: int | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> SplitResult:
    """Scan ``data``, split it and write the manifest and ``data_report.json``.

    When nothing usable remains the report is still written, no manifest is, and
    ``usable`` is False with a summary saying what was looked for and where.
    ``progress`` shows the scan's progress on stderr (see :mod:`covid_ray.progress`).
    """
    out = Path(out)
    bits = NEAR_DUPLICATE_BITS if near_duplicate_bits is None else near_duplicate_bits
    scan = scan_dataset(data, workers=workers, progress=progress)
    df, grouping = make_manifest(scan, seed=seed, ratios=ratios, near_duplicate_bits=bits)
    report = build_report(scan, df, grouping, seed=seed, ratios=ratios)
    out.parent.mkdir(parents=True, exist_ok=True)
    report_path = write_report(report, out.parent)
    if df.empty:
        summary = (
            f"no usable images in {scan.root}: looked for <class>/images/*.png (Kaggle layout) "
            f"or <class>/*.png|jpg (ImageFolder); {len(scan.excluded)} files excluded, see {report_path}"
        )
        return SplitResult(out, report_path, report, summary, usable=False)
    write_manifest(df, out)
    return SplitResult(out, report_path, report, summary_line(report), usable=True)


def default_split_path(data: str | Path, seed: int = 42, base: str | Path = "results") -> Path:
    """Where a folder's default split lives: ``results/splits/<name>-<hash>/split_seed<seed>.csv``.

    Keyed by the dataset's absolute path so two datasets never share a manifest, and
    kept out of the dataset folder, which may be read-only.
    """
    root = find_dataset_root(data).resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return Path(base) / "splits" / f"{root.name}-{digest}" / f"split_seed{seed}.csv"


def ensure_split(data: str | Path, split: str | Path | None = None, *, seed: int = 42, progress: bool = False) -> Path:
    """Return ``split`` if given (it must exist), else make or reuse the default split.

    ``progress``: show the scan's progress on stderr when a split has to be made.
    """
    if split is not None:
        split = Path(split)
        if not split.is_file():
            raise FileNotFoundError(f"split manifest not found: {split}")
        return split
    path = default_split_path(data, seed)
    if path.is_file():
        logger.info("reusing split %s", path)
        return path
    result = split_dataset(data, path, seed=seed, progress=progress)
    logger.info("%s", result.summary)
    if not result.usable:
        raise DatasetNotFoundError(result.summary)
    return path


def is_synthetic(data: str | Path) -> bool:
    return (find_dataset_root(data) / SYNTHETIC_MARKER).is_file()


def ensure_synthetic(
    out: str | Path = DEFAULT_SYNTHETIC_DIR, *, scale: float = DEFAULT_SYNTHETIC_SCALE, seed: int = 0,
    progress: bool = False,
) -> Path:
    """Generate the synthetic default dataset unless it is already there (``progress``: on stderr)."""
    from covid_ray.data.synth import synthesize

    out = Path(out)
    if not (out / SYNTHETIC_MARKER).is_file():
        logger.info("generating the synthetic dataset in %s (scale %.3g of the real counts)", out, scale)
    # A no-op when the folder already holds this exact dataset; regenerated when the
    # generator version or the parameters differ.
    synthesize(out, scale=scale, seed=seed, progress=progress)
    return out
