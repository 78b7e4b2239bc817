"""Multi-node overhead on one machine, and how a GPU cluster should scale: ``python -m benchmarks.cluster``.

    python -m benchmarks.cluster [--trials 3] [--epochs 2] [--repeats 2] [--estimate-only] [--no-write]

Measured here: the same tiny search (``seed_cnn`` at 40 px on the demo's synthetic
data, 2 DDP workers per trial, one trial at a time) on two simulated clusters made of
``ray start`` processes (:class:`LocalCluster`), each joined with ``--address``:

* 1 node with 2 CPUs: both workers of a trial on one node;
* 2 nodes with 1 CPU each: every trial's workers span both nodes (each node fits one).

Per trial, *overhead* = Tune's trial wall time minus the sum of its epochs' times (the
definition of ``benchmarks.tune``); the difference of the medians is the extra cost of
spreading a trial over two nodes. Both nodes share this machine's cores, network and
disk, so this measures Ray's scheduling and start-up across nodes, not a real network.

Estimated (no GPU here): per architecture, the gradient that DDP all-reduces every step
(parameter counts from ``covid_ray.models.create_model``, fp32), the ring all-reduce
time over a few interconnects, and the training FLOPs per image (counted with
``torch.utils.flop_counter`` at 224 px), from which the compute time of a step on an
A10G follows under a stated throughput assumption.

:class:`LocalCluster` is also what ``tests/test_cluster.py`` runs its multi-node and
recovery tests on.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import last_json
from benchmarks.ports import free_port

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path
    num_cpus: float
    head: bool = False


@dataclass
class LocalCluster:
    """A Ray cluster made of separate ``ray start --block`` processes on this machine.

    Token authentication is on, with a token file of its own passed to every process
    through ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (the mechanism
    cluster/README.md describes for real nodes). ``RAY_TMPDIR`` points at a private
    folder: ``ray start`` records its address in ``<tmp>/ray/ray_current_cluster``, and
    under /tmp that file would make every plain ``ray.init()`` on the machine join
    this cluster.
    """

    fast_failure_detection: bool = False  # the GCS declares a silent node dead in ~3 s, not ~30 s
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="crc-", dir="/tmp")))
    nodes: list[Node] = field(default_factory=list)
    port: int = 0

    def __post_init__(self):
        # Short on purpose: Ray's unix socket paths live under it (107-byte limit).
        token = self.base / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(RAY_TMPDIR=str(self.base), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        if self.fast_failure_detection:
            env.update(RAY_health_check_initial_delay_ms="1000", RAY_health_check_period_ms="1000",
                       RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3")
        self.env = env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, cmd: list[str], num_cpus: float, head: bool, wrap: list[str] | None = None) -> Node:
        log = self.base / f"node{len(self.nodes)}.log"
        args = [RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={num_cpus:g}",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}", *cmd]
        proc = subprocess.Popen([*(wrap or []), *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                env=self.env, cwd=REPO, start_new_session=True)
        node = Node(proc, log, num_cpus, head)
        self.nodes.append(node)
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed ({log}):\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        return node

    def start_head(self, num_cpus: float = 1) -> Node:
        self.port = free_port()
        return self._start([
            "--head", f"--port={self.port}", f"--temp-dir={self.base / 'ray'}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ], num_cpus, head=True)

    def add_node(self, num_cpus: float = 1, *, hide: Path | None = None) -> Node:
        """Start a worker node. ``hide``: this node sees an empty tmpfs at that path.

        The node's ``ray start`` runs in a private mount namespace (``unshare -m``, needs
        root) with a tmpfs mounted over ``hide``: the same path, another filesystem --
        a local disk where the driver expected a shared one.
        """
        wrap = None
        if hide is not None:
            wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hide)]
        return self._start([f"--address={self.address}"], num_cpus, head=False, wrap=wrap)

    def python(self, code: str, timeout: float = 120) -> str:
        """Run ``code`` in a new Python process connected to nothing yet; returns its stdout."""
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env,
                             cwd=REPO, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-3000:])
        return out.stdout

    def alive_nodes(self) -> list[str]:
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % self.address)
        return last_json(self.python(code))

    def wait_for_nodes(self, n: int, timeout: float = 120) -> list[str]:
        deadline = time.time() + timeout
        while len(alive := self.alive_nodes()) != n:
            if time.time() > deadline:
                raise RuntimeError(f"{len(alive)} nodes alive, expected {n}")
            time.sleep(1)
        return alive

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's ``ray start`` and every process it started: a machine dying.

        Ray's worker processes start their own sessions, so the process group is not
        enough; the descendants are found through /proc (psutil is not a dependency).
        """
        for pid in [node.proc.pid, *_descendants(node.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait(timeout=30)

    def shutdown(self, keep: bool = False) -> None:
        for node in reversed(self.nodes):
            self.kill_node(node)
        self.nodes.clear()
        if not keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


# --------------------------------------------------------------------------- measured


def tiny_space(trials: int, epochs: int) -> dict:
    return {
        "metric": "val_macro_f1", "mode": "max", "num_samples": trials, "max_concurrent": 1,
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 0.9, "gpus_per_worker": 0, "max_failures": 1},
        "scheduler": {"type": "fifo"}, "searcher": {"type": "random", "seed": 0},
        "fixed": {"image_size": 40, "epochs": epochs, "model": "seed_cnn", "batch_size": 32},
        "space": {"lr": {"loguniform": [3.0e-4, 2.0e-3]}},
    }


def run_search_on(cluster: LocalCluster, data: Path, space: Path, storage: Path, name: str) -> Path:
    cmd = [sys.executable, "-m", "covid_ray.tune", "--address", cluster.address, "--data", str(data),
           "--search-space", str(space), "--experiment", name, "--storage-path", str(storage),
           "--cache-dir", str(storage / "cache"), "--no-recipe"]  # the same trials on both layouts
    out = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    return storage / name


def trial_overheads(exp: Path) -> tuple[list[float], list[float]]:
    """(overhead s per trial, epoch s of every epoch) of a finished experiment."""
    from covid_ray.artifacts.experiment import read_history_table, read_trials

    trials, history = read_trials(exp), read_history_table(exp)
    epochs = history.groupby("trial_id")["epoch_time_s"].sum()
    overhead = (trials.set_index("trial_id")["wall_time_s"] - epochs).dropna()
    return [float(v) for v in overhead], [float(v) for v in history["epoch_time_s"]]


LAYOUTS = {"1 node x 2 CPUs": [2], "2 nodes x 1 CPU": [1, 1]}


def measure(trials: int, epochs: int, repeats: int) -> dict:
    """Run the search ``repeats`` times on each layout, alternating the order (ABBA...)
    so that a change in the machine's load hits both layouts alike."""
    import yaml

    from covid_ray.data.prepare import DEFAULT_SYNTHETIC_DIR, ensure_synthetic

    data = ensure_synthetic(REPO / DEFAULT_SYNTHETIC_DIR)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(trials, epochs)))
    results = {label: {"overhead": [], "epoch": [], "wall": []} for label in LAYOUTS}
    load = [os.getloadavg()[0]]
    try:
        for r in range(repeats):
            for label in (list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))):
                layout = LAYOUTS[label]
                with LocalCluster() as cluster:
                    cluster.start_head(layout[0])
                    for cpus in layout[1:]:
                        cluster.add_node(cpus)
                    cluster.wait_for_nodes(len(layout))
                    t0 = time.time()
                    exp = run_search_on(cluster, data, space, work, f"n{len(layout)}-r{r}")
                    overhead, epoch_s = trial_overheads(exp)
                res = results[label]
                res["overhead"] += overhead
                res["epoch"] += epoch_s
                res["wall"].append(time.time() - t0)
                print(f"{label} (run {r + 1}): overhead per trial {[round(v, 1) for v in overhead]}, "
                      f"search {res['wall'][-1]:.0f} s", flush=True)
                load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load"] = load
    return results


