"""Pretrained weights for the registry's models: the local cache, a bounded download, or one warning.

What ``pretrained`` (a trial's config, ``create_model(pretrained=...)``) can say:

* ``None``, ``False``, ``"none"``: random initialisation.
* ``"imagenet"``: torchvision's ``IMAGENET1K_V1`` weights of the architecture (the
  tutorial's transfer-learning recipe). Read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/<file>``, torchvision's own cache) when the file is there;
  otherwise downloaded once through torchvision's weights API -- the Weights enum's URL and
  the sha256 prefix in its file name, fetched by ``torch.hub.download_url_to_file``, which
  checks the hash and publishes the file atomically -- with a socket timeout
  (``COVID_RAY_DOWNLOAD_TIMEOUT_S``, default 10 s) on connecting and on every read. With
  no network: one warning and a random initialisation, never a hang; a marker beside the
  cache then spares the other trials on this machine the same wait for an hour.
  ``COVID_RAY_WEIGHTS_MIRROR=https://host/path/`` fetches the same file names from a mirror
  (a cluster without internet access but with an internal one).
* ``True``, ``"torchvision"``: the cache file only, never a download (machines that must not
  reach the network).
* a path: a local ``state_dict`` file.

Loading adapts the first convolution to the model's input channels (a 3-channel ImageNet
kernel summed to 1 channel for grayscale radiographs, as timm does) and re-initialises the
classifier when the number of classes differs. The ``entry`` arguments are
:class:`covid_ray.models.ModelEntry` objects (first conv, classifier, key fix-ups, weights).
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
CACHE_ONLY = ("torchvision", True)
NONE = (None, False, "none")
TIMEOUT_ENV, MIRROR_ENV = "COVID_RAY_DOWNLOAD_TIMEOUT_S", "COVID_RAY_WEIGHTS_MIRROR"
DEFAULT_TIMEOUT_S = 10.0
OFFLINE_RETRY_S = 3600.0  # after a failed download, how long this machine stops trying that host


def imagenet_url(entry) -> str | None:
    """The download URL of ``entry``'s ImageNet weights (mirror applied), or None when it has none."""
    if entry.weights is None:
        return None
    import torchvision.models as tvm

    url = getattr(tvm, entry.weights).IMAGENET1K_V1.url
    mirror = os.environ.get(MIRROR_ENV)
    return urllib.parse.urljoin(mirror.rstrip("/") + "/", os.path.basename(url)) if mirror else url


def cache_path(entry) -> Path | None:
    """Where torchvision caches ``entry``'s ImageNet weights (``torch.hub.get_dir()/checkpoints``)."""
    url = imagenet_url(entry)
    return None if url is None else Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _offline_marker(url: str) -> Path:
    host = urllib.parse.urlsplit(url).netloc.replace(":", "_") or "local"
    return Path(torch.hub.get_dir()) / "checkpoints" / f".unreachable-{host}"


def download(url: str, dest: Path, *, timeout: float | None = None) -> Path:
    """Fetch ``url`` to ``dest`` with a timeout on connecting and on every read, checking its sha256 prefix.

    Raises:
        OSError: no connection, a timeout, or an HTTP error.
        RuntimeError: the file's hash does not match the prefix in its name.
    """
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)) if timeout is None else timeout
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    dest.parent.mkdir(parents=True, exist_ok=True)
    # torch.hub's urlopen takes no timeout; the socket default applies to it. Set only for
    # this call: a download runs once per machine, before training starts.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=match.group(1) if match else None, progress=False)
    finally:
        socket.setdefaulttimeout(previous)
    return dest


