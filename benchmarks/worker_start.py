"""Process start-up behind a trial's fixed cost: ``python -m benchmarks.worker_start``.

Every trial of a search starts two Ray actors on its critical path, each a new Python
process: Tune's trial driver (the function trainable), which also runs Ray Train's
controller, and Ray Train's worker. This
benchmark measures what one such process costs and which of issue 10's levers can take it
back:

* imports, each in a fresh interpreter: what Ray's own modules pull in (``ray.train.torch``
  imports torch, ``ray.tune`` imports pandas) against what covid_ray's loop adds;
* actor start-up in a fresh local Ray, from ``A.remote()`` to its first method's answer:
  a bare actor; one that imports torch (as the worker does); the same with
  torch preloaded by a job-level ``worker_process_setup_hook``; and with Ray's worker
  prestart on (``RAY_enable_worker_prestart``, a larger ``RAY_num_workers_soft_limit``),
  which may hand an idle, already-started process to an actor.

Each case runs in its own process (its own ``ray.init``), one after the other, never two
Ray instances at once. Writes a section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import fresh_interpreter_seconds, last_json, machine_note, markdown_table, today, write_section

SECTION = "Trial start-up: Ray processes, imports and the worker pool (`python -m benchmarks.worker_start`)"
# What a new process runs before training, each timed alone in a fresh interpreter (the
# optimizer after ``import torch``: its first construction imports torch._dynamo).
STEPS = {
    "`import torch`": ("", "import torch"),
    "`import ray`": ("", "import ray"),
    "`import ray.tune`": ("", "import ray.tune"),
    "`import ray.train.torch`": ("", "import ray.train.torch"),
    "`import covid_ray.train`": ("", "import covid_ray.train"),
    "`import covid_ray.launch, ray.tune` (the trial driver's, which runs the controller)": (
        "", "import covid_ray.launch, ray.tune"),
    "first `torch.optim.Adam(...)` after `import torch`": (
        "import torch", "torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])"),
}
WATCH = ("torch", "torch._dynamo", "pandas", "ray.data", "sklearn")
CASES = {
    "bare": "an actor, nothing imported",
    "torch": "an actor that imports torch (as Train's worker does; its controller did with `TorchConfig`)",
    "hook": "the same, torch preloaded by the job's `worker_process_setup_hook`",
    "prestart": "the same, hook + worker prestart (`RAY_enable_worker_prestart=1`, soft limit 8)",
}


def actor_case(case: str, actors: int) -> dict:
    """Start ``actors`` actors one after another in a fresh Ray; seconds until each answers."""
    if case == "prestart":
        os.environ["RAY_enable_worker_prestart"] = "1"
        os.environ["RAY_num_workers_soft_limit"] = "8"
    import ray

    def preload() -> None:  # defined here, so Ray ships it by value: a worker cannot import benchmarks
        import torch  # noqa: F401

    runtime_env = {"worker_process_setup_hook": preload} if case in ("hook", "prestart") else None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)

    @ray.remote(num_cpus=0.5)
    class Probe:
        def __init__(self, load_torch: bool):
            if load_torch:
                import torch  # noqa: F401

        def pid(self) -> int:
            return os.getpid()

    time.sleep(5)  # the raylet's first workers are up: every actor meets the same pool
    times = []
    for _ in range(actors):
        t = time.perf_counter()
        a = Probe.remote(case != "bare")
        ray.get(a.pid.remote())
        times.append(time.perf_counter() - t)
        ray.kill(a)
        time.sleep(2)  # the pool has time to start spare workers, if it does
    ray.shutdown()
    return {"case": case, "times": times}


def run(args) -> dict:
    imports = {label: fresh_interpreter_seconds(step, before=before, repeats=args.repeats, watch=WATCH)
               for label, (before, step) in STEPS.items()}
    cases = {}
    for case in CASES:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker_start", "--case", case,
                               "--actors", str(args.actors)], capture_output=True, text=True, check=True)
        cases[case] = last_json(proc.stdout)["times"]
    return {"imports": imports, "cases": cases}


def render(out: dict, command: str) -> str:
    rows = [[label, f"{r['s']:.2f}", ", ".join(k for k in WATCH
                                               if r[k] and f"import {k}`" not in label) or "-"]
            for label, r in out["imports"].items()]
    imports = markdown_table(["in a fresh interpreter", "median s", "imported on the way"], rows)
    rows = [[CASES[c], f"{t[0]:.2f}", f"{statistics.median(t[1:]):.2f}", " ".join(f"{x:.2f}" for x in t)]
            for c, t in out["cases"].items()]
    actors = markdown_table(["actor start-up (a new Ray per case)", "first actor s", "median of the rest s",
                             "all actors s"], rows)
    med = {c: statistics.median(t) for c, t in out["cases"].items()}
    adam = out["imports"]["first `torch.optim.Adam(...)` after `import torch`"]["s"]

    def versus(case: str) -> str:
        gain = med["torch"] - med[case]
        return f"{med[case]:.2f} s against {med['torch']:.2f} s: " + (
            f"{gain:.2f} s faster" if gain > 0.1 else "no faster")

    verdict = (
        f"A setup hook runs in each new process before it takes its actor, so torch's import moves "
        f"rather than goes ({versus('hook')}, medians of all actors). With worker prestart an actor may get "
        f"a process Ray started ahead ({versus('prestart')}); an actor's process is its own and exits with "
        f"it, so Ray leaves no process warm for the next trial. covid-ray keeps its own: a finished "
        f"(or cancelled) trial's worker, with torch, the loop and `torch._dynamo` loaded, serves the next "
        f"trial (`covid_ray.worker_pool`; \"Search\" and \"Training loop\" measure it). It also takes back whole "
        f"processes and imports: Ray Train's controller runs in the trial driver rather than in an actor "
        f"of its own (`covid_ray.launch.Trainer`'s `controller_in_process`), reports reach Tune without "
        f"a queue actor (`covid_ray.launch.TuneReport`), one placement-group cleaner serves the whole search "
        f"(`covid_ray.launch.SharedPlacementGroupCleaner`), and since `ray.train.torch` itself imports torch, "
        f"the trial driver never imports it: it builds and runs the trainer from `covid_ray.launch`, "
        f"whose process-group backend imports torch only in the worker. The worker alone imports torch; "
        f"with its first optimizer that is about {med['torch'] + adam:.1f} s that a new worker process spends "
        f"per trial and a pooled one once "
        f"on this machine ({med['torch']:.2f} + {adam:.2f}; {3 * med['torch'] + adam:.1f} s when the "
        f"trial driver and a controller actor imported it too), "
        f"before gloo, the loop's set-up and the reports. `ray.tune` and `ray.train` still import pandas "
        f"and Ray Data in every one of Ray's per-trial processes."
    )
    return f"""Command: `{command}` &nbsp; Date: {today()}