# --------------------------------------------------------------------------- estimated

# Link bandwidths per direction, bytes/s. AWS g5: "up to 10 Gbps" (g5.xlarge to 4xlarge),
# 25 (8xlarge), 40 (12xlarge), 100 (48xlarge); A10G GPUs talk over PCIe (no NVLink).
LINKS = {
    "10 Gb/s": 10e9 / 8,            # g5.xlarge to g5.xlarge
    "25 Gb/s": 25e9 / 8,
    "100 Gb/s": 100e9 / 8,          # g5.48xlarge, EFA-class
    "PCIe in-node": 20e9,           # PCIe 4.0 x16, ~20 GB/s achievable GPU to GPU
    "NVLink-class": 300e9,          # A100 NVLink 3, per direction
}
# Sustained training throughput assumed for an A10G with AMP: NVIDIA's published
# ResNet-50 training rate on an A10 (~850 img/s, mixed precision) x ~24.6 GFLOP per
# image (3 x the forward pass) = ~21 TFLOP/s, about 1/6 of the 125 TFLOP/s fp16 peak.
A10G_EFFECTIVE_FLOPS = 21e12
BATCH = 32  # per worker: full.yaml's smaller choice
# The real COVID-19 Radiography Database: 21,165 images, 70/10/20 split.
TRAIN_IMAGES, VAL_IMAGES = 14_816, 2_117
BACKWARD_SHARE = 2 / 3  # DDP overlaps the all-reduce with the backward pass (~2/3 of a step)


