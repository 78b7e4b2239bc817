"""Leak-free stratified train/val/test split, made by duplicate group.

The COVID-19 Radiography Database gathers images from several public sources and
holds exact and near-duplicate copies of the same radiograph. A copy in train and
another in test inflates every test number, so files are grouped first (same sha1, or
perceptual hashes within a small Hamming distance) and whole groups are assigned to
one split. Per class, each split's size is the exact share rounded by largest
remainder, so it is within one image of exact wherever grouping allows.
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from covid_ray.artifacts.experiment import DATA_REPORT_FILE
from covid_ray.data.scan import ImageRecord, ScanResult, order_classes

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.1, 0.2)

# Largest Hamming distance between 256-bit pHashes still called a near-duplicate.
# Measured on synthetic radiographs (96-299 px): a copy brightened 5%, resized by 10%
# and re-encoded as JPEG (quality 85) lands within 10 bits, while the closest pair of
# 1,770 distinct Normal images is 48 bits apart (median ~110). 18 sits between the two
# with margin on both sides; tests/test_split.py checks each side.
NEAR_DUPLICATE_BITS = 18

MANIFEST_COLUMNS = ["path", "label", "split", "mask", "sha1", "phash", "group"]


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parse ``"0.7,0.1,0.2"``; the three ratios must be non-negative and sum to 1."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--ratios must be three numbers like 0.7,0.1,0.2, got {text!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"--ratios must be three non-negative numbers summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _hash_bits(hex_hashes: list[str]) -> np.ndarray:
    """Pack hex pHashes into uint64 words, shape (N, words)."""
    nbytes = len(hex_hashes[0]) // 2
    raw = np.frombuffer(b"".join(bytes.fromhex(h) for h in hex_hashes), dtype=np.uint8)
    raw = raw.reshape(len(hex_hashes), nbytes)
    pad = (-nbytes) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(hex_hashes), pad), np.uint8)], axis=1)
    return raw.view(np.uint64)


def near_duplicate_pairs(hex_hashes: list[str], max_bits: int, chunk: int = 512) -> list[tuple[int, int]]:
    """All pairs (i < j) whose hashes differ in at most ``max_bits`` bits.

    Exhaustive and chunked: 21k hashes x 21k is ~0.45G word popcounts, a few seconds.
    """
    if len(hex_hashes) < 2 or max_bits < 0:
        return []
    bits = _hash_bits(hex_hashes)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(bits), chunk):
        block = bits[start : start + chunk]
        dist = np.zeros((len(block), len(bits)), dtype=np.int32)
        for w in range(bits.shape[1]):
            dist += np.bitwise_count(block[:, w : w + 1] ^ bits[None, :, w]).astype(np.int32)
        ii, jj = np.nonzero(dist <= max_bits)
        ii = ii + start
        keep = ii < jj
        pairs.extend(zip(ii[keep].tolist(), jj[keep].tolist()))
    return pairs


def group_duplicates(records: list[ImageRecord], max_bits: int = NEAR_DUPLICATE_BITS) -> list[int]:
    """Group id per record: connected components of "same sha1 or near pHash".

    Group ids are numbered in order of each group's first record, so they are
    deterministic for a deterministic record order.
    """
    uf = _UnionFind(len(records))
    first_by_sha: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.sha1 in first_by_sha:
            uf.union(first_by_sha[r.sha1], i)
        else:
            first_by_sha[r.sha1] = i
    for i, j in near_duplicate_pairs([r.phash for r in records], max_bits):
        uf.union(i, j)
    ids: dict[int, int] = {}
    return [ids.setdefault(uf.find(i), len(ids)) for i in range(len(records))]


def split_targets(n: int, ratios: tuple[float, ...]) -> list[int]:
    """Integer sizes summing to ``n``, each within one of ``n * ratio`` (largest remainder)."""
    exact = [n * r for r in ratios]
    sizes = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(ratios)), key=lambda k: (-(exact[k] - sizes[k]), k))
    for k in order[: n - sum(sizes)]:
        sizes[k] += 1
    return sizes


def assign_splits(
    labels: list[str], groups: list[int], ratios: tuple[float, ...], seed: int
) -> list[str]:
    """Split name per item; every group lands in one split.

    Per class (a group counts for its majority label), groups are taken largest first,
    ties in a seeded random order, and each goes to the split furthest below its target.
    Singletons come last and fill the targets exactly.
    """
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    group_label = {
        g: sorted(Counter(labels[i] for i in idx).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        for g, idx in members.items()
    }
    by_class: dict[str, list[int]] = defaultdict(list)
    for g in sorted(members):
        by_class[group_label[g]].append(g)

    out = [""] * len(labels)
    for label in sorted(by_class):
        gids = by_class[label]
        n = sum(len(members[g]) for g in gids)
        targets = split_targets(n, ratios)
        filled = [0] * len(ratios)
        shuffled = [gids[k] for k in rng.permutation(len(gids))]
        for g in sorted(shuffled, key=lambda g: -len(members[g])):  # stable: ties keep shuffle order
            deficit = [targets[k] - filled[k] for k in range(len(ratios))]
            k = int(np.argmax(deficit))
            filled[k] += len(members[g])
            for i in members[g]:
                out[i] = SPLITS[k]
    return out


def make_manifest(
    scan: ScanResult,
    *,
    seed: int = 42,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS,
) -> tuple[pd.DataFrame, dict]:
    """Group duplicates and split. Returns the manifest and the grouping summary."""
    records = sorted(scan.records, key=lambda r: r.path)
    groups = group_duplicates(records, near_duplicate_bits)
    splits = assign_splits([r.label for r in records], groups, ratios, seed)
    df = pd.DataFrame(
        {
            "path": [r.path for r in records],
            "label": [r.label for r in records],
            "split": splits,
            "mask": [r.mask for r in records],
            "sha1": [r.sha1 for r in records],
            "phash": [r.phash for r in records],
            "group": groups,
        },
        columns=MANIFEST_COLUMNS,
    )
    sizes = Counter(groups)
    sha_counts = Counter(r.sha1 for r in records)
    multi = [g for g, n in sizes.items() if n > 1]
    mixed = [
        sorted(df.loc[df.group == g, "path"].tolist())
        for g in multi
        if df.loc[df.group == g, "label"].nunique() > 1
    ]
    summary = {
        "duplicate_groups": len(multi),
        "files_in_duplicate_groups": int(sum(sizes[g] for g in multi)),
        "exact_duplicate_files": int(sum(n for n in sha_counts.values() if n > 1)),
        "near_duplicate_bits": near_duplicate_bits,
        "groups_spanning_classes": mixed,
    }
    return df, summary


def split_counts(df: pd.DataFrame, classes: list[str]) -> dict[str, dict[str, int]]:
    table = df.groupby(["label", "split"]).size()
    return {c: {s: int(table.get((c, s), 0)) for s in SPLITS} for c in classes}


def write_manifest(df: pd.DataFrame, out: str | Path) -> Path:
    """Write the manifest CSV; byte-identical for identical frames."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    df.to_csv(tmp, index=False, lineterminator="\n")
    tmp.replace(out)
    return out


