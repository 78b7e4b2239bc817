"""Shared pieces of the benchmarks: the synthetic data set, medians, Markdown output."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
# Under the git-ignored /data/; generated once (about 30 s on 2 cores) and reused.
BENCH_DATA = REPO / "data" / "bench_synth"
BENCH_PER_CLASS = 500  # 4 classes x 500 = the 2,000 images issue 2 asks for
BENCH_SEED = 0

MD_HEADER = (
    "# Benchmarks\n\n"
    "Each section is written by the script named in it; re-running a script replaces only\n"
    "its own section. All numbers come from synthetic images (`covid_ray.data.synth`).\n"
)


def last_json(stdout: str):
    """The last line of ``stdout`` that is a JSON object or list.

    A child process connected to Ray may print the cluster's log lines (for example
    "raylet has lagging heartbeats") after its own result, so "the last line" is not enough.
    """
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line[:1] in "{[" and line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON line in the output:\n{stdout[-2000:]}")


def fresh_interpreter_seconds(step: str, *, before: str = "", repeats: int = 1,
                              watch: tuple[str, ...] = ()) -> dict:
    """Seconds ``step`` takes in a new interpreter (after ``before``, untimed), as a new Ray worker pays it.

    Runs in the repository, so covid_ray imports. Returns ``{"s": median over repeats}``
    and, for each module in ``watch``, whether ``step`` imported it.
    """
    code = (
        f"import sys, time, json\n{before}\nseen = set(sys.modules)\nt = time.perf_counter()\n{step}\n"
        "s = time.perf_counter() - t\nnew = set(sys.modules) - seen\n"
        f"print(json.dumps({{'s': s, **{{m: m in new for m in {list(watch)!r}}}}}))"
    )
    runs = [last_json(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                                     check=True).stdout) for _ in range(repeats)]
    return {**runs[-1], "s": statistics.median(r["s"] for r in runs)}


def ensure_bench_dataset(root: Path = BENCH_DATA) -> Path:
    """The 2,000-image synthetic data set (Kaggle layout, 299 px); generated if absent."""
    from covid_ray.data.synth import synthesize

    synthesize(root, per_class=BENCH_PER_CLASS, seed=BENCH_SEED)  # a no-op when already complete
    return root


def kaggle_images(root: Path) -> list[tuple[Path, str]]:
    """(path, class) of every ``<class>/images/*.png`` under ``root``, sorted by path."""
    out = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for png in sorted((cls_dir / "images").glob("*.png")):
            out.append((png, cls_dir.name))
    return out


def subset(items: list, n: int | None) -> list:
    """``n`` items spread evenly over ``items`` (all classes keep their share); all when None."""
    if n is None or n >= len(items):
        return list(items)
    if n < 1:
        raise ValueError(f"--images must be >= 1, got {n}")
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def manifest_for(root: Path, items: list[tuple[Path, str]], split: str = "train") -> pd.DataFrame:
    """A minimal manifest (``path``, ``label``, ``split``, ``sha1``) for the decode cache.

    The cache keys images by the sha1 of their bytes; a full scan and split (pHash,
    duplicate grouping) is not needed to benchmark loading.
    """
    rows = [
        {"path": str(p.relative_to(root)), "label": c, "split": split, "sha1": hashlib.sha1(p.read_bytes()).hexdigest()}
        for p, c in items
    ]
    return pd.DataFrame(rows, columns=["path", "label", "split", "sha1"])


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def machine_note() -> str:
    cpus = os.cpu_count()
    return (
        f"{cpus} CPU cores, no GPU, shared with other CPU-heavy jobs (absolute numbers are noisy; "
        f"ratios are measured in the same command); {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, torch {_torch_version()}"
    )


def _torch_version() -> str:
    import torch

    return torch.__version__


def today() -> str:
    return _dt.date.today().isoformat()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> Path:
    """Put ``## heading`` + ``body`` into ``path``, replacing that section if present.

    A section runs from its ``## `` heading to the next ``## `` heading (or the end), so
    the other benchmarks' sections are left as they are.
    """
    text = path.read_text() if path.is_file() else MD_HEADER
    block = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)
    return path