def ring_allreduce_s(nbytes: float, workers: int, bandwidth: float) -> float:
    """Bandwidth term of a ring all-reduce: each worker sends and receives 2(N-1)/N of the data."""
    return 2 * (workers - 1) / workers * nbytes / bandwidth


def step_s(arch: dict) -> float:
    """Compute time of one training step of ``BATCH`` images on one A10G (estimate)."""
    return BATCH * arch["train_flops"] / A10G_EFFECTIVE_FLOPS


def ddp_speedup(arch: dict, workers: int, bandwidth: float) -> float:
    """Throughput of ``workers`` DDP workers relative to one, with the all-reduce
    overlapped with the backward pass and only the rest of it exposed."""
    compute = step_s(arch)
    exposed = max(0.0, ring_allreduce_s(arch["grad_bytes"], workers, bandwidth) - BACKWARD_SHARE * compute)
    return workers * compute / (compute + exposed)


def architecture_table(image_size: int = 224) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from covid_ray.models import create_model

    rows = []
    for name in ("seed_cnn", "mobilenet_v3_small", "efficientnet_b0", "resnet18", "densenet121", "resnet50"):
        model = create_model(name, 4, in_chans=1).eval()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, image_size, image_size))
        fwd = counter.get_total_flops()
        rows.append({"model": name, "params": params, "grad_bytes": 4 * params, "fwd_flops": fwd,
                     "train_flops": 3 * fwd})
    return rows


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def measured_markdown(results: dict, args) -> list[str]:
    from benchmarks.common import markdown_table, median

    one, two = results["1 node x 2 CPUs"], results["2 nodes x 1 CPU"]
    rows = [[label, f"{median(r['overhead']):.1f}", f"{min(r['overhead']):.1f}",
             ", ".join(f"{v:.1f}" for v in r["overhead"]), f"{median(r['epoch']):.2f}",
             ", ".join(f"{v:.0f}" for v in r["wall"])] for label, r in results.items() if label in LAYOUTS]
    load = results.get("load", [])
    extra = median(two["overhead"]) - median(one["overhead"])
    extra_min = min(two["overhead"]) - min(one["overhead"])
    spread = max(max(results[k]["overhead"]) - min(results[k]["overhead"]) for k in LAYOUTS)
    return [
        "### Measured: the same search on 1 node and on 2 nodes of this machine",
        "",
        f"{args.trials} trials of `seed_cnn` at 40 px on the demo's synthetic data (1,058 images), "
        f"{args.epochs} epochs, 2 DDP workers (gloo) per trial at 0.9 CPU each, one trial at a time; "
        f"{args.repeats} searches per layout, alternating layouts. Each cluster is `ray start` "
        "processes with token auth; the search joins it with `--address`. Overhead per trial = "
        "Tune's trial wall time minus the sum of its epoch times.",
        "",
        markdown_table(["cluster", "overhead per trial s (median)", "(min)", "per trial s", "epoch s (median)",
                        "search wall s"], rows),
        "",
        f"Extra overhead per trial of the 2-node run: **{extra:+.1f} s** median against median "
        f"({extra_min:+.1f} s min against min), against a fixed cost of ~{median(one['overhead']):.0f} s per "
        f"trial on one node and a spread of {spread:.0f} s between trials of the same layout; epoch time "
        f"{median(two['epoch']) / median(one['epoch']):.2f}x. "
        + ("So spreading a trial over two nodes costs nothing measurable here beyond that noise. "
           if abs(extra) < spread / 2 and abs(extra_min) < spread / 2 else "")
        + (f"Other jobs loaded this machine during the runs (1-minute load average "
           f"{min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores, sampled between searches). " if load else "")
        + "Both \"nodes\" share this "
        "machine's 2 cores, memory and loopback network, so this is Ray's cost of placing a trial's "
        "workers on two raylets (placement group over two nodes, a worker process started by each, "
        "the gloo rendezvous across them), not a network's. On a real cluster add the all-reduce "
        "over the link (below).",
        "",
    ]


