"""Where a search keeps its files on a cluster, and a check that every node can reach them.

``--storage-path`` is either a filesystem path or a URI (``s3://bucket/prefix``,
``gs://…``; anything ``pyarrow.fs`` opens). The experiment folder is
``<storage>/<NAME>`` in both cases:

* **A path** (local disk, or an NFS mount shared by every node): everything is
  written there directly -- driver files, Tune state (``tune/``), Ray Train
  checkpoints (``train/``), tables.
* **A URI**: Ray Tune and Ray Train write ``tune/`` and ``train/`` to the URI
  themselves, from whichever node produced them. Our driver-side files
  (``experiment.json``, ``split.csv``, ``search_space.yaml``, ``optuna.db``, tables
  and plots) live in a local *mirror* folder -- SQLite cannot keep a database on S3
  -- and are uploaded after the experiment is prepared, after every finished trial
  and at the end; ``--resume`` downloads them first. ``python -m covid_ray.storage
  pull URI DEST`` downloads a finished experiment, checkpoints included, for
  ``ensemble.build --results-dir DEST``; ``ensemble.build --results-dir URI`` does the
  same by itself, downloading only the checkpoints it ensembles. The trials' workers
  read the split manifest from the URI (``covid_ray.data.split.read_manifest``).
  Opening, testing and downloading URIs is :mod:`covid_ray.uri`.

On a multi-node cluster a path that only the driver's machine has would fail late
and confusingly (a worker's checkpoint upload, a restarted trial that finds no
checkpoint). :func:`check_storage` fails fast instead: the driver writes a probe
file, a tiny task pinned to each alive node must read it and write its own reply,
and the driver must read every reply.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from covid_ray.artifacts.experiment import (
    DRIVER_FILES, EXPERIMENT_FILE, HISTORY_FILE, HISTORY_TABLE, TRAIN_DIRNAME, TRIALS_FILE, TUNE_DIRNAME,
    best_checkpoint, read_history_table, read_trials, trial_dir,
)
from covid_ray.uri import check_uri, download_file, download_files, exists, filesystem, is_uri, join, mirror_dir

logger = logging.getLogger(__name__)
# How long a node waits for the driver's probe file (and the driver for the nodes'
# replies). New names are looked up on the NFS server, so they show up at once; the
# wait only covers slow close-to-open flushes.
PROBE_WAIT_S = 10.0
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "glusterfs", "ceph", "fuse.")


class StorageError(ValueError):
    """The storage path cannot serve this cluster (the CLI prints it and exits 2)."""


def local_experiment_dir(storage_path: str | None, experiment: str) -> Path:
    """The experiment folder on this machine: the folder itself, or a URI's mirror.

    A URI's mirror is derived from the URI alone, so a new head node (same user)
    finds the same folder that a resumed search's pickled Optuna storage points to.
    """
    if is_uri(storage_path):
        return mirror_dir(join(check_uri(str(storage_path)), experiment))
    base = Path(storage_path) if storage_path else Path("results")
    return (base / experiment).resolve()


@dataclass(frozen=True)
class ExperimentStorage:
    """The experiment folder: ``local`` (driver files) and ``remote`` (a URI, or None)."""

    local: Path
    remote: str | None = None

    @classmethod
    def create(cls, storage_path: str | None, experiment: str) -> "ExperimentStorage":
        remote = join(check_uri(str(storage_path)), experiment) if is_uri(storage_path) else None
        return cls(local_experiment_dir(storage_path, experiment), remote)

    @property
    def root(self) -> str:
        """Where Ray Tune and Ray Train write (``tune/`` and ``train/`` go under it)."""
        return self.remote or str(self.local)

    @property
    def train_storage(self) -> str:
        return join(self.root, TRAIN_DIRNAME)

    @property
    def tune_dir(self) -> str:
        return join(self.root, TUNE_DIRNAME)

    def before_prepare(self, *, resume: bool) -> None:
        """For a URI: download the driver files to resume, or check that a new search can write.

        Raises:
            FileExistsError: a new search, but the URI already holds an experiment.
            FileNotFoundError: ``--resume``, but the URI holds no experiment.
            StorageError: the store cannot be reached, read or written from here.
        """
        if self.remote is None:
            return
        import pyarrow.fs as pafs

        fs, path = filesystem(self.remote)
        try:
            if resume:
                self.local.mkdir(parents=True, exist_ok=True)
                got = download_files(self.remote, DRIVER_FILES, self.local)
                logger.info("downloaded %s from %s to %s", ", ".join(got) or "nothing", self.remote, self.local)
                exists_already = EXPERIMENT_FILE in got
            else:
                exists_already = bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
                if not exists_already:
                    # Fails here, not after scanning the dataset, when the bucket is missing or read-only.
                    fs.create_dir(path, recursive=True)
        except OSError as exc:
            raise StorageError(
                f"--storage-path {self.remote.rsplit('/', 1)[0]}: cannot use {self.remote} from this machine "
                f"({exc}). Check that the bucket exists and that this machine's credentials (instance profile, "
                "AWS_* variables; AWS_ENDPOINT_URL for an S3-compatible store) allow reading and writing it."
            ) from None
        if resume:
            if not exists_already:
                raise FileNotFoundError(f"nothing to resume: no experiment at {self.remote} ({EXPERIMENT_FILE} is missing)")
            return
        if exists_already:
            raise FileExistsError(
                f"an experiment already exists at {self.remote}; pass --resume to continue it, "
                f"or choose another --experiment name"
            )
        if self.local.exists() and any(self.local.iterdir()):
            # A mirror without a remote: an earlier attempt that failed before its
            # first upload. Nothing in it is the only copy of anything the URI has.
            logger.info("clearing the stale mirror %s (nothing at %s)", self.local, self.remote)
            import shutil

            shutil.rmtree(self.local)

    def push(self) -> None:
        """Upload the driver files present in the mirror (no-op for a path)."""
        if self.remote is None:
            return
        fs, path = filesystem(self.remote)
        fs.create_dir(path, recursive=True)
        sent = _upload_files(self.local, DRIVER_FILES, fs, path)
        logger.info("uploaded %s to %s", ", ".join(sent), self.remote)

    def pull_tune_state(self) -> None:
        """Download ``tune/`` and each trial's ``train/<trial>/history.jsonl`` (no checkpoints),
        so the tables can be built locally."""
        if self.remote is None:
            return
        import pyarrow.fs as pafs

        fs, path = filesystem(self.remote)
        pafs.copy_files(f"{path}/{TUNE_DIRNAME}", str(self.local / TUNE_DIRNAME), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        runs = fs.get_file_info(pafs.FileSelector(f"{path}/{TRAIN_DIRNAME}", allow_not_found=True))
        for run in (r for r in runs if r.type == pafs.FileType.Directory):
            download_file(join(trial_dir(self.remote, run.base_name), HISTORY_FILE),
                          Path(trial_dir(self.local, run.base_name)) / HISTORY_FILE)

    def checkpoint_location(self) -> Callable[[str], str] | None:
        """For :func:`covid_ray.results.write_tables`: a checkpoint path Ray reported -> where it
        lives (its URI), so a URI experiment's tables name checkpoints they can be fetched from;
        None for a path (the paths are already right)."""
        if self.remote is None:
            return None
        _, fs_path = filesystem(self.remote)
        return lambda p: _replace_prefix(p, fs_path, self.remote)

    def tune_callbacks(self) -> list:
        """Tune callbacks: for a URI, upload the driver files after every finished trial."""
        return [UploadDriverFiles(self)] if self.remote else []

    def worker_split(self, local_split: Path) -> str:
        """The split manifest as the trials' workers read it: the shared path, or the URI
        (uploaded by :meth:`push`; the mirror exists on the driver's machine only)."""
        return join(self.remote, local_split.name) if self.remote else str(local_split)


class UploadDriverFiles(Callback):
    """Upload a URI experiment's driver files (the Optuna study above all) after each trial.

    A driver killed mid-search then loses at most the trials running at the time, and
    ``--resume`` on another machine finds the study.
    """

    def __init__(self, storage: ExperimentStorage):
        self.storage = storage

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.storage.push()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.storage.push()


def _upload_files(local_dir: Path, names, fs, remote_dir: str) -> list[str]:
    """Upload ``local_dir/<name>`` to ``remote_dir/<name>`` for each name present; returns those sent."""
    import pyarrow.fs as pafs

    sent = [name for name in names if (local_dir / name).is_file()]
    for name in sent:
        pafs.copy_files(str(local_dir / name), f"{remote_dir}/{name}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return sent


def _replace_prefix(value: str, old: str, new: str) -> str:
    old, new = old.rstrip("/"), new.rstrip("/")
    if value == old or value.startswith(old + "/"):
        return new + value[len(old):]
    return value


def localize_tables(exp: Path, mapping) -> None:
    """Apply ``mapping`` to the checkpoint columns of ``trials.csv`` and ``history.csv`` (text in, text out).

    Tables written before a URI experiment's tables named its checkpoints left a trial's
    checkpoint empty; it is filled from the history with the tables' own rule
    (:func:`covid_ray.artifacts.experiment.best_checkpoint`).
    """
    try:
        history, trials = read_history_table(exp, as_text=True), read_trials(exp, as_text=True)
    except ValueError:  # no tables yet
        return
    if history.empty or trials.empty:
        return
    history["checkpoint"] = [mapping(c) if c else "" for c in history["checkpoint"]]
    trials["checkpoint"] = [
        mapping(t["checkpoint"]) if t["checkpoint"]
        else best_checkpoint(history[history["trial_id"] == t["trial_id"]], t.get("best_epoch", ""))
        for _, t in trials.iterrows()
    ]
    history.to_csv(exp / HISTORY_TABLE, index=False)
    trials.to_csv(exp / TRIALS_FILE, index=False)


def pull_experiment(uri: str, dest: str | Path) -> Path:
    """Download a whole URI experiment (checkpoints too) for ``ensemble.build --results-dir``.

    The tables' checkpoint paths are rewritten to point into ``dest``.
    """
    import pyarrow.fs as pafs

    dest = Path(dest).resolve()
    fs, path = filesystem(uri)
    if not exists(fs, f"{path}/{EXPERIMENT_FILE}"):
        raise FileNotFoundError(f"no experiment at {uri} ({EXPERIMENT_FILE} is missing)")
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    uri = uri.rstrip("/")
    localize_tables(dest, lambda p: _replace_prefix(_replace_prefix(p, uri, str(dest)), path, str(dest)))
    return dest


# --------------------------------------------------------------------------- the check


def filesystem_type(path: str | Path) -> str:
    """The type of the filesystem holding ``path`` per /proc/mounts ('' where unknown)."""
    path, best, kind = str(Path(path).resolve()), "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and (path == fields[1] or path.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) >= len(best):
                best, kind = fields[1], fields[2]
    return kind


def _probe_node(root: str, probe: str, token: str, wait_s: float, data: str | None) -> dict:
    """Runs on one node: read the driver's probe file, then write this node's reply."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    if data and not Path(data).is_dir():
        return {"node_id": node_id, "problem": f"has no dataset folder {data}", "data": True}
    fs, base = filesystem(root)
    target = f"{base}/{probe}"
    deadline = time.monotonic() + wait_s
    try:
        while not exists(fs, f"{target}/driver"):
            if time.monotonic() > deadline:
                return {"node_id": node_id, "problem": "does not see the probe file the driver wrote"}
            time.sleep(0.5)
        with fs.open_input_stream(f"{target}/driver") as f:
            if f.read().decode() != token:
                return {"node_id": node_id, "problem": "sees a different file at the same path"}
        with fs.open_output_stream(f"{target}/node-{node_id}") as f:
            f.write(token.encode())
    except Exception as exc:  # noqa: BLE001 - any I/O or credential error is the answer
        return {"node_id": node_id, "problem": f"cannot read or write there ({type(exc).__name__}: {exc})"}
    return {"node_id": node_id, "problem": ""}


def check_storage(root: str, *, data: str | None = None, wait_s: float = PROBE_WAIT_S) -> int:
    """Check that every alive node of the connected Ray cluster can read and write ``root``.

    With ``data``, each node must also have that dataset folder (the workers read the
    images from it at the same path).

    Skipped when the cluster is this machine's single node (nothing to share).

    Returns:
        The number of nodes checked (0 when skipped).

    Raises:
        StorageError: names each node that cannot use ``root`` and what to do.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    if len(nodes) <= 1 and all(n["NodeID"] == here for n in nodes):
        return 0
    fs, base = filesystem(root)
    probe, token = f".covid_ray_probe-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    fs.create_dir(f"{base}/{probe}", recursive=True)
    with fs.open_output_stream(f"{base}/{probe}/driver") as f:
        f.write(token.encode())
    task = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    refs = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            root, probe, token, wait_s, data
        ): n
        for n in nodes
    }
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s + 60)
    problems: dict[str, str] = {refs[r]["NodeID"]: "did not answer within the timeout" for r in pending}
    data_missing = False
    for ref in ready:
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as exc:  # e.g. covid_ray not installed on that node
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            answer = {"node_id": refs[ref]["NodeID"],
                      "problem": f"the probe task failed there ({type(exc).__name__}: {first[:200]})"}
        if answer["problem"]:
            problems[answer["node_id"]] = answer["problem"]
            data_missing |= bool(answer.get("data"))
    deadline = time.monotonic() + wait_s
    for n in nodes:  # the driver must also see what each node wrote
        node_id = n["NodeID"]
        while node_id not in problems and not exists(fs, f"{base}/{probe}/node-{node_id}"):
            if time.monotonic() > deadline:
                problems[node_id] = "wrote its reply, but the driver does not see it"
            time.sleep(0.2)
    try:
        fs.delete_dir(f"{base}/{probe}")
    except OSError:
        logger.info("could not remove the probe folder %s/%s", root, probe)
    if problems:
        raise StorageError(_storage_message(root, nodes, problems, data if data_missing else None))
    logger.info("storage %s: read and write checked from all %d nodes", root, len(nodes))
    return len(nodes)


