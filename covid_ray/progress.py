"""Progress for the long steps (scan, decode cache, synthetic generator, member predictions).

On the full database these steps run for minutes: decoding and hashing 21,165 files,
decoding them again per working resolution, drawing a synthetic set, predicting with
every ensemble member. :func:`progress_bar` shows a count, a rate and an ETA, always on
**stderr**, so stdout keeps only the results a CLI prints (and stays pipeable).

Who decides whether there is a bar:

* **CLIs turn it on; library functions take ``progress: bool = False``.** The same
  functions run in bulk in the tests, inside Ray trial workers (whose stderr is a log
  multiplexed with seven others) and from scripts that own their terminal. Only the
  caller knows whether a person is watching, so the default is silence and each CLI
  (``python -m covid_ray.data``, ``python -m ensemble.build``) passes ``progress=True``.
  Deciding by TTY alone would draw bars from library calls in a notebook or a Ray
  driver that never asked for them, and print lines into every captured test log.
* ``COVID_RAY_PROGRESS`` overrides both ways: ``0`` (or ``false``/``off``/``no``)
  silences the CLIs too, ``1`` (or ``true``/``on``/``yes``) turns progress on in library
  calls as well.
* **Where it goes:** a tqdm bar when stderr is a terminal. Otherwise (CI, ``| tee``,
  a redirected log) plain lines with no carriage returns and no escape codes, at most one
  every ``COVID_RAY_PROGRESS_INTERVAL`` seconds (default 5) plus the final one, so a
  20-minute step adds a few hundred short lines to a log, not a megabyte of redraws.

Work done in a process pool reports as it completes: :func:`map_in_chunks` submits the
items in chunks and yields each chunk's results as soon as it is done, so a bar moves
with the pool rather than with the slowest chunk in front of it.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, as_completed
from typing import Any, Protocol, TextIO

from tqdm import tqdm

logger = logging.getLogger(__name__)

ENV = "COVID_RAY_PROGRESS"
INTERVAL_ENV = "COVID_RAY_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0
_ON = {"1", "true", "on", "yes"}
_OFF = {"0", "false", "off", "no"}


class Progress(Protocol):
    """What callers use of a bar: tqdm's ``update``/``close`` and the context manager."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Progress": ...

    def __exit__(self, *exc: object) -> Any: ...


class NoProgress:
    """The bar when progress is off: does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class LineProgress:
    """Plain progress lines for a stream that is not a terminal.

    ``desc: 42% 890/2116 [00:05<00:07, 178.0 img/s]`` at most every ``interval``
    seconds, and once more on :meth:`close` (with the count reached, also after an error).
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", stream: TextIO, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.stream, self.interval = total, desc, unit, stream, interval
        self.clock = clock
        self.n = 0
        self.start = self.last = clock()
        self.closed = False

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 0.0)
        rate = self.n / elapsed if elapsed > 0 else 0.0
        remaining = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
        pct = f"{100 * self.n / self.total:3.0f}% " if self.total else ""
        rate_text = f"{rate:.1f}" if rate > 0 else "?"
        return (f"{self.desc}: {pct}{self.n}/{self.total} "
                f"[{tqdm.format_interval(elapsed)}<{remaining}, {rate_text} {self.unit}/s]")

    def _write(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self.last = now

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval and self.n < self.total:
            self._write(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(self.clock())

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _env_choice() -> bool | None:
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value in _ON:
        return True
    if value in _OFF:
        return False
    logger.warning("ignoring %s=%r: expected 0/1 (or false/true, off/on, no/yes)", ENV, os.environ[ENV])
    return None


def progress_enabled(requested: bool) -> bool:
    """``requested`` (the caller's choice) unless ``COVID_RAY_PROGRESS`` says otherwise."""
    choice = _env_choice()
    return requested if choice is None else choice


def line_interval() -> float:
    """Seconds between plain progress lines (``COVID_RAY_PROGRESS_INTERVAL``, default 5)."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        logger.warning("ignoring %s=%r: expected a non-negative number of seconds", INTERVAL_ENV, text)
        return DEFAULT_INTERVAL
    return value


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


def progress_bar(total: int, desc: str, *, unit: str = "it", enabled: bool = False,
                 stream: TextIO | None = None) -> Progress:
    """A bar for ``total`` items on stderr, or a no-op (see the module docstring for the policy).

    Args:
        total: items the step will process.
        desc: what is being done, shown first (``scan``, ``decode cache 256px``).
        unit: the items' unit, short (``img``, ``file``).
        enabled: the caller's choice: True in CLIs, a library function's ``progress`` flag.
        stream: where to write (default: ``sys.stderr`` at call time).
    """
    if not progress_enabled(enabled):
        return NoProgress()
    stream = stream if stream is not None else sys.stderr
    if _is_tty(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=True)
    return LineProgress(total, desc, unit=unit, stream=stream, interval=line_interval())


def _run_chunk(fn: Callable[[Any], Any], chunk: Sequence[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def map_in_chunks(pool: Executor, fn: Callable[[Any], Any], items: Sequence[Any],
                  chunksize: int) -> Iterator[tuple[int, list[Any]]]:
    """``fn`` over ``items`` in ``pool``; yields ``(offset, results)`` per chunk as each completes.

    Chunks finish in any order; ``offset`` is the index of the chunk's first item, so
    callers put results back in item order. ``fn`` must be picklable (a module-level
    function, or a ``functools.partial`` of one). An exception in a chunk is raised here
    and the chunks not yet started are cancelled.
    """
    chunksize = max(1, chunksize)
    futures = {pool.submit(_run_chunk, fn, items[i : i + chunksize]): i for i in range(0, len(items), chunksize)}
    try:
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        for future in futures:
            future.cancel()
