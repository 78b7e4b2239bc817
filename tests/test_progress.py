"""Progress of the long steps: the policy (who shows it, where, how often), the plain-line
format for logs, the chunked pool map, and the data CLI / generator / cache build reporting."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from covid_ray.progress import LineProgress, NoProgress, map_in_chunks, progress_bar
from helpers import make_kaggle

# "scan:  42% 890/2116 [00:05<00:07, 178.0 file/s]" (ETA and rate are "?" before any rate is known)
LINE = re.compile(r"^(?P<desc>[\w ]+): +(?P<pct>\d+)% (?P<n>\d+)/(?P<total>\d+) "
                  r"\[\d\d:\d\d<(?:\d\d:\d\d|\?), (?:\d+\.\d|\?) (?P<unit>\w+)/s\]$")
ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _square(x: int) -> int:
    return x * x


def _fail_on_7(x: int) -> int:
    if x == 7:
        raise ValueError("item 7 is bad")
    return x


def test_plain_lines_are_rate_bounded_with_count_rate_and_eta():
    clock, stream = FakeClock(), io.StringIO()
    bar = LineProgress(1000, "scan", unit="file", stream=stream, interval=5.0, clock=clock)
    for _ in range(1000):  # 1,000 items at 64 a second (1/64 s is exact in binary)
        clock.t += 1 / 64
        bar.update(1)
    bar.close()
    bar.close()  # idempotent
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4  # at 5, 10, 15 s, then the final one (15.6 s); not one per update
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m["n"]) for m in matches] == [320, 640, 960, 1000]
    assert lines[0] == "scan:  32% 320/1000 [00:05<00:10, 64.0 file/s]"  # 680 left at 64/s: 10.6 s
    assert lines[-1] == "scan: 100% 1000/1000 [00:15<00:00, 64.0 file/s]"


def test_policy_callers_decide_env_overrides(monkeypatch, caplog):
    stream = io.StringIO()
    monkeypatch.delenv("COVID_RAY_PROGRESS", raising=False)
    assert isinstance(progress_bar(10, "x", stream=stream), NoProgress)  # library default: off
    assert isinstance(progress_bar(10, "x", enabled=True, stream=stream), LineProgress)  # not a TTY: lines
    monkeypatch.setenv("COVID_RAY_PROGRESS", "0")
    assert isinstance(progress_bar(10, "x", enabled=True, stream=stream), NoProgress)  # silences CLIs
    monkeypatch.setenv("COVID_RAY_PROGRESS", "1")
    assert isinstance(progress_bar(10, "x", enabled=False, stream=stream), LineProgress)  # turns library calls on
    monkeypatch.setenv("COVID_RAY_PROGRESS", "sometimes")
    with caplog.at_level("WARNING"):
        assert isinstance(progress_bar(10, "x", enabled=True, stream=stream), LineProgress)
    assert any("COVID_RAY_PROGRESS" in r.getMessage() and "sometimes" in r.getMessage() for r in caplog.records)
    assert stream.getvalue() == ""  # nothing written until there is progress


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("COVID_RAY_PROGRESS", raising=False)
    term = Terminal()
    with progress_bar(5, "synthetic images", unit="img", enabled=True, stream=term) as bar:
        assert isinstance(bar, tqdm)
        bar.update(5)
    assert "synthetic images" in term.getvalue() and "5/5" in term.getvalue() and "\r" in term.getvalue()


def test_map_in_chunks_yields_every_chunk_once_with_its_offset():
    items = list(range(53))
    got: list = [None] * len(items)
    with ProcessPoolExecutor(2) as pool:
        chunks = list(map_in_chunks(pool, _square, items, 8))
    assert sorted(start for start, _ in chunks) == list(range(0, 53, 8))
    for start, part in chunks:
        got[start : start + len(part)] = part
    assert got == [x * x for x in items]
    with ProcessPoolExecutor(2) as pool, pytest.raises(ValueError, match="item 7 is bad"):
        list(map_in_chunks(pool, _fail_on_7, items, 4))


def _run_split(root: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COVID_RAY_PROGRESS")}
    environ.update(env)
    cmd = [sys.executable, "-m", "covid_ray.data", "split", "--data", str(root), "--out", str(out), "--workers", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=ROOT, timeout=120)


def test_split_cli_reports_progress_on_stderr_as_plain_lines(tmp_path):
    root = make_kaggle(tmp_path / "ds", {"COVID": 40, "Normal": 40}, size=32)  # 160 files: the pool path
    out = tmp_path / "out" / "split.csv"
    # Interval 0: a line per completed chunk, so the lines show the pool's progress as it happens.
    shown = _run_split(root, out, COVID_RAY_PROGRESS_INTERVAL="0")
    assert shown.returncode == 0, shown.stderr
    assert "\r" not in shown.stderr and "\x1b" not in shown.stderr
    lines = [line for line in shown.stderr.splitlines() if line.startswith("scan:")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    counts = [int(m["n"]) for m in matches]
    assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] == 160  # 80 images + 80 masks
    assert all(m["total"] == "160" and m["unit"] == "file" for m in matches)
    assert not any("scan:" in line for line in shown.stdout.splitlines())

    # The default interval (5 s): a run of a few seconds prints its final line and at most one more.
    default = _run_split(root, out)
    progress_lines = [line for line in default.stderr.splitlines() if line.startswith("scan:")]
    assert 1 <= len(progress_lines) <= 2 and progress_lines[-1].startswith("scan: 100% 160/160 [")

    quiet = _run_split(root, out, COVID_RAY_PROGRESS="0")
    assert quiet.returncode == 0 and not any(line.startswith("scan:") for line in quiet.stderr.splitlines())
    assert quiet.stdout == shown.stdout == default.stdout  # the summary on stdout is unchanged
    assert quiet.stdout.startswith("80 images in 2 classes")


def test_generator_reports_progress_when_asked(tmp_path, capsys, monkeypatch):
    from covid_ray.data.synth import synthesize

    monkeypatch.delenv("COVID_RAY_PROGRESS", raising=False)
    synthesize(tmp_path / "a", per_class=2, size=48, mask_size=48, workers=1)
    assert capsys.readouterr().err == ""  # library default: silent
    synthesize(tmp_path / "b", per_class=2, size=48, mask_size=48, workers=1, progress=True)
    err = capsys.readouterr().err
    assert LINE.match(err.splitlines()[-1]) and err.splitlines()[-1].startswith("synthetic images: 100% 8/8 [")


def test_cache_build_reports_progress_and_the_pool_fills_every_row(tmp_path, capsys, monkeypatch):
    from covid_ray.data.cache import build_cache
    from covid_ray.data.prepare import split_dataset
    from covid_ray.data.split import read_manifest

    monkeypatch.delenv("COVID_RAY_PROGRESS", raising=False)
    root = make_kaggle(tmp_path / "ds", {"COVID": 130, "Normal": 130}, size=24, masks=False)  # >= 256: the pool
    split_dataset(root, tmp_path / "s.csv", workers=1)
    df = read_manifest(tmp_path / "s.csv")
    capsys.readouterr()
    pooled = build_cache(root, df, 16, cache_dir=tmp_path / "pool", workers=2, progress=True)
    last = capsys.readouterr().err.splitlines()[-1]
    assert LINE.match(last) and last.startswith("decode cache 16px: 100% 260/260 [") and "img/s" in last
    serial = build_cache(root, df, 16, cache_dir=tmp_path / "serial", workers=1)
    assert capsys.readouterr().err == ""
    assert pooled.index == serial.index and np.array_equal(np.asarray(pooled.array), np.asarray(serial.array))
