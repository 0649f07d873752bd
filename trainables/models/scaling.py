"""EfficientNet compound scaling: depth, width and resolution from one coefficient.

Compound scaling (Tan & Le, 2019) grows a baseline network with one coefficient
``phi``: depth by ``alpha ** phi``, width by ``beta ** phi`` and input resolution by
``gamma ** phi``. Under ``alpha * beta**2 * gamma**2 ≈ 2`` every unit of ``phi``
roughly doubles the FLOPs, because FLOPs grow linearly with depth and
quadratically with width and resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "ScaledCoefficients",
    "compound_coefficients",
    "flops_constraint_ok",
    "flops_ratio",
    "resolve_efficientnet_coefficients",
]

# The paper's grid-searched coefficients for B0 -> B1.
DEFAULT_ALPHA = 1.2
DEFAULT_BETA = 1.1
DEFAULT_GAMMA = 1.15

# Resolutions are kept at multiples of 8 (friendly to kernels and to the five
# stride-2 stages) and at least the network's total stride.
_RESOLUTION_STEP = 8
_MIN_RESOLUTION = 32
_BASE_RESOLUTION = 224  # EfficientNet-B0's input side
_FREE_KEYS = ("width_mult", "depth_mult", "resolution")
_COMPOUND_KEYS = ("phi", "alpha", "beta", "gamma")


@dataclass(frozen=True)
class ScaledCoefficients:
    """Multipliers for a baseline network and the input resolution that goes with them.

    Attributes:
        width_mult: Channel multiplier (``beta ** phi``).
        depth_mult: Layer-count multiplier (``alpha ** phi``).
        resolution: Input side in pixels (``base * gamma ** phi``, to a multiple of 8).
    """

    width_mult: float
    depth_mult: float
    resolution: int


def _check_coefficient(name: str, value: float) -> None:
    # The paper constrains alpha, beta, gamma >= 1: scaling up must never shrink a dimension.
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 1.0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 1")


def compound_coefficients(
    *,
    phi: float,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    gamma: float = DEFAULT_GAMMA,
    base_resolution: int = _BASE_RESOLUTION,
) -> ScaledCoefficients:
    """Depth, width and resolution for compound coefficient ``phi``.

    Args:
        phi: Compound coefficient; 0 is the baseline, each +1 about doubles FLOPs.
        alpha: Depth base.
        beta: Width base.
        gamma: Resolution base.
        base_resolution: Input side of the baseline network.

    Returns:
        ``depth_mult = alpha**phi``, ``width_mult = beta**phi`` and
        ``resolution = base_resolution * gamma**phi`` rounded to the nearest multiple of 8.

    Raises:
        ValueError: ``phi`` is not finite, a base is below 1, or the resolution is not positive.
    """
    if not (isinstance(phi, int | float) and math.isfinite(phi)):
        raise ValueError(f"phi={phi!r} must be a finite number")
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        _check_coefficient(name, value)
    if not isinstance(base_resolution, int) or base_resolution < 1:
        raise ValueError(f"base_resolution={base_resolution!r} must be a positive integer")
    raw = base_resolution * gamma**phi
    # floor(x + 0.5) rounds halves up; round() would round them to even.
    resolution = _RESOLUTION_STEP * math.floor(raw / _RESOLUTION_STEP + 0.5)
    return ScaledCoefficients(
        width_mult=beta**phi,
        depth_mult=alpha**phi,
        resolution=max(resolution, _MIN_RESOLUTION),
    )


def _positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


def resolve_efficientnet_coefficients(
    *,
    width_mult: float | None = None,
    depth_mult: float | None = None,
    resolution: int | None = None,
    phi: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
) -> ScaledCoefficients:
    """Coefficients of a free EfficientNet, given directly or through ``phi``.

    Either give ``width_mult``, ``depth_mult`` and ``resolution`` (each defaulting
    to B0's 1.0, 1.0, 224), or ``phi`` with optional ``alpha``, ``beta``, ``gamma``
    (defaulting to the paper's values) for :func:`compound_coefficients`.

    Raises:
        ValueError: Both kinds are mixed, ``alpha``/``beta``/``gamma`` come without
            ``phi``, or a value is out of range.
    """
    given = (width_mult, depth_mult, resolution)
    free = [k for k, v in zip(_FREE_KEYS, given, strict=True) if v is not None]
    given = (phi, alpha, beta, gamma)
    compound = [k for k, v in zip(_COMPOUND_KEYS, given, strict=True) if v is not None]
    if free and compound:
        raise ValueError(
            f"efficientnet takes either {list(_FREE_KEYS)} or {list(_COMPOUND_KEYS)}, "
            f"not both; got {free} and {compound}"
        )
    if compound:
        if phi is None:
            raise ValueError(f"{compound} need phi, the compound coefficient they are raised to")
        return compound_coefficients(
            phi=phi,
            alpha=DEFAULT_ALPHA if alpha is None else alpha,
            beta=DEFAULT_BETA if beta is None else beta,
            gamma=DEFAULT_GAMMA if gamma is None else gamma,
        )
    if resolution is not None and (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or resolution < _MIN_RESOLUTION
    ):
        raise ValueError(f"resolution={resolution!r} must be an integer >= {_MIN_RESOLUTION}")
    return ScaledCoefficients(
        width_mult=1.0 if width_mult is None else _positive("width_mult", width_mult),
        depth_mult=1.0 if depth_mult is None else _positive("depth_mult", depth_mult),
        resolution=_BASE_RESOLUTION if resolution is None else resolution,
    )


def flops_ratio(alpha: float, beta: float, gamma: float) -> float:
    """FLOPs growth per unit of ``phi``: ``alpha * beta**2 * gamma**2``."""
    return alpha * beta**2 * gamma**2


def flops_constraint_ok(alpha: float, beta: float, gamma: float, *, tolerance: float = 0.1) -> bool:
    """Whether ``alpha * beta**2 * gamma**2`` is within ``tolerance`` of 2.

    Args:
        alpha: Depth base.
        beta: Width base.
        gamma: Resolution base.
        tolerance: Largest accepted absolute difference from 2.

    Returns:
        True when the coefficients satisfy the paper's constraint.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0")
    return abs(flops_ratio(alpha, beta, gamma) - 2.0) <= tolerance