def estimate_markdown(arch: list[dict]) -> list[str]:
    from benchmarks.common import markdown_table

    head = ["model", "parameters", "gradient MB (fp32)", "train GFLOP / image", "ms / step (1 A10G)",
            "epoch s (1 A10G)", *[f"all-reduce ms, 2 workers, {k}" for k in LINKS]]
    rows = []
    for a in arch:
        epoch = (TRAIN_IMAGES * a["train_flops"] + VAL_IMAGES * a["fwd_flops"]) / A10G_EFFECTIVE_FLOPS
        rows.append([a["model"], f"{a['params'] / 1e6:.2f} M", f"{a['grad_bytes'] / 1e6:.1f}",
                     f"{a['train_flops'] / 1e9:.2f}", _ms(step_s(a)), f"{epoch:.1f}",
                     *[_ms(ring_allreduce_s(a["grad_bytes"], 2, bw)) for bw in LINKS.values()]])
    layouts = [("2 x g5.xlarge, 10 Gb/s", 2, LINKS["10 Gb/s"]), ("2 GPUs, 25 Gb/s", 2, LINKS["25 Gb/s"]),
               ("4 in one g5.12xlarge (PCIe)", 4, LINKS["PCIe in-node"]),
               ("8 x g5.xlarge, 10 Gb/s", 8, LINKS["10 Gb/s"]), ("8 GPUs, 100 Gb/s", 8, LINKS["100 Gb/s"]),
               ("8 GPUs, NVLink-class", 8, LINKS["NVLink-class"])]
    speed = [[a["model"], *[f"{ddp_speedup(a, n, bw):.2f}x" for _, n, bw in layouts]] for a in arch]
    return [
        "### Estimated: what a GPU cluster should do",
        "",
        f"Per architecture at 224 px, 1 input channel, 4 classes: trainable parameters counted from "
        f"`covid_ray.models.create_model`; the gradient DDP all-reduces every step is their fp32 size "
        f"(AMP keeps fp32 gradients); training FLOPs = 3 x the forward FLOPs counted by "
        f"`torch.utils.flop_counter`. Compute time assumes {A10G_EFFECTIVE_FLOPS / 1e12:.0f} TFLOP/s "
        f"sustained on an A10G (NVIDIA's ~850 img/s ResNet-50 AMP training on an A10 x 24.6 GFLOP; 1/6 "
        f"of the fp16 peak), batch {BATCH} per worker; an epoch is {TRAIN_IMAGES:,} training + "
        f"{VAL_IMAGES:,} validation images of the real database. All-reduce = the bandwidth term of a "
        f"ring all-reduce, 2(N-1)/N x gradient / link bandwidth (latency terms are small at these "
        f"sizes; NCCL over TCP reaches ~60-80% of a link, so real times are longer).",
        "",
        markdown_table(head, rows),
        "",
        "Throughput of one trial with N DDP workers relative to one worker, the all-reduce overlapped "
        "with the backward pass (~2/3 of a step) and only the remainder exposed:",
        "",
        markdown_table(["model", *[name for name, _, _ in layouts]], speed),
        "",
    ]


