"""Parameters: specifications, bounds as bijections, ties, and the free-parameter layout.

A parameter has a value (a scalar, or one value per galaxy), may be fixed or
free, has bounds, and may be tied to other parameters. The optimiser only
ever sees an unconstrained vector; bounds are enforced by smooth bijections
(never by clamping), so uncertainties computed in that space carry to physical
units through the transform's derivative.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ModelError, ParameterError

__all__ = [
    "ParamSpec",
    "Parameter",
    "Tie",
    "Transform",
    "Identity",
    "Interval",
    "LowerBound",
    "UpperBound",
    "make_transform",
    "ParameterLayout",
    "wrap_pa",
]

def wrap_pa(pa):
    """Position angles in degrees moved by whole turns of 180 degrees into (-90, 90], the range
    in which galprof reports them (an ellipse turned by 180 degrees is the same ellipse)."""
    return 90.0 - np.mod(90.0 - np.asarray(pa, dtype=np.float64), 180.0)


#: Parameter kinds. Lengths are rescaled by the renderer when it works on a finer grid;
#: positions are pixel coordinates (GALFIT convention, see docs/conventions.md).
KINDS = ("x", "y", "length", "mag", "angle", "flux", "other")


@dataclass(frozen=True)
class ParamSpec:
    """Declaration of one profile parameter.

    Parameters
    ----------
    name : str
        Parameter name (GALFIT's where GALFIT has it), e.g. ``"re"``.
    kind : str
        One of ``"x"``, ``"y"`` (pixel coordinates), ``"length"`` (pixels), ``"mag"``,
        ``"angle"`` (degrees), ``"flux"`` (counts per pixel), ``"other"``.
    unit : str
        Unit shown in docs and tables.
    default : float or None
        Value used when the model does not give one; ``None`` means required.
    bounds : (float or None, float or None)
        Default fitting bounds (enforced by a bijection).
    domain : (float or None, float or None)
        Hard validity domain (inclusive); values outside it are rejected.
    fixed : bool
        Whether the parameter is fixed unless the model frees it.
    doc : str
        One-line description.
    """

    name: str
    kind: str = "other"
    unit: str = ""
    default: float | None = None
    bounds: tuple[float | None, float | None] = (None, None)
    domain: tuple[float | None, float | None] = (None, None)
    fixed: bool = False
    doc: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ParamSpec {self.name!r}: kind {self.kind!r} not in {KINDS}")


# ---------------------------------------------------------------------------------------------
# Bijections between an unconstrained value z and a physical value x.


class Transform:
    """A smooth bijection from the real line onto the allowed interval."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def derivative(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """dx/dz at z."""
        raise NotImplementedError


class Identity(Transform):
    def forward(self, z):
        return z

    def inverse(self, x):
        return x

    def derivative(self, z):
        return torch.ones_like(z)

    def __repr__(self):
        return "Identity()"


@dataclass(frozen=True)
class Interval(Transform):
    """``x = lo + (hi - lo) * sigmoid(z)``."""

    lo: float
    hi: float

    def forward(self, z):
        return self.lo + (self.hi - self.lo) * torch.sigmoid(z)

    def inverse(self, x):
        t = (x - self.lo) / (self.hi - self.lo)
        return torch.log(t) - torch.log1p(-t)

    def derivative(self, z):
        s = torch.sigmoid(z)
        return (self.hi - self.lo) * s * (1.0 - s)


@dataclass(frozen=True)
class LowerBound(Transform):
    """``x = lo + softplus(z)``."""

    lo: float

    def forward(self, z):
        return self.lo + torch.nn.functional.softplus(z)

    def inverse(self, x):
        y = x - self.lo
        return y + torch.log(-torch.expm1(-y))

    def derivative(self, z):
        return torch.sigmoid(z)


@dataclass(frozen=True)
class UpperBound(Transform):
    """``x = hi - softplus(z)``."""

    hi: float

    def forward(self, z):
        return self.hi - torch.nn.functional.softplus(z)

    def inverse(self, x):
        y = self.hi - x
        return y + torch.log(-torch.expm1(-y))

    def derivative(self, z):
        return -torch.sigmoid(z)


def make_transform(bounds: tuple[float | None, float | None] | None) -> Transform:
    """The bijection for ``bounds`` (``None`` entries mean unbounded on that side)."""
    lo, hi = (None, None) if bounds is None else bounds
    lo = None if lo is None or (isinstance(lo, float) and math.isinf(lo)) else float(lo)
    hi = None if hi is None or (isinstance(hi, float) and math.isinf(hi)) else float(hi)
    if lo is not None and hi is not None:
        if not hi > lo:
            raise ParameterError(f"bounds {bounds}: the upper bound must exceed the lower bound")
        return Interval(lo, hi)
    if lo is not None:
        return LowerBound(lo)
    if hi is not None:
        return UpperBound(hi)
    return Identity()


# ---------------------------------------------------------------------------------------------
# Ties


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
_FUNCS = {"sqrt": torch.sqrt, "exp": torch.exp, "log": torch.log, "log10": torch.log10,
          "abs": torch.abs, "sin": lambda x: torch.sin(torch.deg2rad(x)),
          "cos": lambda x: torch.cos(torch.deg2rad(x))}


def _ref_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


@dataclass(frozen=True)
class Tie:
    """A parameter defined from others.

    Either an expression string over ``component.param`` names (``"bulge.x0"``,
    ``"bulge.re * 0.5 + 1"``; functions ``sqrt exp log log10 abs sin cos``, angles in
    degrees), or a callable taking a mapping ``{"comp.param": Tensor}`` together with
    ``depends``, the names it reads.
    """

    expr: str | Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    depends: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.expr, str):
            try:
                tree = ast.parse(self.expr, mode="eval")
            except SyntaxError as exc:
                raise ModelError(f"tie {self.expr!r} is not a valid expression: {exc.msg}") from None
            refs = []
            for node in ast.walk(tree):
                name = _ref_name(node)
                if name is not None:
                    refs.append(name)
            self._check(tree.body)
            object.__setattr__(self, "depends", tuple(dict.fromkeys(refs)))
            object.__setattr__(self, "_tree", tree.body)
        elif callable(self.expr):
            if not self.depends:
                raise ModelError("a callable tie must list the parameters it reads in `depends`")
        else:
            raise ModelError(f"tie must be an expression string or a callable, got {self.expr!r}")

    def _check(self, node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return
        if _ref_name(node) is not None:
            return
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            self._check(node.left)
            self._check(node.right)
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            self._check(node.operand)
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCS and len(node.args) == 1 and not node.keywords):
            self._check(node.args[0])
            return
        raise ModelError(
            f"tie {self.expr!r}: {ast.unparse(node)!r} is not allowed; use numbers, "
            f"component.param names, + - * / ** and {sorted(_FUNCS)}"
        )

    def evaluate(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if callable(self.expr):
            return self.expr(values)
        return self._eval(self._tree, values)

    def _eval(self, node, values):
        if isinstance(node, ast.Constant):
            return node.value
        name = _ref_name(node)
        if name is not None:
            return values[name]
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](self._eval(node.left, values), self._eval(node.right, values))
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, values)
            return -v if isinstance(node.op, ast.USub) else v
        return _FUNCS[node.func.id](torch.as_tensor(self._eval(node.args[0], values)))


@dataclass
class Parameter:
    """A parameter of one component of a model.

    Parameters
    ----------
    value : float or array-like or None
        A scalar (the same for every galaxy) or one value per galaxy. ``None`` takes the
        profile's default.
    fixed : bool or None
        Fixed parameters are not fitted. ``None`` takes the profile's default.
    bounds : (lo, hi) or None
        Fitting bounds; ``None`` takes the profile's default bounds.
    tie : Tie, str or None
        Defines this parameter from others; a tied parameter is never free.
    """

    value: float | np.ndarray | torch.Tensor | None = None
    fixed: bool | None = None
    bounds: tuple[float | None, float | None] | None = None
    tie: Tie | str | None = None

    def __post_init__(self):
        if isinstance(self.tie, str):
            self.tie = Tie(self.tie)


# ---------------------------------------------------------------------------------------------
# Layout: free parameters <-> one unconstrained (B, P) tensor.


@dataclass
class _Entry:
    key: str
    spec: ParamSpec
    param: Parameter
    bounds: tuple[float | None, float | None]
    fixed: bool
    transform: Transform = field(default_factory=Identity)


class ParameterLayout:
    """Maps a model's parameters for a batch of ``batch_size`` galaxies to tensors.

    Free parameters become the columns of one unconstrained tensor ``z`` of shape
    ``(B, P_free)``; fixed ones are constants; tied ones are evaluated from the others in
    dependency order (cycles are an error here, at build time).

    Parameters
    ----------
    entries : sequence of (key, ParamSpec, Parameter)
        ``key`` is ``"component.param"``.
    batch_size : int
    dtype, device : torch dtype and device of every tensor made.
    """

    def __init__(self, entries: Sequence[tuple[str, ParamSpec, Parameter]], batch_size: int, *,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.device = torch.device(device)
        self._entries: dict[str, _Entry] = {}
        for key, spec, param in entries:
            bounds = param.bounds if param.bounds is not None else spec.bounds
            fixed = spec.fixed if param.fixed is None else bool(param.fixed)
            entry = _Entry(key, spec, param, tuple(bounds), fixed or param.tie is not None)
            entry.transform = make_transform(bounds)
            self._entries[key] = entry
        self.free: list[str] = [k for k, e in self._entries.items() if not e.fixed]
        self.tied: list[str] = self._tie_order()
        self._values = {k: self._value_tensor(e) for k, e in self._entries.items()
                        if e.param.tie is None}

    # -- construction helpers ------------------------------------------------------------
    def _tie_order(self) -> list[str]:
        tied = {k: e.param.tie for k, e in self._entries.items() if e.param.tie is not None}
        for key, tie in tied.items():
            for dep in tie.depends:
                if dep not in self._entries:
                    raise ModelError(f"{key} is tied to {dep!r}, which is not a parameter of the model")
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(k: str, path: tuple[str, ...]):
            if state.get(k) == 2:
                return
            if state.get(k) == 1:
                cycle = " -> ".join(path[path.index(k):] + (k,))
                raise ModelError(f"tied parameters form a cycle: {cycle}")
            state[k] = 1
            for dep in tied[k].depends:
                if dep in tied:
                    visit(dep, path + (k,))
            state[k] = 2
            order.append(k)

        for k in tied:
            visit(k, ())
        return order

    def _value_tensor(self, e: _Entry) -> torch.Tensor:
        value = e.param.value if e.param.value is not None else e.spec.default
        if value is None:
            raise ModelError(f"{e.key} needs a value (no default for {e.spec.name!r})")
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        if t.ndim == 0:
            t = t.expand(self.batch_size)
        if t.shape != (self.batch_size,):
            raise ParameterError(
                f"{e.key}: got {tuple(t.shape)} values for a batch of {self.batch_size} galaxies; "
                "give a scalar or one value per galaxy"
            )
        return t.clone()

    # -- public API ---------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, key: str) -> ParamSpec:
        return self._entries[key].spec

    def transform(self, key: str) -> Transform:
        return self._entries[key].transform

    def bounds(self, key: str) -> tuple[float | None, float | None]:
        return self._entries[key].bounds

    def reached_by(self, key: str) -> set[str]:
        """The parameters whose value depends on ``key``: itself and every parameter tied
        (directly or through other ties) to it."""
        sources: dict[str, set[str]] = {}
        for t in self.tied:  # dependency order
            src: set[str] = set()
            for dep in self._entries[t].param.tie.depends:
                src |= sources.get(dep, {dep})
            sources[t] = src
        return {key} | {t for t, src in sources.items() if key in src}

    def set_values(self, key: str, value) -> None:
        """Replace the starting (or fixed) value of a non-tied parameter, per galaxy or scalar."""
        e = self._entries[key]
        if e.param.tie is not None:
            raise ModelError(f"{key} is tied; set the parameters it depends on instead")
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        self._values[key] = (t.expand(self.batch_size) if t.ndim == 0 else t).clone()

    def values(self) -> dict[str, torch.Tensor]:
        """Physical values of every parameter, ``{"comp.param": (B,) tensor}``, ties applied."""
        out = dict(self._values)
        return self._apply_ties(out)

    def _apply_ties(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key in self.tied:
            v = self._entries[key].param.tie.evaluate(out)
            out[key] = torch.as_tensor(v, dtype=self.dtype, device=self.device).expand(self.batch_size)
        return out

    def _outside(self, key: str) -> torch.Tensor:
        """(B,) bool: the value of free parameter ``key`` is not strictly inside its bounds."""
        lo, hi = self._entries[key].bounds
        v = self._values[key]
        bad = ~torch.isfinite(v)
        if lo is not None:
            bad |= v <= lo
        if hi is not None:
            bad |= v >= hi
        return bad

    def in_bounds(self) -> torch.Tensor:
        """Per galaxy: whether every free parameter's value lies strictly inside its bounds."""
        ok = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        for key in self.free:
            ok &= ~self._outside(key)
        return ok

    def out_of_bounds(self) -> dict[str, torch.Tensor]:
        """Per free parameter, which galaxies' values are not strictly inside its bounds (or not
        finite): ``{"comp.param": (B,) bool}``, only parameters with at least one such galaxy."""
        masks = {key: self._outside(key) for key in self.free}
        return {key: bad for key, bad in masks.items() if bool(bad.any())}

    def initial(self) -> torch.Tensor:
        """The unconstrained start ``z`` (B, P_free) from the current values.

        Galaxies whose values lie outside the bounds get non-finite entries; check
        :meth:`in_bounds` first.
        """
        cols = [self._entries[k].transform.inverse(self._values[k]) for k in self.free]
        if not cols:
            return torch.zeros(self.batch_size, 0, dtype=self.dtype, device=self.device)
        return torch.stack(cols, dim=-1)

    def physical(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Physical values of every parameter from the unconstrained ``z`` (B, P_free)."""
        out = {k: v for k, v in self._values.items() if k not in self.free}
        if z.shape[0] != self.batch_size:
            # Subsets of the batch (compacted active sets) are allowed for free parameters only
            # when the caller also subsets the constants: see `subset`.
            raise ParameterError(f"z has {z.shape[0]} rows for a layout of {self.batch_size}")
        for i, key in enumerate(self.free):
            out[key] = self._entries[key].transform.forward(z[:, i])
        return self._apply_ties(out)

    def subset(self, index: torch.Tensor) -> ParameterLayout:
        """A layout for the galaxies ``index`` of this batch (same parameters and transforms)."""
        new = object.__new__(ParameterLayout)
        new.__dict__.update(self.__dict__)
        rows = torch.arange(self.batch_size, device=self.device)[index]
        new._values = {k: v[rows] for k, v in self._values.items()}
        new.batch_size = int(rows.numel())
        return new
