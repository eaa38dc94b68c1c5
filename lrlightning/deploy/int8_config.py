"""How a model is quantized to int8 (``quantize_int8``, ``lrl-train deploy=int8``): one validated options object,
whose ``"auto"`` settings are chosen from the instruction sets of the CPU it runs on (``lrlightning.speed.cpu``).
Pure Python."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from ..speed.cpu import int8_path

WEIGHT_RANGES = ("auto", "full", "reduced")
ACTIVATION_TYPES = ("auto", "uint8", "int8")
LAYER_CHOICES = ("measured", "all")

# (weight range, activation type, why) by how int8 dot products run (``int8_path``). uint8 activations everywhere:
# the CPU kernels multiply u8 by s8 (int8 activations ran 1.4-2x slower than fp32 on an AVX2 AMD EPYC).
AUTO_CHOICES = {
    "avx2": ("reduced", "uint8", "AVX2 without VNNI: vpmaddubsw sums pairs of u8 x s8 products in 16 bits, which "
                                 "full-range weights saturate, so weights use 7 bits"),
    "vnni": ("full", "uint8", "VNNI: u8 x s8 products accumulate in 32 bits without saturating, so weights use all "
                              "8 bits"),
    "amx": ("full", "uint8", "AMX-int8: tiles accumulate in 32 bits without saturating, so weights use all 8 bits"),
    "none": ("reduced", "uint8", "no AVX2: the safe setting, 7-bit weights"),
}


@dataclass(frozen=True)
class Int8Config:
    """How ``quantize_int8`` writes an int8 model (ONNX Runtime static quantization, QDQ).

    ``weight_range``: ``"full"`` (8-bit weights), ``"reduced"`` (7-bit, for CPUs whose u8 x s8 kernels can saturate
    pairs of products) or ``"auto"`` (default: by the CPU's instruction sets, ``AUTO_CHOICES``).
    ``activations``: ``"uint8"``, ``"int8"`` or ``"auto"`` (default: uint8). ``per_channel``: one weight scale per
    output channel (default True). ``layers``: ``"measured"`` (default: a weight layer runs in int8 only where its
    int8 form measured faster than its float form in ONNX Runtime, ``lrlightning.deploy.precision``) or ``"all"``.
    ``float_layers``: names of modules kept in float whatever their timing (e.g. where int8 costs accuracy).
    ``cache`` and ``remeasure``: the directory of the timing cache (default as ``lrlightning.Latency``) and whether
    to time cached layers anew."""

    weight_range: str = "auto"
    activations: str = "auto"
    per_channel: bool = True
    layers: str = "measured"
    float_layers: tuple[str, ...] = ()
    cache: str | None = None
    remeasure: bool = False

    def __post_init__(self):
        for name, allowed in (("weight_range", WEIGHT_RANGES), ("activations", ACTIVATION_TYPES),
                              ("layers", LAYER_CHOICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`Int8Config.{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("per_channel", "remeasure"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`Int8Config.{name}` must be a bool, got {getattr(self, name)!r}")
        names = (self.float_layers,) if isinstance(self.float_layers, str) else self.float_layers
        if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) and n for n in names)):
            raise ValueError(f"`Int8Config.float_layers` must be a list of module names, got {self.float_layers!r}")
        object.__setattr__(self, "float_layers", tuple(names))
        if self.cache is not None:
            if not isinstance(self.cache, (str, os.PathLike)):
                raise ValueError(f"`Int8Config.cache` must be a directory path, got {self.cache!r}")
            object.__setattr__(self, "cache", os.fspath(self.cache))

    @classmethod
    def of(cls, value: "Int8Config | Mapping[str, Any] | None", argument: str = "int8") -> "Int8Config":
        """``value`` as an ``Int8Config``: itself, the default for None, or built from a mapping of its fields
        (a config node); an unknown key is a ValueError naming ``argument`` and the allowed keys."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"`{argument}` must be an Int8Config or a mapping of its fields, got {value!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"`{argument}` has unknown keys {unknown}; allowed: {', '.join(allowed)}")
        data = dict(value)
        if data.get("float_layers") is not None and not isinstance(data["float_layers"], str):
            data["float_layers"] = tuple(data["float_layers"])
        return cls(**{key: item for key, item in data.items() if item is not None})

    def resolved(self, path: str | None = None) -> "Int8Config":
        """A copy with ``"auto"`` replaced by the choice for ``path`` (how int8 runs: ``"avx2"``, ``"vnni"``,
        ``"amx"`` or ``"none"``; default: this CPU's, ``lrlightning.speed.cpu.int8_path``)."""
        weight_range, activations, _ = AUTO_CHOICES[path or int8_path()]
        return replace(self, weight_range=weight_range if self.weight_range == "auto" else self.weight_range,
                       activations=activations if self.activations == "auto" else self.activations)

    def why(self, path: str | None = None) -> str:
        """Why the settings are what they are on ``path`` (default: this CPU): the ``AUTO_CHOICES`` reason, or that
        they were asked for."""
        path = path or int8_path()
        asked = [f"{name}={getattr(self, name)!r}" for name in ("weight_range", "activations")
                 if getattr(self, name) != "auto"]
        reason = f"int8 path {path}: {AUTO_CHOICES[path][2]}"
        return reason + (f"; asked for {', '.join(asked)}" if asked else "")