def _storage_message(root: str, nodes: list[dict], problems: dict[str, str], data: str | None) -> str:
    address = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    lines = [f"the experiment folder {root} (under --storage-path) is not readable and writable "
             f"from every node of the cluster:"]
    lines += [f"  node {nid} ({address.get(nid, '?')}): {why}" for nid, why in problems.items()]
    if data:
        lines.append(
            f"The dataset {data} must exist at the same path on every node: on shared storage, or "
            "copied by the cluster's setup_commands (see cluster/README.md)."
        )
    if is_uri(root):
        lines.append(
            "Every node needs credentials for it: on AWS an IAM instance profile with access to the "
            "bucket on the head AND the worker node types (see cluster/aws-gpu.yaml)."
        )
    else:
        kind = filesystem_type(root)
        where = f" ({root} is on a local {kind} filesystem here)" if kind and not kind.startswith(NETWORK_FS) else ""
        lines.append(
            f"Checkpoints and tables are written from every node, so the path must be shared{where}: "
            "use an s3:// or gs:// URI, or a shared NFS mount at the same path on every node "
            "(see cluster/local.yaml)."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m covid_ray.storage", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="check that every node of a running cluster can read and write a storage path")
    c.add_argument("storage_path")
    c.add_argument("--data", default=None, help="also check that every node has this dataset folder")
    c.add_argument("--address", default="auto")
    d = sub.add_parser("pull", help="download a URI experiment (checkpoints included) for ensemble.build --results-dir")
    d.add_argument("uri", help="e.g. s3://bucket/covid-ray/NAME")
    d.add_argument("dest", help="local folder, e.g. results/NAME")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "pull":
        try:
            dest = pull_experiment(args.uri, args.dest)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"downloaded {args.uri} to {dest}; next: python -m ensemble.build --results-dir {dest}")
        return 0
    import ray

    from covid_ray.ray_setup import init_ray

    init_ray(args.address)
    try:
        n = check_storage(args.storage_path, data=args.data)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"ok: {args.storage_path} is readable and writable from {n or 'the only'} node(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
