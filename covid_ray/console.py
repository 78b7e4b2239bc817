"""What a person sees while a search runs: one progress line, one line per trial event, nothing else.

Ray Tune's own console output is a boxed table of every metric of every trial at every
report, and Ray's processes add their own log lines (core worker errors, raylet warnings,
each worker's prints). :class:`SearchConsole` is a Tune callback that prints instead:

* a line per trial event: started (its arm and key parameters), each epoch (the metric,
  the trial's best so far), and the end (finished, stopped by ASHA, early-stopped or
  failed, with the best value);
* one progress line: trials finished, running, stopped by ASHA and failed, out of N; the
  best ``best_<metric>`` so far and the trial that holds it; elapsed time and an ETA.
  On a terminal it is redrawn in place; when stdout is not a terminal (CI, ``tee``) it is
  printed as a plain line after each finished trial, with no escape codes and no carriage
  returns.

:func:`capture_output` sends everything else written to file descriptors 1 and 2 of this
process -- Tune, Ray's C++ core, the workers' output that Ray forwards to the driver -- to
a log file in the experiment folder (kept, not lost), and hands back a stream on the real
terminal for the console and for this project's own warnings. ``--verbose`` skips both
and brings back Tune's tables.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ray.tune import Callback

from covid_ray.searcher import FIDELITY_ATTR, RECIPE, WARM_START, stopped_by_scheduler, trial_arm

# The stream the console writes to; set by capture_output. Callbacks are pickled with
# the Tuner's state, so they hold no stream of their own and look it up here.
_CONSOLE: TextIO | None = None
KEY_PARAMS = ("model", "pretrained", "lr", "batch_size", "class_weights", "weight_decay")


def console() -> TextIO:
    return _CONSOLE if _CONSOLE is not None else sys.stdout


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class SearchConsole(Callback):
    """Trial events and a progress line for a search of ``total`` trials (see the module docstring)."""

    def __init__(self, *, total: int, metric: str, full_fidelity: int, max_epochs: int, concurrency: int):
        self.total, self.metric = int(total), metric
        self.full_fidelity, self.max_epochs, self.concurrency = int(full_fidelity), int(max_epochs), int(concurrency)
        self.started_at = time.time()
        self.ends: dict[str, str] = {}  # trial_id -> finished | stopped | early | failed
        self.best: dict[str, float] = {}
        self.durations: list[float] = []
        self.trial_start: dict[str, float] = {}
        self.running: set[str] = set()
        self._last_draw = 0.0
        self._drawn = False

    # -- output

    @property
    def tty(self) -> bool:
        stream = console()
        return bool(getattr(stream, "isatty", lambda: False)())

    def _emit(self, line: str) -> None:
        stream = console()
        if self.tty and self._drawn:
            stream.write("\r\033[K")  # clear the progress line before printing above it
            self._drawn = False
        stream.write(line + "\n")
        stream.flush()

    def progress_line(self) -> str:
        counts = {k: sum(1 for v in self.ends.values() if v == k) for k in ("finished", "stopped", "early", "failed")}
        done = len(self.ends)
        line = (f"[{done}/{self.total} done: {counts['finished'] + counts['early']} finished, "
                f"{counts['stopped']} stopped by ASHA, {counts['failed']} failed; {len(self.running)} running]")
        if self.best:
            tid = max(self.best, key=self.best.get)
            line += f" best {self.metric.removeprefix('best_')} {self.best[tid]:.4f} ({tid})"
        elapsed = time.time() - self.started_at
        line += f" | {_clock(elapsed)} elapsed"
        if self.durations and done < self.total:
            left = self.total - done
            mean = sum(self.durations) / len(self.durations)
            line += f", ETA ~{_clock(mean * left / max(1, min(self.concurrency, left)))}"
        return line

    def _draw(self, force: bool = False) -> None:
        now = time.time()
        if not self.tty or (not force and now - self._last_draw < 1.0):
            return
        stream = console()
        stream.write("\r\033[K" + self.progress_line())
        stream.flush()
        self._last_draw, self._drawn = now, True

    # -- Tune's hooks

    def on_trial_start(self, iteration, trials, trial, **info):
        self.trial_start[trial.trial_id] = time.time()
        self.running.add(trial.trial_id)
        config = trial.config
        params = ", ".join(f"{k} {_short(config[k])}" for k in KEY_PARAMS if k in config)
        arm = trial_arm(config)
        label = " (the hand recipe, the reference)" if arm == RECIPE else (" (warm start)" if arm == WARM_START else "")
        self._emit(f"trial {trial.trial_id} started{label}: {params}")
        self._draw(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value, best = result.get(self.metric.removeprefix("best_")), result.get(self.metric)
        if best is not None:
            self.best[trial.trial_id] = float(best)
        if FIDELITY_ATTR in result and value is not None:
            epochs = int(trial.config.get("epochs", self.max_epochs))
            self._emit(f"trial {trial.trial_id} epoch {int(result[FIDELITY_ATTR])}/{epochs} "
                       f"{self.metric.removeprefix('best_')} {float(value):.4f} (best {float(best):.4f})")
        self._draw(force=True)

    def _end(self, trial, kind: str, text: str) -> None:
        self.running.discard(trial.trial_id)
        self.ends[trial.trial_id] = kind
        if trial.trial_id in self.trial_start:
            self.durations.append(time.time() - self.trial_start.pop(trial.trial_id))
        self._emit(text)
        if self.tty:
            self._draw(force=True)
        else:
            self._emit(self.progress_line())

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        best = self.best.get(trial.trial_id)
        best_text = f"best {self.metric.removeprefix('best_')} {best:.4f}" if best is not None else "no result"
        epoch = int(result.get(FIDELITY_ATTR, 0))
        if self._stopped(trial, result):
            self._end(trial, "stopped", f"trial {trial.trial_id} stopped by ASHA after epoch {epoch}: {best_text}")
        elif result.get("early_stopped"):
            self._end(trial, "early", f"trial {trial.trial_id} early-stopped at epoch {epoch}: {best_text}")
        else:
            self._end(trial, "finished", f"trial {trial.trial_id} finished {epoch} epochs: {best_text}")

    def _stopped(self, trial, result: dict) -> bool:
        """Whether ASHA stopped ``trial``, whose last report was ``result``."""
        return FIDELITY_ATTR in result and stopped_by_scheduler(
            trial.config, int(result[FIDELITY_ATTR]), early_stopped=bool(result.get("early_stopped", False)),
            full_fidelity=self.full_fidelity)

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = ""
        error_file = Path(trial.local_path or "", "error.txt") if getattr(trial, "local_path", None) else None
        if error_file is not None and error_file.is_file():
            lines = [line for line in error_file.read_text(errors="replace").splitlines() if line.strip()]
            reason = f": {lines[-1][:300]}" if lines else ""
        self._end(trial, "failed", f"trial {trial.trial_id} FAILED{reason}")

    def setup(self, **info):
        self.started_at = time.time()  # also when a resumed search restores this callback

    def on_step_end(self, iteration, trials, **info):
        # A resumed search: trials that ended before the restart are counted, not announced.
        for trial in trials:
            if trial.trial_id in self.ends or trial.status not in ("TERMINATED", "ERROR"):
                continue
            if trial.status == "ERROR":
                self.ends[trial.trial_id] = "failed"
                continue
            result = trial.last_result or {}
            best = result.get(self.metric)
            if best is not None:
                self.best[trial.trial_id] = float(best)
            self.ends[trial.trial_id] = "stopped" if self._stopped(trial, result) else "finished"
        self._draw()

    def on_experiment_end(self, trials, **info):
        if self.tty and self._drawn:
            self._emit(self.progress_line())


class _ConsoleWarnings(logging.Handler):
    """This project's warnings and errors, on the console even while fds 1 and 2 go to the log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console().write(f"{record.levelname.lower()}: {record.getMessage()}\n")
            console().flush()
        except Exception:  # noqa: BLE001 - a console that went away must not break the search
            self.handleError(record)


@contextlib.contextmanager
def capture_output(log_file: Path, *, enabled: bool = True) -> Iterator[TextIO]:
    """Send file descriptors 1 and 2 to ``log_file``; yield a stream on the original stdout.

    Everything Ray and Tune write -- from Python or from C++ -- lands in the log; the
    console stream and this project's warnings (the ``covid_ray`` loggers) still reach the
    terminal. Restored on exit. ``enabled=False`` changes nothing and yields ``sys.stdout``.
    """
    global _CONSOLE
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    handler = _ConsoleWarnings(level=logging.WARNING)
    project = logging.getLogger("covid_ray")
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        _CONSOLE = terminal
        project.addHandler(handler)
        yield terminal
    finally:
        project.removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        _CONSOLE = None
        terminal.close()
