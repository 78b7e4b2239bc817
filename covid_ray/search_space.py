"""Search spaces as YAML: load, validate, and turn into a Ray Tune ``param_space``.

A file looks like this (see ``search_spaces/quick.yaml``)::

    metric: val_macro_f1          # reported by every epoch; maximized by default
    mode: max
    num_samples: 10
    max_concurrent: 2
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    scheduler: {type: asha, max_t: 6, grace_period: 2, reduction_factor: 2}
    searcher:
      type: optuna                # TPE; "random" samples uniformly (same study, same signals)
      seed: 0
      n_startup_trials: 4
      start_with:                 # run first: configurations known to work (keys not given are sampled)
        - {model: resnet18, lr: 1.0e-3}
    fixed: {image_size: 64, epochs: 6}
    space:
      model: {choice: [seed_cnn, resnet18, mobilenet_v3_small]}
      lr: {loguniform: [1.0e-4, 3.0e-3]}

Each parameter under ``space`` has exactly one distribution. Every key is checked:
an unknown one is an error naming the file and the key, so a typo never runs a
search with a silent default; each ``start_with`` point must lie inside the space; and
the trial configurations the search will build (``fixed`` with one sample of the space,
each ``start_with`` point, the recipe) are validated by :func:`check_trial_configs` before
any trial starts, so a bad value fails once, up front, instead of inside every trial.

A file with an empty ``space`` and ``num_samples: 1`` is a one-configuration run
(``search_spaces/recipe.yaml``, the tutorial's hand recipe); :func:`reference_config` turns
it into the reference trial that every search runs beside its sampled ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from covid_ray.config import CLASS_MULT_PREFIX, DataConfig, ModelConfig, OptimConfig

DISTRIBUTIONS = {
    "choice": "a non-empty list of values",
    "uniform": "[low, high]",
    "loguniform": "[low, high] with 0 < low < high",
    "randint": "[low, high) integers",
    "quniform": "[low, high, q]",
    "qloguniform": "[low, high, q]",
}
TOP_LEVEL = {"description", "metric", "mode", "num_samples", "max_concurrent", "resources", "scheduler", "searcher", "fixed", "space"}
SCHEDULER_KEYS = {"type", "max_t", "grace_period", "reduction_factor"}
SEARCHER_KEYS = {"type", "seed", "n_startup_trials", "start_with"}
RESOURCE_KEYS = {"workers_per_trial", "cpus_per_worker", "gpus_per_worker", "max_failures"}
# Set by the search itself, never by a search space.
RESERVED = {"data", "split", "cache_dir"}
# What a search profile imposes on its reference (recipe) trial: the image size and the
# epoch budget of the profile, so the recipe is compared at the same resolution and budget.
PROFILE_KEYS = ("image_size", "epochs")


class SearchSpaceError(ValueError):
    pass


@dataclass
class SearchSpace:
    path: str
    metric: str = "val_macro_f1"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int = 2
    resources: dict[str, float] = field(default_factory=lambda: {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_failures": 1})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha", "grace_period": 1, "reduction_factor": 2})
    searcher: dict[str, Any] = field(default_factory=lambda: {"type": "optuna", "seed": 0})
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    @property
    def max_epochs(self) -> int:
        return int(self.fixed.get("epochs", OptimConfig().epochs))

    @property
    def full_fidelity(self) -> int:
        """Epochs of a trial that ran to the end (ASHA's max_t, else the epoch budget); a trial
        whose own ``epochs`` are fewer ends sooner (:func:`covid_ray.searcher.epoch_budget`)."""
        if self.scheduler.get("type", "asha") == "asha":
            return int(self.scheduler.get("max_t", self.max_epochs))
        return self.max_epochs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d

    def param_space(self) -> dict[str, Any]:
        """Ray Tune ``param_space``: fixed values as they are, searched ones as Tune domains."""
        from ray import tune

        out: dict[str, Any] = dict(self.fixed)
        for name, spec in self.space.items():
            (kind, args), = spec.items()
            if kind == "choice":
                out[name] = tune.choice(list(args))
            elif kind == "uniform":
                out[name] = tune.uniform(*args)
            elif kind == "loguniform":
                out[name] = tune.loguniform(*args)
            elif kind == "randint":
                out[name] = tune.randint(*args)
            elif kind == "quniform":
                out[name] = tune.quniform(*args)
            else:
                out[name] = tune.qloguniform(*args)
        return out


def _config_keys() -> set[str]:
    return {f.name for klass in (DataConfig, ModelConfig, OptimConfig) for f in dataclasses.fields(klass)} - {"class_mult"}


def _check_param(file: str, where: str, name: str) -> None:
    if name in RESERVED:
        raise SearchSpaceError(f"{file}: {where}.{name} is set by the search itself (from --data), not in a search space")
    if name.startswith(CLASS_MULT_PREFIX):
        if not name[len(CLASS_MULT_PREFIX):]:
            raise SearchSpaceError(f"{file}: {where}.{name} needs a class name after '{CLASS_MULT_PREFIX}'")
        return
    if name not in _config_keys():
        known = sorted(_config_keys() - RESERVED)
        raise SearchSpaceError(f"{file}: unknown parameter {where}.{name}; known: {known} and {CLASS_MULT_PREFIX}<class>")


def _check_distribution(file: str, name: str, spec: Any) -> None:
    where = f"space.{name}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SearchSpaceError(
            f"{file}: {where} must have exactly one distribution, one of {sorted(DISTRIBUTIONS)}; got {spec!r}"
        )
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SearchSpaceError(f"{file}: {where}: unknown distribution {kind!r}; use one of {sorted(DISTRIBUTIONS)}")
    bad = f"{file}: {where}.{kind} must be {DISTRIBUTIONS[kind]}, got {args!r}"
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SearchSpaceError(bad)
        return
    if not isinstance(args, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SearchSpaceError(bad)
    if len(args) != (3 if kind.startswith("q") else 2) or not args[0] < args[1]:
        raise SearchSpaceError(bad)
    if "log" in kind and args[0] <= 0:
        raise SearchSpaceError(bad)


def _inside(kind: str, args: list, value: Any) -> bool:
    """Whether ``value`` can be drawn from the distribution ``{kind: args}``."""
    if kind == "choice":
        return value in args
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if kind == "randint":
        return isinstance(value, int) and args[0] <= value < args[1]
    return args[0] <= value <= args[1]


def _check_start_with(file: str, ss: SearchSpace) -> None:
    """Each ``searcher.start_with`` point names searched parameters only, with values inside their ranges."""
    points = ss.searcher.get("start_with", []) or []
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise SearchSpaceError(f"{file}: searcher.start_with must be a list of non-empty mappings, got {points!r}")
    for i, point in enumerate(points):
        for name, value in point.items():
            where = f"searcher.start_with[{i}].{name}"
            if name not in ss.space:
                raise SearchSpaceError(f"{file}: {where} is not a searched parameter; searched: {sorted(ss.space)}")
            (kind, args), = ss.space[name].items()
            if not _inside(kind, args, value):
                raise SearchSpaceError(f"{file}: {where} = {value!r} lies outside space.{name} ({kind}: {args})")
    ss.searcher["start_with"] = [dict(p) for p in points]


def _check_keys(file: str, where: str, given: dict, allowed: set[str]) -> None:
    if not isinstance(given, dict):
        raise SearchSpaceError(f"{file}: {where} must be a mapping, got {given!r}")
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise SearchSpaceError(f"{file}: unknown key {where}.{unknown[0]}; allowed: {sorted(allowed)}")


def parse_search_space(raw: Any, file: str = "<search space>") -> SearchSpace:
    """Validate a parsed YAML document. Raises :class:`SearchSpaceError` naming the key."""
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"{file}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise SearchSpaceError(f"{file}: unknown top-level key {unknown[0]!r}; allowed: {sorted(TOP_LEVEL)}")
    ss = SearchSpace(path=file)
    for key in ("metric", "mode", "num_samples", "max_concurrent", "description"):
        if key in raw:
            setattr(ss, key, raw[key])
    if ss.mode not in ("max", "min"):
        raise SearchSpaceError(f"{file}: mode must be 'max' or 'min', got {ss.mode!r}")
    if not isinstance(ss.num_samples, int) or ss.num_samples < 1:
        raise SearchSpaceError(f"{file}: num_samples must be a positive integer, got {ss.num_samples!r}")
    if not isinstance(ss.max_concurrent, int) or ss.max_concurrent < 1:
        raise SearchSpaceError(f"{file}: max_concurrent must be a positive integer, got {ss.max_concurrent!r}")
    for key, allowed in (("resources", RESOURCE_KEYS), ("scheduler", SCHEDULER_KEYS), ("searcher", SEARCHER_KEYS)):
        if key in raw:
            _check_keys(file, key, raw[key], allowed)
            getattr(ss, key).update(raw[key])
    if ss.scheduler.get("type", "asha") not in ("asha", "fifo"):
        raise SearchSpaceError(f"{file}: scheduler.type must be 'asha' or 'fifo', got {ss.scheduler['type']!r}")
    if ss.searcher.get("type", "optuna") not in ("optuna", "random"):
        raise SearchSpaceError(f"{file}: searcher.type must be 'optuna' or 'random', got {ss.searcher['type']!r}")
    fixed = raw.get("fixed", {}) or {}
    _check_keys(file, "fixed", fixed, set(fixed))
    for name in fixed:
        _check_param(file, "fixed", name)
    space = raw.get("space", {}) or {}
    _check_keys(file, "space", space, set(space))
    if not space and ss.num_samples != 1:
        raise SearchSpaceError(
            f"{file}: 'space' must name at least one parameter to search (an empty space is a "
            f"one-configuration run: num_samples 1), got num_samples {ss.num_samples}"
        )
    for name, spec in space.items():
        _check_param(file, "space", name)
        _check_distribution(file, name, spec)
        if name in fixed:
            raise SearchSpaceError(f"{file}: {name} is both fixed and searched")
    ss.fixed, ss.space = dict(fixed), dict(space)
    _check_start_with(file, ss)
    ss.scheduler.setdefault("max_t", ss.max_epochs)
    if ss.scheduler["max_t"] > ss.max_epochs:
        raise SearchSpaceError(
            f"{file}: scheduler.max_t ({ss.scheduler['max_t']}) exceeds fixed.epochs ({ss.max_epochs})"
        )
    models = space.get("model", {}).get("choice", [fixed.get("model", "seed_cnn")])
    from covid_ray.models import list_models

    unknown_models = [m for m in models if m not in list_models()]
    if unknown_models:
        raise SearchSpaceError(f"{file}: unknown model(s) {unknown_models}; registered: {list_models()}")
    return ss


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"search space not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"{path}: not valid YAML: {exc}") from None
    return parse_search_space(raw, str(path))


def dump_search_space(ss: SearchSpace, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(ss.to_dict(), sort_keys=False))


def reference_config(recipe: SearchSpace, profile: SearchSpace) -> dict[str, Any]:
    """The reference trial's config: the recipe's values at the profile's image size and epoch budget.

    Every parameter the profile searches gets a value (the recipe's, else the training
    default: a sampled value must not leak into the reference), so the trial's config never
    holds an unresolved search domain.

    Raises:
        SearchSpaceError: ``recipe`` searches something (a recipe is one configuration).
    """
    from covid_ray.config import flat_defaults

    if recipe.space or recipe.num_samples != 1:
        raise SearchSpaceError(f"{recipe.path}: a recipe is one configuration: an empty space and num_samples 1")
    defaults = flat_defaults()
    out = {name: recipe.fixed.get(name, defaults.get(name, 1.0 if name.startswith(CLASS_MULT_PREFIX) else None))
           for name in profile.space}
    out.update(recipe.fixed)
    out.update({k: profile.fixed[k] for k in PROFILE_KEYS if k in profile.fixed})
    return out


def sample_point(ss: SearchSpace, seed: int = 0) -> dict[str, Any]:
    """One random point of the space (what a trial could be given)."""
    import random

    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for name, spec in ss.space.items():
        (kind, args), = spec.items()
        if kind == "choice":
            out[name] = rng.choice(list(args))
        elif kind == "randint":
            out[name] = rng.randrange(args[0], args[1])
        elif kind in ("loguniform", "qloguniform"):
            import math

            out[name] = math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
        else:
            out[name] = rng.uniform(args[0], args[1])
        if kind.startswith("q"):
            out[name] = round(out[name] / args[2]) * args[2]
    return out


def check_trial_configs(ss: SearchSpace, reference: dict[str, Any] | None = None) -> None:
    """Build the trial configs the search will build, once, before any trial starts.

    ``fixed`` with one sample of the space, with each ``start_with`` point, and the reference
    (recipe) config all go through ``TrialConfig.from_flat``, which checks names, types and
    ranges.

    Raises:
        SearchSpaceError: names the file, which config failed, and why.
    """
    from covid_ray.config import TrialConfig

    placeholders = {"data": ".", "split": "split.csv"}
    candidates = [("fixed + a sample of the space", {**ss.fixed, **sample_point(ss)})]
    candidates += [(f"searcher.start_with[{i}]", {**ss.fixed, **sample_point(ss, i + 1), **p})
                   for i, p in enumerate(ss.searcher.get("start_with", []) or [])]
    if reference is not None:
        candidates.append(("the recipe (reference trial)", dict(reference)))
    for what, flat in candidates:
        try:
            TrialConfig.from_flat({**flat, **placeholders})
        except ValueError as exc:
            raise SearchSpaceError(f"{ss.path}: {what}: {exc}") from None