Machine: {machine_note()}.

A trial starts two Ray actors on its critical path, each a new Python process: Tune's trial
driver, in which covid-ray also runs Ray Train's controller (Ray would start a third actor for
it), and Ray Train's worker. Beside them Ray 2.60 starts, per trial, Train's synchronization
actor, and (unless covid-ray leaves them out, as it does) a controller actor, a
placement-group cleaner (one serves covid-ray's whole search), Tune's report queue, a Ray
Data manager and a preemption watcher: more processes sharing the same cores. Imports, each in a fresh interpreter:

{imports}

Actors started one after another, 2 s apart, each killed before the next:

{actors}

{verdict}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker_start", description=__doc__.split("\n")[0])
    p.add_argument("--actors", type=int, default=5, help="actors started per case (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="fresh interpreters per import (default 3)")
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one case, in its own process
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    args = p.parse_args(argv)
    if args.actors < 2:
        raise SystemExit("--actors must be >= 2: the first actor and the rest are reported apart")
    if args.case:
        print(json.dumps(actor_case(args.case, args.actors)))
        return 0
    command = "python -m benchmarks.worker_start" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    out = run(args)
    body = render(out, command)
    print(body)
    print(json.dumps(out))
    if not args.no_write:
        print(f"wrote the tables into {write_section(SECTION, body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
