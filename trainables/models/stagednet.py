"""The network every backbone is: :class:`StagedNet`, ordered stages and then a head.

Freezing and per-stage learning rates (:mod:`trainables.optim`) are derived from the one
``stages`` list; the head's last ``nn.Linear`` is the classifier that fine-tuning replaces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "StagedNet",
    "check_num_classes",
    "eval_mode",
    "kept_training_modes",
    "last_linear_name",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class StagedNet(nn.Module):
    """A backbone as an ordered list of stages, then a head.

    Attributes:
        stages: Stem first, then each block group (and a final conv stage where the
            network has one).
        head: Pooling, flatten and classifier; its last ``nn.Linear`` gives the scores.
        name: Registry name of the backbone.
        resolution: Default input side in pixels.
        mean: Per-channel input mean for ``[0, 1]`` images, matching the weights.
        std: Per-channel input standard deviation, matching the weights.
    """

    def __init__(
        self,
        *,
        name: str,
        stages: Sequence[nn.Module],
        head: nn.Module,
        resolution: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.name = name
        self.resolution = resolution
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.stages = nn.ModuleList(stages)
        self.head = head
        last_linear_name(head)  # fail at construction, not at the first reset

    @property
    def classifier(self) -> nn.Linear:
        """The last ``nn.Linear`` of the head."""
        return self.head.get_submodule(last_linear_name(self.head))

    @property
    def num_classes(self) -> int:
        """Number of outputs of the classifier."""
        return self.classifier.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head's last ``nn.Linear`` by a freshly initialised one.

        Args:
            num_classes: Outputs of the new layer.
        """
        check_num_classes(num_classes)
        path = last_linear_name(self.head)
        old = self.classifier
        new = nn.Linear(
            old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype
        )
        if not path:  # the head is a bare nn.Linear
            self.head = new
            return
        parent_path, _, child = path.rpartition(".")
        setattr(self.head.get_submodule(parent_path), child, new)

    def forward_stages(self, x: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Runs ``stages[start:end]`` on ``x``."""
        for stage in self.stages[start:end]:
            x = stage(x)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """Class scores from the output of the last stage."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_stages(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, resolution={self.resolution}"


def last_linear_name(head: nn.Module) -> str:
    """Dotted path of the last ``nn.Linear`` in ``head`` (``""`` when head is one)."""
    name = None
    for module_name, module in head.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise ValueError("the head of a StagedNet must contain an nn.Linear classifier")
    # A bare nn.Linear head is its own classifier; get_submodule("") returns it.
    return name


def check_num_classes(num_classes: int) -> None:
    """Raise a ValueError unless ``num_classes`` is an integer >= 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")


@contextlib.contextmanager
def kept_training_modes(module: nn.Module) -> Iterator[None]:
    """Restores every submodule's train/eval flag on exit, whatever the block set.

    Per module, not just the root's: frozen stages keep their norm layers in eval mode
    during training, and a blanket ``.train()`` afterwards would undo that.
    """
    modes = {m: m.training for m in module.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block; every flag as it was afterwards."""
    with kept_training_modes(module):
        module.eval()
        yield
