"""What an SAE is: its size and two registered parts, an encoder and a sparsity, each with its own config.

An SAE's config says which parts it has (``encoder.name``, ``sparsity.name``) and their settings; it is saved
inside every checkpoint (`trsae.saes.sae.SAE.save`). A part registers itself with `register_part`, which puts
its config class and its module class under one name; nothing else in the package branches on a part's name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar

KINDS = ("encoder", "sparsity")
_PARTS: dict[str, dict[str, tuple[type["PartConfig"], type]]] = {kind: {} for kind in KINDS}


def check_int(name: str, value: Any, lo: int | None = None) -> None:
    """Raise ValueError unless `value` is an int (not a bool) and at least `lo`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value} must be >= {lo}")


def check_float(name: str, value: Any, lo: float | None = None) -> None:
    """Raise ValueError unless `value` is a finite number and at least `lo`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value} must be >= {lo}")


def check_bools(cfg: Any, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(cfg, name)!r}")


@dataclass
class PartConfig:
    """Base of a part's config. Subclasses are dataclasses whose fields have docstrings, checked in
    `__post_init__`; defaults that depend on the SAE's size are filled by `resolve`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on a bad value (fields that may still be None are checked in `resolve`)."""

    def resolve(self, d_in: int, width: int) -> None:
        """Fill the defaults that depend on d_in / width and check values against them."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def register_part(kind: str, name: str, config_class: type[PartConfig]) -> Callable[[type], type]:
    """Class decorator for a part's module: `make_part` builds it for configs of `config_class`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(module_class: type) -> type:
        config_class.name, config_class.kind = name, kind
        module_class.config_class = config_class
        _PARTS[kind][name] = (config_class, module_class)
        return module_class

    return deco


def part_names(kind: str) -> list[str]:
    return sorted(_PARTS[kind])


def part_classes(kind: str, name: str) -> tuple[type[PartConfig], type]:
    """(config class, module class) registered for a part."""
    if name not in _PARTS[kind]:
        raise ValueError(f"unknown {kind} {name!r}: expected one of {part_names(kind)}")
    return _PARTS[kind][name]


def part_config(kind: str, spec: "PartConfig | str | dict[str, Any]", **kw: Any) -> PartConfig:
    """A part config from a config, a registered name (defaults, overridden by `kw`) or a dict with "name"."""
    if isinstance(spec, PartConfig):
        if spec.kind != kind:
            raise ValueError(f"{type(spec).__name__} is a {spec.kind} config, not a {kind} config")
        return dataclasses.replace(spec, **kw)  # a copy: resolving defaults never mutates a shared config
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name is None:
            raise ValueError(f"a {kind} config needs its 'name' (one of {part_names(kind)})")
        kw = {**spec, **kw}
    else:
        name = spec
    cls = part_classes(kind, name)[0]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"{kind} {name!r} has no field(s) {unknown}; its fields: {sorted(known)}")
    return cls(**kw)


@dataclass
class SAEConfig:
    """An SAE: ``x_hat = W_dec f + b_dec`` with ``f = sparsity(encoder(x))``. Saved with every checkpoint."""

    d_in: int
    """Width D of the input activations."""
    width: int
    """Number of latents F."""
    sparsity: Any = "topk"
    """The sparsity part: a registered name or its config (e.g. `TopKConfig(k=32)`)."""
    encoder: Any = "token"
    """The encoder part: "token" (per-token affine map) or a temporal encoder's name or config."""
    input_scale: float = 1.0
    """Scalar s such that ``E||s x||^2 = d_in`` on the training split. Inputs to forward/encode are already
    scaled; `SAE.reconstruct` takes raw activations and applies and undoes s."""
    seed: int = 0
    """Seed of the parameter initialisation."""

    def __post_init__(self) -> None:
        check_int("d_in", self.d_in, lo=1)
        check_int("width", self.width, lo=1)
        check_float("input_scale", self.input_scale)
        if self.input_scale <= 0:
            raise ValueError(f"input_scale={self.input_scale} must be > 0")
        check_int("seed", self.seed)
        self.sparsity = part_config("sparsity", self.sparsity)
        self.encoder = part_config("encoder", self.encoder)
        self.sparsity.resolve(self.d_in, self.width)
        self.encoder.resolve(self.d_in, self.width)

    @classmethod
    def build(cls, d_in: int, width: int, sparsity: str = "topk", encoder: str = "token", **kw: Any) -> "SAEConfig":
        """Flat construction: each keyword goes to the SAE or to the part that has a field of that name,
        e.g. ``SAEConfig.build(640, 5120, "topk", "trsae", k=32, window=16)``."""
        top = {f.name for f in fields(cls)}
        parts: dict[str, dict[str, Any]] = {"sparsity": {}, "encoder": {}}
        own = {kind: {f.name for f in fields(part_classes(kind, name)[0])}
               for kind, name in (("sparsity", sparsity), ("encoder", encoder))}
        for key, value in kw.items():
            for kind in ("sparsity", "encoder"):
                if key in own[kind]:
                    parts[kind][key] = value
                    break
            else:
                if key not in top:
                    raise ValueError(f"{key!r} is not a setting of an SAE, of the {sparsity!r} sparsity or of "
                                     f"the {encoder!r} encoder")
        rest = {k: v for k, v in kw.items() if k in top}
        return cls(d_in=d_in, width=width, sparsity=part_config("sparsity", sparsity, **parts["sparsity"]),
                   encoder=part_config("encoder", encoder, **parts["encoder"]), **rest)

    def replace(self, **kw: Any) -> "SAEConfig":
        """A copy with fields changed, each routed to the SAE or to the part that has it (`build` rules)."""
        return SAEConfig.build(**{**self.flat(), **kw})

    def flat(self) -> dict[str, Any]:
        """Every setting in one mapping, with the part names as "sparsity" and "encoder" (`build`'s input)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sparsity", "encoder")}
        for kind in ("sparsity", "encoder"):
            part = getattr(self, kind)
            out.update(asdict(part))
            out[kind] = part.name
        return out

    @property
    def label(self) -> str:
        """Short name: the sparsity's name for a per-token SAE, else "<encoder>-<sparsity>"."""
        return self.sparsity.name if self.encoder.name == "token" else f"{self.encoder.name}-{self.sparsity.name}"

    @property
    def k(self) -> int:
        """Active latents per token of a TopK-style sparsity (AttributeError for ReLU + L1)."""
        return self.sparsity.k

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sparsity"], out["encoder"] = self.sparsity.to_dict(), self.encoder.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**d)