def manifest_classes(manifest: pd.DataFrame) -> list[str]:
    """The class names of a manifest in output order (the Kaggle order for the Kaggle classes)."""
    return order_classes(sorted(set(manifest["label"])))


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`; checks its columns.

    ``path`` may be a storage URI (``s3://…``): the trials' workers of a search whose
    ``--storage-path`` is a URI read it from there.
    """
    from covid_ray.uri import is_file, is_uri, open_input

    remote = is_uri(path)
    path = str(path) if remote else Path(path)
    if not (is_file(path) if remote else path.is_file()):
        raise FileNotFoundError(f"split manifest not found: {path}")
    with open_input(path) if remote else open(path, "rb") as f:
        df = pd.read_csv(f, dtype={"mask": str, "sha1": str, "phash": str}, keep_default_na=False)
    missing = [c for c in ("path", "label", "split", "sha1") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a covid-ray split manifest, missing columns {missing}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"{path}: unknown split names {bad}, expected {list(SPLITS)}")
    return df


def build_report(scan: ScanResult, df: pd.DataFrame, summary: dict, *, seed: int, ratios) -> dict:
    return {
        "dataset": str(scan.root),
        "layout": scan.layout,
        "synthetic": scan.synthetic,
        "classes": scan.classes,
        "seed": seed,
        "ratios": dict(zip(SPLITS, ratios)),
        "images_used": int(len(df)),
        "counts": split_counts(df, scan.classes),
        "grouping": summary,
        "excluded": sorted(scan.excluded, key=lambda e: e["path"]),
        "odd": sorted(scan.odd, key=lambda e: e["path"]),
    }


def write_report(report: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / DATA_REPORT_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def summary_line(report: dict) -> str:
    """The one-line terminal summary of a scan and split."""
    counts = report["counts"]
    per_split = {s: sum(c[s] for c in counts.values()) for s in SPLITS}
    tag = " [synthetic]" if report["synthetic"] else ""
    return (
        f"{report['images_used']} images in {len(counts)} classes{tag}: "
        f"train {per_split['train']}, val {per_split['val']}, test {per_split['test']}; "
        f"{len(report['excluded'])} excluded, {len(report['odd'])} odd, "
        f"{report['grouping']['duplicate_groups']} duplicate groups "
        f"({report['grouping']['files_in_duplicate_groups']} files)"
    )