def fetch_imagenet(entry, *, timeout: float | None = None) -> tuple[Path | None, str]:
    """(the cached weights file, "") or (None, why not): the cache, else one bounded download.

    A failed download leaves a marker so that, for :data:`OFFLINE_RETRY_S`, other calls on
    this machine give up at once instead of waiting for the same timeout.
    """
    from filelock import FileLock

    path = cache_path(entry)
    if path is None:
        return None, f"model {entry.name!r} has no torchvision ImageNet weights"
    if path.is_file():
        return path, ""
    url = imagenet_url(entry)
    marker = _offline_marker(url)
    if marker.is_file() and time.time() - marker.stat().st_mtime < OFFLINE_RETRY_S:
        return None, f"{urllib.parse.urlsplit(url).netloc} was unreachable recently ({marker.read_text().strip()})"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # two trials on one node download once
        if path.is_file():
            return path, ""
        try:
            download(url, path, timeout=timeout)
        except (OSError, RuntimeError) as exc:  # URLError, timeouts and HTTP errors are OSErrors
            reason = f"download of {url} failed: {type(exc).__name__}: {exc}"
            if isinstance(exc, OSError):
                marker.write_text(reason + "\n")
            return None, reason
    marker.unlink(missing_ok=True)
    logger.info("downloaded %s to %s", url, path)
    return path, ""


def resolve(entry, pretrained: Any, *, stacklevel: int = 2) -> Path | None:
    """The weights file to load for ``pretrained``, or None for random init (with one warning when asked for weights)."""
    if pretrained in NONE:
        return None
    if pretrained == IMAGENET or pretrained in CACHE_ONLY:
        if pretrained == IMAGENET:
            path, why = fetch_imagenet(entry)
        else:
            path = cache_path(entry)
            why = (f"model {entry.name!r} has no torchvision pretrained weights" if path is None else
                   f"pretrained weights for {entry.name!r} not found at {path} (pretrained={pretrained!r} reads "
                   "the cache only; pretrained='imagenet' downloads them)")
            path = path if path is not None and path.is_file() else None
        if path is None:
            warnings.warn(f"{why}; using random init", stacklevel=stacklevel)
        return path
    path = Path(pretrained)
    if not path.is_file():
        warnings.warn(f"pretrained weights for {entry.name!r} not found at {path}; using random init",
                      stacklevel=stacklevel)
        return None
    return path


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """Adapt a first-conv kernel ``(out, c, kh, kw)`` to ``in_chans`` input channels.

    As timm's ``adapt_input_conv``: to 1 channel, sum over the input channels (a
    gray image replicated to RGB gives the same pre-activation); to another count
    from 1 or 3 channels, repeat the channels cyclically and rescale by
    ``c / in_chans`` so the expected activation is unchanged.
    """
    src = conv_weight.shape[1]
    if src == in_chans:
        return conv_weight
    dtype = conv_weight.dtype
    weight = conv_weight.float()
    if in_chans == 1:
        weight = weight.sum(dim=1, keepdim=True)
    elif src in (1, 3):
        repeat = math.ceil(in_chans / src)
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (src / in_chans)
    else:
        raise ValueError(f"cannot adapt a first conv with {src} input channels to {in_chans}")
    return weight.to(dtype)


def load_into(model: nn.Module, entry, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``model``, an ``entry`` model built by the registry.

    The first-conv kernel is adapted to the model's input channels, and the
    final classifier is dropped (left at its fresh init) when its shape differs.
    Any other missing, unexpected or mis-shaped key raises RuntimeError.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in several types
        raise RuntimeError(f"cannot read pretrained weights {path}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    state = dict(state)
    if entry.remap_keys is not None:
        state = entry.remap_keys(state)

    own = model.state_dict()
    conv_key = f"{entry.first_conv}.weight"
    if conv_key in state and conv_key in own:
        before = state[conv_key].shape[1]
        state[conv_key] = adapt_input_conv(own[conv_key].shape[1], state[conv_key])
        if before != own[conv_key].shape[1]:
            logger.info("adapted %s from %d to %d input channels", conv_key, before, own[conv_key].shape[1])

    head_keys = {f"{entry.classifier}.weight", f"{entry.classifier}.bias"}
    dropped = sorted(k for k in head_keys if k in state and k in own and state[k].shape != own[k].shape)
    for key in dropped:
        del state[key]

    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise RuntimeError(f"shape mismatch loading {path} into {entry.name}: {'; '.join(mismatched)}")
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - set(dropped))
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path} does not match {entry.name}: missing keys {missing}, "
            f"unexpected keys {sorted(result.unexpected_keys)}"
        )
    logger.info("loaded pretrained %s from %s (re-initialised: %s)", entry.name, path, dropped or "none")
