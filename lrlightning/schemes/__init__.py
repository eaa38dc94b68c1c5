"""The low-rank schemes, by name: each one a ``Scheme`` class in its own module, owning its matrix view, its
projection, its rank rules and its exact factorized module.

A scheme is added with ``register(MyScheme)``; from then on its ``name`` is accepted wherever a scheme is
(``LowRankOptions``, ``project_``, ``factorize``, ``LowRankProjection``) and ``load_factorized`` rebuilds its
layers from their spec. A scheme with options of its own validates them in ``__init__`` and reports them in
``options()``; users pass it configured (``TiledSVD(tile_shape=(32, 32))``), or by name when every option has a
default. See docs/adding-a-scheme.md.
"""
from __future__ import annotations

from torch import nn

from .base import MatrixScheme, Rank, Scheme
from .grouped import GroupedScheme
from .linalg import (
    CUSOLVER_DRIVERS,
    SVD_DRIVERS,
    gram_basis,
    low_rank_matrices,
    rank_mask,
    resolve_driver,
    smallest_rank_for_energy,
    split_sqrt,
    truncated_svd,
)
from .spatial_svd import SpatialSVD
from .svd import LoweredSVD
from .tiled_svd import TiledSVD
from .tucker2 import Tucker2
from .weighting import Weighting, output_error

SCHEMES: dict[str, type[Scheme]] = {}


def register(scheme: type[Scheme]) -> type[Scheme]:
    """Make ``scheme`` available under its ``name``; returns it, so it also works as a class decorator."""
    if not (isinstance(scheme, type) and issubclass(scheme, Scheme)):
        raise TypeError(f"`scheme` must be a subclass of Scheme, got {scheme!r}")
    if not (isinstance(scheme.name, str) and scheme.name):
        raise ValueError(f"`scheme.name` must be a non-empty string, got {scheme.name!r} for {scheme.__name__}")
    if scheme.name in SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} is already registered as {SCHEMES[scheme.name].__name__}")
    SCHEMES[scheme.name] = scheme
    return scheme


def scheme_class(name: str) -> type[Scheme]:
    """The registered scheme called ``name``; a ValueError naming the registered ones otherwise."""
    if not isinstance(name, str) or name not in SCHEMES:
        raise ValueError(f"`scheme` must be one of {tuple(SCHEMES)} or a configured Scheme such as "
                         f"Tucker2(hooi_iters=1), got {name!r}")
    return SCHEMES[name]


def scheme_of(value: str | Scheme) -> Scheme:
    """A configured scheme from ``value``: a registered ``Scheme`` instance as it is, or a registered name built
    with its default options; a ValueError naming what is allowed otherwise."""
    if isinstance(value, Scheme):
        if SCHEMES.get(value.name) is not type(value):
            raise ValueError(f"`scheme` {value!r} is not registered under its name {value.name!r}; call "
                             f"lrlightning.schemes.register({type(value).__name__}) first")
        return value
    cls = scheme_class(value)
    try:
        return cls()
    except TypeError as error:
        raise ValueError(f"`scheme`={value!r} needs options of its own ({error}): pass a configured scheme, e.g. "
                         f"{cls.__name__}(...)") from None


def layer_from_spec(spec: dict) -> nn.Module:
    """Rebuild a factorized layer from the ``spec()`` it wrote, through the scheme its spec names."""
    if spec.get("scheme") not in SCHEMES:
        raise ValueError(f"factorized layer spec names scheme {spec.get('scheme')!r}, which is not registered; "
                         f"registered: {tuple(SCHEMES)}")
    return SCHEMES[spec["scheme"]].layer_from_spec(spec)


SCHEME_NAMES = tuple(register(scheme).name for scheme in (LoweredSVD, TiledSVD, Tucker2, SpatialSVD))
"""The built-in schemes; schemes registered later are in ``SCHEMES``."""

__all__ = [
    "SCHEMES",
    "SCHEME_NAMES",
    "SVD_DRIVERS",
    "CUSOLVER_DRIVERS",
    "resolve_driver",
    "GroupedScheme",
    "LoweredSVD",
    "MatrixScheme",
    "Rank",
    "Scheme",
    "SpatialSVD",
    "TiledSVD",
    "Tucker2",
    "Weighting",
    "output_error",
    "gram_basis",
    "layer_from_spec",
    "low_rank_matrices",
    "rank_mask",
    "register",
    "scheme_class",
    "scheme_of",
    "smallest_rank_for_energy",
    "split_sqrt",
    "truncated_svd",
]