NOTES = """
How throughput should scale, and where the limits are:

- **Across trials, linearly.** Trials are independent, so trials per hour grow with the number of
  GPUs until `max_concurrent` (8 in `full.yaml`) x workers per trial is reached; ASHA and
  Optuna's TPE add no cross-trial communication. Past that, extra GPUs only help the trials
  that are running -- through DDP, with the efficiencies above.
- **Within a trial, DDP over the network is a loss for most of these models.** The gradients
  are large next to the compute: `seed_cnn` (26.1 M parameters, 25.7 M of them in its first
  fully connected layer, for 4.4 training GFLOP per image) and `resnet50` all-reduce ~100 MB
  per step, which
  takes longer over a 10 Gb/s link than the step itself. Two g5.xlarge workers of one trial
  (what `full.yaml`'s `workers_per_trial: 2` gives on 1-GPU nodes) are then slower than one;
  inside a g5.12xlarge (PCIe) or over NVLink the all-reduce hides behind the backward pass and
  the speed-up approaches N. For these six models and this dataset, the better use of N GPUs is
  N trials with 1 worker each (`workers_per_trial: 1`), and DDP only within one multi-GPU node
  (Ray Train packs a trial's workers onto one node when they fit).
- **Small models do not fill an A10G.** `mobilenet_v3_small` and `efficientnet_b0` need a few
  ms of FLOPs per step; kernel launches and memory bandwidth bound them instead, so their real
  steps are longer than estimated (which makes their all-reduce relatively cheaper, but their
  GPU mostly idle). Fractional GPUs (`gpus_per_worker: 0.5` or `0.25`) put 2-4 such trials on
  one GPU.
- **Data loading per node is not the limit after the first epoch.** An epoch of `resnet18` on
  one A10G needs ~2,000 images/s; the decode cache serves uint8 batches from a memory map at
  tens of thousands of images/s per process (BENCHMARKS.md, data loading), the uint8 copy to
  the GPU is 50 KB per 224 px image (~250,000 images/s over PCIe 4.0 x16), and augmentation
  runs on the GPU. The cost is one-off per node and resolution: reading the 21,165 PNGs from
  EFS/NFS and decoding them (~3 ms of CPU each here, so ~15-20 s on a g5.xlarge's 4 vCPUs,
  ~2 s on a g5.12xlarge). An autoscaled node pays it on its first trial, plus its
  setup_commands (venv with torch: minutes).
- **Per-trial fixed cost.** Every trial starts a trial driver (which runs Ray Train's
  controller) and leases its CPU workers warm from the search's pool (~4 s per trial of a
  search on this machine, BENCHMARKS.md "Search"; ~3 s for a run alone and ~9.5 s with new
  worker processes, "Training loop"). GPU workers are not pooled (Ray assigns a GPU per
  actor), so a GPU trial starts its workers anew (~9.5 s here); a second node adds the
  measured difference above. Against GPU epochs of seconds to tens of seconds and trials of
  5-50 epochs this is a few percent; it matters for ASHA's early rungs (5 epochs of a small
  model), where it can be as long as the training.
- **The head and the storage.** One search driver, one SQLite study and Tune's experiment
  state on the head; checkpoints (up to ~300 MB for `resnet50` with its optimizer state)
  written to EFS/NFS by whichever node trains. At 8-16 concurrent trials neither is close to a
  limit; at hundreds, Tune's state writes and a single NFS server would be.
"""


def markdown(results: dict | None, arch: list[dict], args) -> str:
    from benchmarks.common import machine_note, today

    parts = [f"Command: `python -m benchmarks.cluster --trials {args.trials} --epochs {args.epochs} "
             f"--repeats {args.repeats}` "
             f"&nbsp; Date: {today()}", f"Machine: {machine_note()}.", ""]
    if results:
        parts += measured_markdown(results, args)
    parts += estimate_markdown(arch)
    return "\n".join(parts) + NOTES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="searches per layout, alternating layouts")
    p.add_argument("--estimate-only", action="store_true", help="skip the measured part (no Ray)")
    p.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    arch = architecture_table()
    results = None if args.estimate_only else measure(args.trials, args.epochs, args.repeats)
    text = markdown(results, arch, args)
    print(text)
    if not args.no_write:
        from benchmarks.common import write_section

        print(f"written: {write_section(SECTION, text)}")
    return 0


SECTION = "Cluster: multi-node overhead and GPU scaling (`python -m benchmarks.cluster`)"


if __name__ == "__main__":
    sys.exit(main())
