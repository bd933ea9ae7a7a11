"""Models: named components, each a profile with its parameters; YAML model files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .errors import ModelError
from .params import Parameter, ParameterLayout, Tie
from .profiles import Profile, get_profile

__all__ = ["Component", "Model", "load_model"]


@dataclass
class Component:
    """One component of a model: a profile and its parameters (by name)."""

    name: str
    profile: Profile
    params: dict[str, Parameter] = field(default_factory=dict)

    def __post_init__(self):
        if "." in self.name or not self.name:
            raise ModelError(f"component name {self.name!r} must be non-empty and contain no '.'")
        for pname in self.params:
            self.profile.spec(pname)  # raises for unknown parameters
        for spec in self.profile.params:
            self.params.setdefault(spec.name, Parameter())
            p = self.params[spec.name]
            if p.value is None and p.tie is None and spec.default is None:
                raise ModelError(
                    f"component {self.name!r} ({self.profile.name}): parameter {spec.name!r} needs a value"
                )


@dataclass
class Model:
    """A model: ordered components and the magnitude zeropoint.

    Parameters
    ----------
    components : sequence of Component
    zeropoint : float
        ``mag = -2.5 log10(total flux) + zeropoint`` (flux in image units).
    """

    components: list[Component]
    zeropoint: float = 0.0

    def __post_init__(self):
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ModelError(f"component names must be unique, got {names}")
        if not self.components:
            raise ModelError("a model needs at least one component")

    def __getitem__(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def parameter_names(self) -> list[str]:
        """Every parameter as ``"component.param"``, in model order."""
        return [f"{c.name}.{s.name}" for c in self.components for s in c.profile.params]

    def layout(self, batch_size: int = 1, *, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> ParameterLayout:
        """The :class:`~galprof.params.ParameterLayout` of this model for ``batch_size`` galaxies."""
        entries = [(f"{c.name}.{s.name}", s, c.params[s.name]) for c in self.components for s in c.profile.params]
        return ParameterLayout(entries, batch_size, dtype=dtype, device=device)

    # -- construction from plain data ------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping) -> Model:
        """Build a model from the structure of a YAML model file (see docs/model-files.md)."""
        if not isinstance(data, Mapping) or "components" not in data:
            raise ModelError("a model needs a 'components' mapping")
        comps_in = data["components"]
        if not isinstance(comps_in, Mapping) or not comps_in:
            raise ModelError("'components' must be a non-empty mapping of name -> component")
        unknown = set(data) - {"zeropoint", "components"}
        if unknown:
            raise ModelError(f"unknown top-level keys in model: {sorted(unknown)}")
        components = []
        for cname, cdata in comps_in.items():
            if not isinstance(cdata, Mapping) or "profile" not in cdata:
                raise ModelError(f"component {cname!r} needs a 'profile'")
            profile = get_profile(str(cdata["profile"]))
            params = {}
            for pname, pval in cdata.items():
                if pname == "profile":
                    continue
                params[pname] = _parse_parameter(f"{cname}.{pname}", pval)
            components.append(Component(str(cname), profile, params))
        zp = data.get("zeropoint", 0.0)
        try:
            zp = float(zp)
        except (TypeError, ValueError):
            raise ModelError(f"zeropoint must be a number, got {zp!r}") from None
        model = cls(components, zp)
        model.layout(1)  # validates ties (unknown names, cycles) and values
        return model

    def to_dict(self) -> dict:
        """The inverse of :meth:`from_dict` (scalar values only)."""
        out = {"zeropoint": self.zeropoint, "components": {}}
        for c in self.components:
            d: dict = {"profile": c.profile.name}
            for s in c.profile.params:
                p = c.params[s.name]
                entry: dict = {}
                if p.tie is not None:
                    if not isinstance(p.tie.expr, str):
                        raise ModelError(f"{c.name}.{s.name}: a callable tie cannot be written to a file")
                    entry["tie"] = p.tie.expr
                elif p.value is not None:
                    v = torch.as_tensor(p.value, dtype=torch.float64)   # no float32 round trip
                    entry["value"] = float(v.reshape(-1)[0]) if v.numel() == 1 else v.tolist()
                if p.fixed is not None:
                    entry["fixed"] = bool(p.fixed)
                if p.bounds is not None:
                    entry["bounds"] = list(p.bounds)
                if entry:
                    d[s.name] = entry["value"] if set(entry) == {"value"} else entry
            out["components"][c.name] = d
        return out


def _parse_parameter(key: str, value) -> Parameter:
    if isinstance(value, Mapping):
        unknown = set(value) - {"value", "fixed", "bounds", "tie"}
        if unknown:
            raise ModelError(f"{key}: unknown keys {sorted(unknown)} (allowed: value, fixed, bounds, tie)")
        bounds = value.get("bounds")
        if bounds is not None:
            if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
                raise ModelError(f"{key}: bounds must be [lower, upper], got {bounds!r}")
            bounds = tuple(None if b is None else float(b) for b in bounds)
        tie = value.get("tie")
        if tie is not None:
            tie = Tie(str(tie))
        v = value.get("value")
        if v is not None and not isinstance(v, (int, float, list)):
            raise ModelError(f"{key}: value must be a number, got {v!r}")
        fixed = value.get("fixed")
        if fixed is not None and not isinstance(fixed, bool):
            raise ModelError(f"{key}: fixed must be true or false, got {fixed!r}")
        return Parameter(value=v, fixed=fixed, bounds=bounds, tie=tie)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"{key}: expected a number or a mapping with value/fixed/bounds/tie, got {value!r}")
    return Parameter(value=float(value))


def load_model(source: str | os.PathLike | Mapping) -> Model:
    """Read a model from a YAML file path, a YAML string, or a mapping."""
    if isinstance(source, Mapping):
        return Model.from_dict(source)
    text = None
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                            and Path(source).suffix in (".yaml", ".yml")):
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} does not exist")
        text = path.read_text()
    else:
        text = str(source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelError(f"model file is not valid YAML: {exc}") from None
    return Model.from_dict(data)
