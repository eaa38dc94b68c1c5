"""``factorize``: a new model with every selected layer replaced by its exact factorized module; save and load
factorized models as plain tensors plus a structure spec (no pickled classes)."""
from __future__ import annotations

import copy
import os
import pickle
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .layers import FactorizedLayer
from .names import canonical_name, canonical_state_dict, get_module, load_canonical_state_dict, set_module
from .objectives import WEIGHT, Objective
from .options import LowRankOptions, Selection, Solver, requested
from .rules import DEFAULT_RULE, RankRule
from .plan import LayerPlan, Plan, layer_scheme, plan_layers, unpacked
from .projection import planned_with_statistics, project_planned_
from .schemes import Scheme, layer_from_spec

FORMAT = "lrlightning.factorized/1"


def factorize(model: nn.Module, scheme: Scheme | str = "svd", rank: RankRule = DEFAULT_RULE, *,
              objective: Objective = WEIGHT, layers: Selection | None = None, solver: Solver | None = None,
              options: LowRankOptions | None = None, calibration: Iterable[Any] | None = None,
              forward: Callable[[nn.Module, Any], Any] | None = None) -> nn.Module:
    """A copy of ``model`` whose selected layers are replaced by factorized modules; ``model`` is untouched.

    ``scheme``, ``rank``, ``objective``, ``layers`` and ``solver`` as in ``LowRankOptions``, or all of them in
    one ``options=LowRankOptions(...)`` (shared with ``LowRankProjection``; a trained callback's own ``factorize``
    reuses its plans). Each replaced
    layer computes exactly what the dense layer computes with its weight projected at that rank, so a model
    trained with the callback gives the same outputs (float32: max abs logit difference ~1e-5). Layers that
    would not shrink stay dense, with a warning naming them. A ``torch.compile``d ``model`` gives a compiled copy;
    layer names never contain ``_orig_mod`` (see ``lrlightning.names``). Raises ``NonFiniteWeightError`` naming
    the first selected layer whose weight holds NaN or Inf.
    With an ``Activation`` objective the weights are first projected (on a copy) to keep the layers' outputs on
    ``calibration`` batches (``forward(model, batch)``, default ``model(batch)``; see ``project_``); a ``Budget``
    is then allocated from the layers' output errors on them.
    """
    opts = requested(options, scheme, rank, objective, layers, solver)
    if opts.weighted:
        plans, statistics = planned_with_statistics(model, opts, calibration, forward)
        model = copy.deepcopy(model)
        project_planned_(model, plans, opts, statistics)
    else:
        plans = plan_layers(model, opts)[0]
    return factorize_planned(model, plans, opts)


def factorize_planned(model: nn.Module, plans: Plan | list[LayerPlan],
                      options: LowRankOptions | None = None) -> nn.Module:
    """``factorize`` at a ``Plan`` (or layer plans with their ``options``; names relative to ``model``, e.g. a
    callback's ``plans`` made relative with ``relative_plans``), without planning again; ``model`` is untouched."""
    plans, options = unpacked(plans, options)
    result = copy.deepcopy(model)
    for plan in plans:
        dense = get_module(result, plan.name)
        set_module(result, plan.name, layer_scheme(plan, options).factorized_layer(dense, plan.rank))
    return result


def structure_spec(model: nn.Module) -> dict[str, dict]:
    """``{canonical module name: layer spec}`` for every factorized module of ``model``."""
    specs, inside = {}, ()
    for name, module in model.named_modules():
        name = canonical_name(name)
        if inside and any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, FactorizedLayer):
            specs[name] = module.spec()
            inside = (*inside, name)
    return specs


def save_factorized(model: nn.Module, path: str | os.PathLike, backbone: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None) -> None:
    """Write ``{"format", "layers", "backbone", "metadata", "state_dict"}`` to ``path`` (``torch.save``).

    Everything is tensors and primitives, so ``torch.load(path, weights_only=True)`` reads it. ``backbone``
    (e.g. ``{"name": "resnet20", "num_classes": 10, "in_channels": 1}``) lets ``load_factorized`` rebuild the
    dense skeleton from the package's registry; without it, pass the dense model to ``load_factorized``.
    """
    payload = {
        "format": FORMAT,
        "layers": structure_spec(model),
        "backbone": dict(backbone) if backbone else None,
        "metadata": dict(metadata or {}),
        "state_dict": {k: v.detach().cpu() for k, v in canonical_state_dict(model).items()},
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_factorized(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """The payload ``save_factorized`` wrote to ``path``; a ValueError naming the path when the file is missing,
    unreadable, truncated or not a factorized model saved by lrlightning."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"{name!r} is not a file: `path` must name a factorized model written by save_factorized")
    with open(name, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # neither torch's zip archive nor its legacy pickle
        raise ValueError(f"{name!r} is not a torch file (it starts with {head!r}): `path` must name a factorized "
                         "model written by save_factorized")
    try:
        payload = torch.load(name, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{name!r} is not a factorized model saved by lrlightning: it holds Python objects that "
                         "are not plain tensors (a pickled module or a Lightning checkpoint?); "
                         "save factorized models with save_factorized") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError) as error:
        raise ValueError(f"{name!r} cannot be read as a factorized model (truncated, corrupt or not a torch file: "
                         f"{type(error).__name__}: {error})") from None
    keys = ("format", "layers", "backbone", "state_dict")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or any(k not in payload for k in keys):
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{name!r} is not a factorized model saved by lrlightning (format {FORMAT!r}, "
                         f"found {found!r})")
    return payload


def load_factorized(path: str | os.PathLike, model: nn.Module | None = None, map_location="cpu") -> nn.Module:
    """Rebuild a factorized model saved by ``save_factorized``.

    ``model``: a dense model of the same architecture, plain or ``torch.compile``d (copied, not modified); when
    None, the saved ``backbone`` entry is built with ``lrlightning.zoo.build_backbone``. Raises a ValueError
    naming ``path`` when it is not such a file (see ``read_factorized``).
    """
    payload = read_factorized(path, map_location)
    if model is None:
        if not payload["backbone"]:
            raise ValueError(f"{os.fspath(path)!r} records no `backbone`; pass the dense `model` to load_factorized")
        from .zoo import build_backbone

        info = dict(payload["backbone"])
        model = build_backbone(info.pop("name"), **info)
    else:
        model = copy.deepcopy(model)
    for name, spec in payload["layers"].items():
        set_module(model, name, layer_from_spec(spec))
    load_canonical_state_dict(model, payload["state_dict"])
    return model
