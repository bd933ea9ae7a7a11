"""The forward model: pixel-integrated, PSF-convolved images of a batch of galaxies.

Pipeline for one batch (see docs/rendering.md for the derivations):

1. Parameters are converted to *render-grid cells*: the render grid is the canvas of the
   largest stamp, sampled ``k`` times finer when the PSF is given at ``k``-times finer
   sampling, and padded on every side by the PSF half-size so that light from outside the
   stamp is scattered in.
2. Every elliptical component is integrated over each cell: Gauss–Legendre points in every
   cell, and, in a window of cells around the centre, an exact decomposition of each cell
   into triangles with their apex at the centre, integrated in polar coordinates in the
   frame where the ellipse is a circle. The radial quadrature is graded to the profile's
   central cusp, so the cell values do not depend on where the centre falls in a cell.
3. With a band-limited PSF, each component's steep core (the profile times a smooth window
   about its centre) is instead Fourier transformed directly at the FFT frequencies, so that
   it is not aliased; the rest is integrated over cells as above.
4. The sum of the convolved components is convolved with the PSF by FFT (a true
   convolution, no wrap-around into the stamp); point sources enter as phase ramps in
   Fourier space (sub-pixel shifts of the PSF). For a star-like PSF (which already contains
   the pixel response) the pixel response of the cell integration is divided out of the PSF
   transform, so that it is not counted twice.
5. Fine grids are binned (optical PSF) or sampled at pixel centres (star-like PSF); sky
   components are added on the pixel grid.

No object of size (pixels x pixels) is ever made; memory is O(B H W).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError, GalprofWarning, ModelError, ParameterError, PSFError
from .model import Model
from .profiles import EllipticalProfile, PointProfile, SkyProfile
from .special import boxy_area_factor, gauss_legendre, mag_to_flux

__all__ = ["RenderOptions", "Renderer", "render", "prepare_psf", "PSF_KINDS", "fast_fft_size"]

PSF_KINDS = ("star", "optical")
_CORE_TRUNCATION = 5.8  # the core window is 1e-6 there
_STENCIL_MIN_Q = 0.15  # flatter galaxies keep Gauss–Legendre cells (see RenderOptions.base_rule)
_BAND_LIMIT = 0.1  # PSF transform beyond 0.45 cycles/cell, relative to its total, to use the core
_FOLD_BAND = (0.4, 0.5)  # cycles/cell: where the core spectrum is folded across Nyquist


@dataclass(frozen=True)
class RenderOptions:
    """Accuracy settings of the renderer (the defaults meet the documented accuracy).

    Attributes
    ----------
    base_order : int
        Gauss–Legendre points per axis in every cell (with the ``"gauss"`` base rule).
    base_rule : {"gauss", "stencil"} or None
        How cells outside the refined windows are integrated. ``"gauss"``: ``base_order``
        points per axis. ``"stencil"``: ``f`` at the cell centres, corrected to sixth order by
        the differences of the neighbours (per axis ``1 + d^2/24 - 17 d^4/5760``, the expansion
        of the cell average in central differences): one evaluation per cell instead of
        ``base_order^2``. ``None`` (default):
        the stencil for every galaxy whose core is transformed separately (``fourier_core``,
        a band-limited PSF), so that what it integrates, ``f (1 - w)``, has no cusp and the
        refined window covers the steep inner part; Gauss–Legendre for the others (a galaxy's
        rule never depends on the other galaxies of its batch).
    refine : tuple of (half_size, order)
        Windows around each centre (half-size in cells) integrated with more points per axis.
    window : int
        Half-size, in cells, of the window around each centre that is integrated exactly.
    angular_order, radial_order : int
        Quadrature points per triangle (angle) and per radial panel in that window.
    core_angular_order, core_radial_order : int
        The same for the exactly integrated central panels of the core transform (below).
    fourier_core : bool or None
        With a PSF, transform each component's steep core in Fourier space (below). ``None``
        (default): for every galaxy whose PSF is band-limited (its transform beyond 0.45
        cycles per cell below 10% of its total), which every well-sampled PSF is; a PSF that
        is not (a delta function, an undersampled star) is applied to the cell integrals
        directly, which is then exact.
    core_radius : float
        With a PSF, the light of each component is split by the flat-topped, band-limited
        window ``w = t(dx) t(dy)``, ``t(d) = exp(-x) (1 + x)``, ``x = d^2 / (2 core_radius^2)``
        (cells; truncated at 5.8 core_radius, where it is 1e-6):
        ``f (1 - w)``, which has no central cusp, is integrated over cells as without a PSF;
        ``f w`` (the steep core) is Fourier transformed by quadrature at the FFT frequencies,
        so that it is not aliased.
    core_sampling, core_order : int
        Quadrature panels per cell and Gauss–Legendre points per panel for the core transform.
    core_dense : float, core_coarse : int
        Distance (cells) from the centre within which those panels are used; beyond it, panels
        are ``core_coarse`` times as wide.
    core_exact : int
        Panels on each side of the centre whose integrals and moments (to second order) come
        from the exact-geometry quadrature instead.
    chunk : int or None
        Galaxies rendered together (bounds the memory of one call).
    chunk_cells : int or None
        ... and at most this many render-grid cells together (at least one galaxy): for large
        stamps, where a chunk of ``chunk`` galaxies would not fit in memory (each cell costs
        about 100 bytes at float64 while a Sérsic is integrated).
        ``None`` (both): 128 galaxies and 2**23 cells (about 0.8 GB) on a CPU (and any device
        other than CUDA); on a CUDA GPU 2048 galaxies and cells for about a tenth of the card's
        memory (2**23 to 2**26, the latter 6.7 GB), where a render call is a few hundred small
        kernels whose launches, not their arithmetic, bound small stamps (docs/benchmarks.md, GPU).
    """

    base_order: int = 2
    base_rule: str | None = None
    stencil_margin: int = 12
    refine: tuple[tuple[int, int], ...] = ((8, 4),)
    window: int = 3
    angular_order: int = 16
    radial_order: int = 12
    core_angular_order: int = 8
    core_radial_order: int = 12
    fourier_core: bool | None = None
    core_radius: float = 2.0
    core_sampling: int = 4
    core_dense: float = 2.0
    core_coarse: int = 4
    core_order: int = 3
    core_exact: int = 2
    chunk: int | None = None
    chunk_cells: int | None = None

    def chunking(self, device: torch.device | str) -> tuple[int, int]:
        """(galaxies, cells) rendered together per call on ``device`` (defaults above)."""
        device = torch.device(device)
        gpu = device.type == "cuda"
        chunk = self.chunk if self.chunk is not None else (2048 if gpu else 128)
        if self.chunk_cells is not None:
            cells = self.chunk_cells
        elif gpu:
            # about a tenth of the card's memory at ~100 bytes per cell, between 2^23 and 2^26
            total = torch.cuda.get_device_properties(device).total_memory
            cells = min(max(total // 1000, 2 ** 23), 2 ** 26)
        else:
            cells = 2 ** 23
        return int(chunk), int(cells)


def fast_fft_size(n: int) -> int:
    """Smallest even integer >= n whose prime factors are 2, 3, 5 and 7 (odd lengths make
    torch's real FFTs 1.3 to 2.5 times slower on a CPU: 189 against 192)."""
    m = max(int(n), 2)
    m += m % 2
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def prepare_psf(psf, *, index: int | None = None) -> np.ndarray:
    """Validate one PSF image and return it normalised to unit sum (float64).

    The PSF centre is the pixel of 0-based index ``(ny // 2, nx // 2)``: the middle pixel for
    odd sizes, the one just above and right of the middle for even sizes (GALFIT's convention).

    Raises
    ------
    PSFError
        If the PSF is not 2-D, has non-finite pixels, or a sum that is not positive.
    """
    where = "" if index is None else f" (galaxy {index})"
    arr = np.asarray(psf, dtype=np.float64)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise PSFError(f"PSF{where} must be a 2-D image, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise PSFError(f"PSF{where} has {int(np.sum(~np.isfinite(arr)))} non-finite pixels")
    total = float(arr.sum())
    if not total > 0.0:
        raise PSFError(f"PSF{where} sums to {total:g}; it must have a positive sum")
    if abs(total - 1.0) > 1e-3:
        warnings.warn(f"PSF{where} sums to {total:.6g}, not 1; it has been normalised to unit sum",
                      GalprofWarning, stacklevel=3)
    return arr / total


class Renderer:
    """Renders a model for a batch of galaxies (stamps of any sizes, one PSF each or shared).

    Parameters
    ----------
    model : Model
    shapes : sequence of (ny, nx)
        Stamp shape of every galaxy (pixels). Its length is the batch size ``B``.
    psf : array, sequence of arrays, or None
        One PSF for all galaxies, one per galaxy, or none. Sizes may differ and be odd or even.
    psf_kind : {"star", "optical"}
        ``"star"`` (default): the PSF is a star-like image that already includes the pixel
        response (an "effective PSF"); ``"optical"``: the PSF is sampled at pixel centres and
        contains no pixel response.
    psf_oversampling : int
        The PSF is sampled ``k`` times finer than the image; the model is rendered at that
        sampling and binned (optical) or sampled at pixel centres (star).
    options : RenderOptions
    dtype, device : where and in which precision to compute (float32 and float64 supported).
    """

    def __init__(self, model: Model, shapes: Sequence[tuple[int, int]], psf=None, *,
                 psf_kind: str = "star", psf_oversampling: int = 1,
                 options: RenderOptions | None = None, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu"):
        self.model = model
        self.options = options or RenderOptions()
        self.dtype = dtype
        self.device = torch.device(device)
        shapes = [tuple(int(v) for v in s) for s in shapes]
        if not shapes:
            raise DataError("a batch needs at least one galaxy")
        for i, s in enumerate(shapes):
            if len(s) != 2 or min(s) < 1:
                raise DataError(f"stamp shape of galaxy {i} must be (ny, nx) with positive sizes, got {s}")
        self.shapes = shapes
        self.batch_size = B = len(shapes)
        self.height = max(s[0] for s in shapes)
        self.width = max(s[1] for s in shapes)
        if psf_kind not in PSF_KINDS:
            raise PSFError(f"psf_kind must be one of {PSF_KINDS}, got {psf_kind!r}")
        k = int(psf_oversampling)
        if k < 1 or k != psf_oversampling:
            raise PSFError(f"psf_oversampling must be a positive integer, got {psf_oversampling!r}")
        self.psf_kind = psf_kind
        self.k = k if psf is not None else 1
        if psf is None and psf_oversampling != 1:
            raise PSFError("psf_oversampling needs a PSF")

        self._elliptical = [c for c in model.components if isinstance(c.profile, EllipticalProfile)]
        self._points = [c for c in model.components if isinstance(c.profile, PointProfile)]
        self._skies = [c for c in model.components if isinstance(c.profile, SkyProfile)]
        if self._points and psf is None:
            names = ", ".join(c.name for c in self._points)
            raise ModelError(f"point-source component(s) {names} need a PSF")
        self._boxy = {c.name: not _is_fixed_zero(c.params["c0"]) for c in self._elliptical}

        iy = torch.arange(self.height, device=self.device)[:, None]
        ix = torch.arange(self.width, device=self.device)[None, :]
        hs = torch.tensor([s[0] for s in shapes], device=self.device)[:, None, None]
        ws = torch.tensor([s[1] for s in shapes], device=self.device)[:, None, None]
        #: (B, H, W) bool: True inside each galaxy's own stamp
        self.valid = (iy < hs) & (ix < ws)
        self._centre = torch.tensor([[(s[1] + 1) / 2.0, (s[0] + 1) / 2.0] for s in shapes],
                                    dtype=dtype, device=self.device)

        if psf is None:
            self.hy = self.hx = 0
            self._psf_hat = None
        else:
            self._setup_psf(psf, B)
        self.render_shape = (self.height * self.k + 2 * self.hy, self.width * self.k + 2 * self.hx)
        if self.options.base_rule not in (None, "gauss", "stencil"):
            raise ValueError(f"base_rule must be 'gauss', 'stencil' or None, got {self.options.base_rule!r}")
        self._chunking = self.options.chunking(self.device)

    # ------------------------------------------------------------------------------------
    def _setup_psf(self, psf, B: int) -> None:
        if isinstance(psf, (np.ndarray, torch.Tensor)) and np.ndim(psf) == 2:
            psfs = [prepare_psf(np.asarray(psf))]
        else:
            psfs = [prepare_psf(np.asarray(p), index=i) for i, p in enumerate(psf)]
            if len(psfs) != B:
                raise PSFError(f"got {len(psfs)} PSFs for {B} galaxies; give one, or one per galaxy")
        hy = max(max(p.shape[0] // 2, p.shape[0] - 1 - p.shape[0] // 2) for p in psfs)
        hx = max(max(p.shape[1] // 2, p.shape[1] - 1 - p.shape[1] // 2) for p in psfs)
        self.hy, self.hx = hy, hx
        k = self.k
        hr, wr = self.height * k + 2 * hy, self.width * k + 2 * hx
        room = int(math.ceil(_CORE_TRUNCATION * self.options.core_radius)) + 1
        ny, nx = fast_fft_size(hr + room), fast_fft_size(wr + room)
        self.fft_shape = (ny, nx)
        kernel = np.zeros((len(psfs), ny, nx))
        for i, p in enumerate(psfs):
            cy, cx = p.shape[0] // 2, p.shape[1] // 2
            # put the PSF centre at index (0, 0), wrapping negative offsets around
            rows = (np.arange(p.shape[0]) - cy) % ny
            cols = (np.arange(p.shape[1]) - cx) % nx
            kernel[i][np.ix_(rows, cols)] = p
        kernel_t = torch.as_tensor(kernel, dtype=self.dtype, device=self.device)
        psf_hat = torch.fft.rfft2(kernel_t)
        fy = torch.fft.fftfreq(ny, dtype=self.dtype, device=self.device)
        fx = torch.fft.rfftfreq(nx, dtype=self.dtype, device=self.device)
        self._fy, self._fx = fy, fx
        cell_response = torch.sinc(fy)[:, None] * torch.sinc(fx)[None, :]
        if self.psf_kind == "star":
            # the PSF already holds the pixel response: remove the cell response that the
            # cell integration adds, and sample (not bin) fine grids at pixel centres.
            psf_hat = psf_hat / cell_response * (k * k)
            if k % 2 == 0:
                shift = torch.exp(-1j * math.pi * (fy[:, None] + fx[None, :]))
                psf_hat = psf_hat * shift
        edge = (torch.abs(fy)[:, None] >= 0.45) | (torch.abs(fx)[None, :] >= 0.45)
        raw = torch.fft.rfft2(kernel_t)
        ratio = (torch.abs(raw) * edge).amax(dim=(-2, -1)) / torch.abs(raw[:, 0, 0])
        band_limited = ratio < _BAND_LIMIT
        #: per PSF (1 or B): whether shift derivatives are right: the PSF is band-limited (as
        #: measured, whatever ``fourier_core`` forces) and the core is transformed separately
        self.shift_exact = band_limited & (self.options.fourier_core is not False)
        self._shift_any = bool(self.shift_exact.any())
        if self.options.fourier_core is not None:
            band_limited = torch.full_like(band_limited, bool(self.options.fourier_core))
        #: per PSF (1 or B): whether the Fourier-space core is used
        self.fourier_core = band_limited
        self._any_core = bool(band_limited.any())
        self._all_core = bool(band_limited.all())
        self._psf_hat = psf_hat
        self._cell_response = cell_response
        self._point_hat = psf_hat * cell_response

    # ------------------------------------------------------------------------------------
    def values(self) -> dict[str, torch.Tensor]:
        """The model's own parameter values for this batch (``{"comp.param": (B,)}``)."""
        return self.model.layout(self.batch_size, dtype=self.dtype, device=self.device).values()

    def __call__(self, values: Mapping[str, torch.Tensor] | None = None, *,
                 check: bool = True, index: torch.Tensor | None = None,
                 components: Sequence[str] | None = None, shift_derivatives: bool = False):
        """Model images ``(B, H, W)`` (zero outside each galaxy's stamp).

        ``values`` maps ``"comp.param"`` to scalars or (B,) tensors (physical units); by
        default the model's own values. ``index`` (a 1-D integer tensor) renders only those
        galaxies of the batch, ``values`` then holding one entry per indexed galaxy.
        ``components`` (names) renders only those components (their sum, convolved as in the
        full model). ``check=False`` skips the validity-domain check (a host synchronisation),
        for loops whose parameters are bounded by construction.

        ``shift_derivatives=True`` returns ``(images, d_dx0, d_dy0)``: with them the derivatives
        of the images with respect to moving all rendered components together by one pixel
        along x and along y, taken in Fourier space from the convolved spectrum (``-2 pi i f``
        times it, the core's mirror frequencies differentiated before they are folded), at no
        render's cost. They are the derivatives of the band-limited model: right for the
        galaxies whose PSF is band-limited (:attr:`shift_exact`), not for the others
        (:attr:`shift_derivatives_ok`: at least one is).
        """
        n = self.batch_size if index is None else int(index.shape[0])
        values = self._check_values(self.values() if values is None else values, n)
        if check:
            self.validate(values, n)
        if components is not None:
            unknown = set(components) - {c.name for c in self.model.components}
            if unknown:
                raise ParameterError(f"no component named {', '.join(sorted(unknown))} in the model")
            components = list(components)
        if shift_derivatives and not self.shift_derivatives_ok:
            raise ModelError("shift derivatives need a band-limited PSF for some galaxy of the batch")
        return self._chunked(values, components, index, shift_derivatives)

    @property
    def shift_derivatives_ok(self) -> bool:
        """Whether :meth:`__call__` can give shift derivatives: a band-limited PSF with the core
        transformed separately (:attr:`shift_exact`) for at least one galaxy; they are right
        for those galaxies only."""
        return self._psf_hat is not None and self._shift_any

    def render_cost(self, components: Sequence[str]) -> float:
        """Relative cost of rendering ``components`` (1 per elliptical or point component; a
        sky costs next to nothing)."""
        names = set(components)
        n = sum(1 for c in self._elliptical + self._points if c.name in names)
        return n + 0.05 * sum(1 for c in self._skies if c.name in names)

    def components(self, values: Mapping[str, torch.Tensor] | None = None, *,
                   check: bool = True) -> dict[str, torch.Tensor]:
        """Each component's image ``(B, H, W)``, convolved as in the full model."""
        values = self._check_values(self.values() if values is None else values)
        if check:
            self.validate(values)
        return {c.name: self._chunked(values, [c.name], None) for c in self.model.components}

    def validate(self, values: Mapping[str, torch.Tensor], n: int | None = None) -> None:
        """Raise :class:`~galprof.errors.ParameterError` for any value outside its profile's
        validity domain (or non-finite)."""
        values = self._check_values(values, n)
        for comp in self.model.components:
            for s in comp.profile.params:
                v = values[f"{comp.name}.{s.name}"]
                lo, hi = s.domain
                bad = ~torch.isfinite(v)
                if lo is not None:
                    bad = bad | (v < lo)
                if hi is not None:
                    bad = bad | (v > hi)
                if bool(bad.any()):
                    i = int(torch.nonzero(bad)[0, 0])
                    raise ParameterError(
                        f"{comp.name}.{s.name} = {float(v[i]):g} (galaxy {i}) is outside the allowed "
                        f"range [{lo}, {hi}] of profile {comp.profile.name!r}")
                if s.name == "c0" and comp.name in self._boxy and not self._boxy[comp.name] and bool((v != 0).any()):
                    raise ParameterError(
                        f"{comp.name}.c0 is fixed at 0 in the model, so the renderer draws ellipses; "
                        "free c0 (or give it a non-zero value) in the model to render boxy shapes")

    def crop(self, images: torch.Tensor, index: int) -> np.ndarray:
        """Galaxy ``index``'s stamp from a batch of images, as a NumPy array."""
        ny, nx = self.shapes[index]
        return images[index, :ny, :nx].detach().cpu().numpy()

    # ------------------------------------------------------------------------------------
    def _chunked(self, values, only, index, shift=False):
        n = next(iter(values.values())).shape[0]
        hr, wr = self.render_shape
        chunk, cells = self._chunking
        step = max(1, min(chunk, cells // (hr * wr)))
        parts = []
        for i in range(0, n, step):
            j = min(i + step, n)
            rows = slice(i, j) if index is None else index[i:j]
            parts.append(self._render({k: v[i:j] for k, v in values.items()}, rows, only, shift))
        if len(parts) == 1:
            return parts[0]
        if shift:
            return tuple(torch.cat([p[m] for p in parts], dim=0) for m in range(3))
        return torch.cat(parts, dim=0)

    def _check_values(self, values, n: int | None = None):
        n = self.batch_size if n is None else n
        out = {}
        for c in self.model.components:
            for s in c.profile.params:
                key = f"{c.name}.{s.name}"
                if key not in values:
                    raise ParameterError(f"no value for {key}")
                v = torch.as_tensor(values[key], dtype=self.dtype, device=self.device)
                v = v.expand(n) if v.ndim == 0 else v
                if v.shape != (n,):
                    raise ParameterError(f"{key}: expected {n} values, got shape {tuple(v.shape)}")
                out[key] = v
        return out

    def _render(self, values, sl, only, shift=False):
        """Render the galaxies ``sl`` (a slice or index tensor into the batch); ``values`` hold
        one entry per rendered galaxy."""
        B = next(iter(values.values())).shape[0]
        hr, wr = self.render_shape
        acc = None
        extra = None
        for comp in self._elliptical:
            if only is None or comp.name in only:
                img, spec = self._integrate(comp, values, sl, shift)
                acc = img if acc is None else acc + img
                if spec is not None:
                    extra = spec if extra is None else tuple(a + b for a, b in zip(extra, spec))
        points = [c for c in self._points if only is None or c.name in only]
        if self._psf_hat is None:
            image = acc if acc is not None else torch.zeros(B, hr, wr, dtype=self.dtype, device=self.device)
        elif acc is None and not points:
            image = torch.zeros(B, self.height, self.width, dtype=self.dtype, device=self.device)
        else:
            image = self._convolve(acc, extra, points, values, sl, B, shift)
        if shift:
            if not isinstance(image, tuple):  # nothing but skies rendered: they do not move
                image = (image, torch.zeros_like(image), torch.zeros_like(image))
            image, dx, dy = image
        for comp in self._skies:
            if only is None or comp.name in only:
                image = image + self._sky(comp, values, sl)
        if shift:
            valid = self.valid[sl]
            return image * valid, dx * valid, dy * valid
        return image * self.valid[sl]

    # -- coordinates ----------------------------------------------------------------------
    def _to_cells_x(self, x):
        return (x - 0.5) * self.k - 0.5 + self.hx

    def _to_cells_y(self, y):
        return (y - 0.5) * self.k - 0.5 + self.hy

    def _flux(self, values, key, sl):
        return mag_to_flux(values[key], self.model.zeropoint)

    # -- elliptical profiles ---------------------------------------------------------------
    def _integrate(self, comp, values, sl, shift=False):
        """Cell integrals of one elliptical component on the render grid (B, Hr, Wr) and, when
        its core is transformed separately, the core's spectrum (B, Ny, Nx // 2 + 1) as a tuple:
        with ``shift``, also its derivatives for moving the centre by one cell along x and y."""
        prof: EllipticalProfile = comp.profile
        name = comp.name
        k = self.k
        X = self._to_cells_x(values[f"{name}.x0"])
        Y = self._to_cells_y(values[f"{name}.y0"])
        q = values[f"{name}.q"]
        pa = torch.deg2rad(values[f"{name}.pa"])
        c0 = values[f"{name}.c0"] if self._boxy[name] else None
        shape = {}
        for s in prof.shape_params:
            v = values[f"{name}.{s.name}"]
            shape[s.name] = v * k if s.kind == "length" else v
        log_norm = prof.log_radial_integral(shape)
        shape = {**shape, **prof.derived(shape)}
        area = boxy_area_factor(c0) if c0 is not None else 1.0
        amp = self._flux(values, f"{name}.mag", sl) / (area * torch.exp(log_norm))
        sin, cos = torch.sin(pa), torch.cos(pa)
        B = X.shape[0]
        hr, wr = self.render_shape
        geom = (X, Y, q, sin, cos, c0)
        core = None
        banded = None
        if self._psf_hat is not None and self._any_core:
            # the core's transform is periodic in the FFT box: use it only for centres inside
            # the render grid (the box has room for the core on every side of that grid)
            inside = (X >= 0) & (X <= wr - 1) & (Y >= 0) & (Y <= hr - 1)
            banded = self.fourier_core if self.fourier_core.shape[0] == 1 else self.fourier_core[sl]
            core = (inside & banded).to(self.dtype)
        # the base rule, galaxy by galaxy (see base_rule): forced, or the stencil for profiles
        # declared smooth (untruncated), galaxies whose PSF is band-limited and that are not
        # flatter than q = 0.15 (narrower than a cell across the minor axis, their light has
        # structure the stencil would alias); ``use`` None when every galaxy takes the stencil
        rule = self.options.base_rule
        stencil, use = rule == "stencil", None
        if rule is None and prof.smooth and banded is not None:
            use = (q >= _STENCIL_MIN_Q) & banded
            if bool(use.all()):      # one host synchronisation per component and render
                stencil, use = True, None
            else:
                stencil = bool(use.any())
        flat = None
        if stencil:
            # f (1 - w) at the cell centres of the grid and two cells beyond it on every side
            xs = torch.arange(-2, wr + 2, dtype=self.dtype, device=self.device).expand(B, wr + 4)
            ys = torch.arange(-2, hr + 2, dtype=self.dtype, device=self.device).expand(B, hr + 4)
            flat = _stencil_cells(self._cells_gauss(prof, shape, geom, xs, ys, 1, core)).reshape(B, -1)
        if not stencil or use is not None:
            xs = torch.arange(wr, dtype=self.dtype, device=self.device).expand(B, wr)
            ys = torch.arange(hr, dtype=self.dtype, device=self.device).expand(B, hr)
            gauss = self._cells_gauss(prof, shape, geom, xs, ys, self.options.base_order, core).reshape(B, -1)
            # each galaxy gets its own rule: never one that depends on the other galaxies of its batch
            flat = gauss if flat is None else torch.where(use.view(-1, 1), flat, gauss)
        ic, jc = torch.round(X).detach(), torch.round(Y).detach()
        windows = self.options.refine
        if stencil:
            # where the core window still falls off (on the scale of core_radius), its high
            # derivatives limit the stencil: Gauss–Legendre cells there
            windows = ((self.options.stencil_margin, self.options.base_order),) + tuple(windows)
        for half, order in windows:
            index, ok, xw, yw = self._window_cells(ic, jc, half)
            cells = self._cells_gauss(prof, shape, geom, xw, yw, order, core)
            flat = _replace(flat, index, ok, cells)
        # with the core transformed separately, f (1 - w) has no cusp and the Gauss–Legendre
        # cells stand; the exact window is needed only for galaxies without the core. When every
        # PSF of the batch is band-limited, those are only galaxies centred outside the render
        # grid, whose cusp sends no light into the stamp: the window is then skipped.
        if core is None or not self._all_core:
            index, ok, xw, yw = self._window_cells(ic, jc, self.options.window)
            edges_x = torch.cat([xw - 0.5, xw[:, -1:] + 0.5], dim=1)
            edges_y = torch.cat([yw - 0.5, yw[:, -1:] + 0.5], dim=1)
            cells = self._cells_exact(prof, shape, geom, edges_x, edges_y)[0] * q[:, None, None]
            if core is not None:
                ok = ok & (core == 0)[:, None]
            flat = _replace(flat, index, ok, cells)
        image = (flat * (amp / q)[:, None]).reshape(B, hr, wr)
        if core is None:
            return image, None
        weight = (core * amp)[:, None, None]
        return image, tuple(part * weight for part in self._core_spectrum(prof, shape, geom, shift))

    def _taper(self, d):
        """The core window along one axis, ``exp(-x) (1 + x)`` with ``x = d^2 / (2 r^2)``: flat to
        fourth order at the centre, Gaussian-like (band-limited) in Fourier space, and cut to zero
        beyond the truncation radius."""
        r = self.options.core_radius
        x = 0.5 * (d / r) ** 2
        t = torch.exp(-x) * (1.0 + x)
        return torch.where(torch.abs(d) < _CORE_TRUNCATION * r, t, torch.zeros_like(t))

    def _taper_derivatives(self, d):
        """The window and its first two derivatives along one axis (inside the truncation)."""
        r = self.options.core_radius
        e = torch.exp(-0.5 * (d / r) ** 2)
        t = e * (1.0 + 0.5 * (d / r) ** 2)
        d1 = -d ** 3 / (2.0 * r ** 4) * e
        d2 = (-1.5 * d ** 2 / r ** 4 + d ** 4 / (2.0 * r ** 6)) * e
        return t, d1, d2

    def _core_nodes(self):
        """Quadrature offsets and weights (cells, relative to the centre) of the core transform,
        the exactly integrated central panels, and the frequencies at which the transform is
        taken: the FFT's, plus their mirror images across the Nyquist frequency inside the fold
        band (see :meth:`_core_spectrum`). Built once per renderer."""
        cache = getattr(self, "_core_cache", None)
        if cache is not None:
            return cache
        o = self.options
        dt, dev = self.dtype, self.device
        # panels of 1/core_sampling cells within core_dense of the centre, core_coarse times that beyond
        h = 1.0 / o.core_sampling
        n_fine = int(math.ceil(o.core_dense * o.core_sampling))
        wide = o.core_coarse * h
        n_coarse = int(math.ceil((_CORE_TRUNCATION * o.core_radius - n_fine * h) / wide))
        right = torch.cat([torch.arange(n_fine + 1, dtype=dt, device=dev) * h,
                           n_fine * h + torch.arange(1, n_coarse + 1, dtype=dt, device=dev) * wide])
        panel_edges = torch.cat([-right.flip(0)[:-1], right])
        lo, width = panel_edges[:-1], panel_edges[1:] - panel_edges[:-1]
        t, w = gauss_legendre(o.core_order, dtype=dt, device=dev)
        nodes = (lo[:, None] + width[:, None] * t[None, :]).reshape(-1)
        weights = (width[:, None] * w[None, :]).reshape(-1) * self._taper(nodes)
        n_side = lo.shape[0] // 2
        exact = torch.zeros(2 * n_side, dtype=torch.bool, device=dev)
        exact[n_side - o.core_exact:n_side + o.core_exact] = True
        exact_nodes = exact.repeat_interleave(o.core_order)
        # the exact panels replace the tensor-product rule where both axes are central
        wmat = weights[:, None] * weights[None, :] * ~(exact_nodes[:, None] & exact_nodes[None, :])
        edges = torch.arange(-o.core_exact, o.core_exact + 1, dtype=dt, device=dev) * h
        centres = 0.5 * (edges[1:] + edges[:-1])
        fy, fx = self._fy, self._fx
        by, bx = _fold_weight(fy), _fold_weight(fx)
        iy_m = torch.nonzero(by > 0).reshape(-1)
        ix_m = torch.nonzero(bx > 0).reshape(-1)
        fy_ext = torch.cat([fy, fy[iy_m] - torch.sign(fy[iy_m])])
        fx_ext = torch.cat([fx, fx[ix_m] - torch.sign(fx[ix_m])])

        def phases(f, x):
            return torch.exp(-2j * math.pi * f[:, None] * x[None, :])

        # the window and its derivatives at the exact panels' centres (x along the last axis)
        tx, tx1, tx2 = self._taper_derivatives(centres[None, None, :])
        ty, ty1, ty2 = self._taper_derivatives(centres[None, :, None])
        taper = dict(w0=tx * ty, wx=tx1 * ty, wy=tx * ty1, wxx=tx2 * ty, wyy=tx * ty2, wxy=tx1 * ty1)
        cache = dict(nodes=nodes, wmat=wmat, edges=edges, centres=centres, fy=fy_ext, fx=fx_ext, taper=taper,
                     ey=phases(fy_ext, nodes), ex=phases(fx_ext, nodes),
                     eyc=phases(fy_ext, centres), exc=phases(fx_ext, centres),
                     response=torch.sinc(fy_ext)[:, None] * torch.sinc(fx_ext)[None, :],
                     iy_m=iy_m, ix_m=ix_m, by=by[iy_m], bx=bx[ix_m])
        # the exact panels' second-order expansion as one matrix product: frequency powers
        # fy^k times the panel phases on the left, fx^l times them on the right (k, l = 0..2)
        eyc, exc = cache["eyc"], cache["exc"]
        left = torch.cat([cache["ey"]] + [eyc * fy_ext[:, None] ** k for k in range(3)], dim=1)
        right = torch.cat([exc * fx_ext[:, None] ** k for k in range(3)], dim=1)
        cache.update(left=left, right_t=right.T.contiguous(), sinc_y=torch.sinc(fy_ext), sinc_x=torch.sinc(fx_ext))
        self._core_cache = cache
        return cache

    def _core_spectrum(self, prof, shape, geom, shift=False):
        """Fourier transform of the cell-integrated core ``f w`` at the FFT frequencies, in units
        of the profile amplitude.

        The transform is a tensor Gauss–Legendre quadrature over the core window, the panels at
        the centre replaced by their exact integrals and first and second moments (about each
        panel's centre, window included by a second-order Taylor expansion). It carries no
        aliasing; near the Nyquist frequency (the fold band) the transform at the mirror
        frequency is added with a weight rising smoothly to 1, so that the spectrum is periodic
        and smooth across Nyquist, as that of sampled cell values is.
        """
        X, Y, q, sin, cos, c0 = geom
        B = X.shape[0]
        c = self._core_nodes()
        nodes = c["nodes"]
        p = {k: v.view(B, 1, 1) for k, v in shape.items()}
        qb = q.view(B, 1, 1)
        tiny = torch.finfo(self.dtype).tiny
        dx, dy = nodes[None, None, :], nodes[None, :, None]
        f = self._radial_at(prof, p, geom, dx, dy, tiny) * (c["wmat"] / qb)  # (B, N, N)
        ex = c["ex"]
        half = torch.complex(f @ ex.real.T, f @ ex.imag.T)                     # f is real: (B, N, Nx'+)

        edges, centres = c["edges"], c["centres"]
        C, m1x, m1y, mxx, mxy, myy = self._cells_exact(
            prof, shape, geom, X[:, None] + edges[None, :], Y[:, None] + edges[None, :], moments=True)
        ox, oy = centres[None, None, :], centres[None, :, None]
        m1x_c, m1y_c = m1x - ox * C, m1y - oy * C
        mxx_c = mxx - 2 * ox * m1x + ox * ox * C
        myy_c = myy - 2 * oy * m1y + oy * oy * C
        mxy_c = mxy - ox * m1y - oy * m1x + ox * oy * C
        tp = c["taper"]
        w0, wx, wy, wxx, wyy, wxy = tp["w0"], tp["wx"], tp["wy"], tp["wxx"], tp["wyy"], tp["wxy"]
        C, m1x_c, m1y_c = (
            w0 * C + wx * m1x_c + wy * m1y_c + 0.5 * (wxx * mxx_c + 2 * wxy * mxy_c + wyy * myy_c),
            w0 * m1x_c + wx * mxx_c + wy * mxy_c,
            w0 * m1y_c + wx * mxy_c + wy * myy_c,
        )
        mxx_c, mxy_c, myy_c = w0 * mxx_c, w0 * mxy_c, w0 * myy_c
        # each exact panel contributes exp(-2 pi i f.o) (C - 2 pi i f.m1 - 2 pi^2 f.M2.f): a block
        # matrix M[(k, a), (l, b)] holding the coefficient of fy^k fx^l for panels (a, b)
        two_pi = 2.0 * math.pi
        zero = torch.zeros_like(C)
        blocks = [[C, -two_pi * m1x_c, -0.5 * two_pi ** 2 * mxx_c],
                  [-two_pi * m1y_c, -two_pi ** 2 * mxy_c, zero],
                  [-0.5 * two_pi ** 2 * myy_c, zero, zero]]
        real = [[C, zero, blocks[0][2]], [zero, blocks[1][1], zero], [blocks[2][0], zero, zero]]
        imag = [[zero, blocks[0][1], zero], [blocks[1][0], zero, zero], [zero, zero, zero]]
        M = torch.complex(torch.cat([torch.cat(row, dim=2) for row in real], dim=1),
                          torch.cat([torch.cat(row, dim=2) for row in imag], dim=1))     # (B, 3K, 3K)
        rows = torch.cat([half, M @ c["right_t"]], dim=1)                       # (B, N + 3K, Nx'+)
        # the centre's phase and the cell response, both separable
        phase_x = torch.exp(-2j * math.pi * c["fx"][None, :] * X[:, None]) * c["sinc_x"]
        phase_y = torch.exp(-2j * math.pi * c["fy"][None, :] * Y[:, None]) * c["sinc_y"]
        spec = (c["left"] @ (rows * phase_x[:, None, :])) * phase_y[:, :, None]
        # fold the mirror frequencies onto the FFT grid
        ny, nxh = self._fy.shape[0], self._fx.shape[0]
        base = spec[:, :ny, :nxh]
        mx = spec[:, :ny, nxh:] * c["bx"]
        my = spec[:, ny:, :nxh] * c["by"][:, None]
        mxy = spec[:, ny:, nxh:] * c["by"][:, None] * c["bx"]
        folded = base.index_add(2, c["ix_m"], mx).index_add(1, c["iy_m"], my.index_add(2, c["ix_m"], mxy))
        if not shift:
            return (folded,)
        # moving the centre by one cell multiplies each term by -2 pi i f at its own frequency:
        # -2 pi i f at the FFT frequency for the folded spectrum, plus, for the terms folded from
        # a mirror frequency f - sign(f), 2 pi i sign(f) times them (see _convolve)
        sx = 2j * math.pi * torch.sign(self._fx[c["ix_m"]])
        sy = (2j * math.pi * torch.sign(self._fy[c["iy_m"]]))[:, None]
        return folded, mx * sx, mxy * sx, my * sy, mxy * sy

    def _window_cells(self, ic, jc, half):
        """Flat indices, in-grid flags and cell-centre coordinates of the (2 half + 1)^2 window
        of cells around the cells (ic, jc)."""
        hr, wr = self.render_shape
        off = torch.arange(-half, half + 1, device=self.device)
        iy = jc.long()[:, None] + off   # (B, K)
        ix = ic.long()[:, None] + off
        ok = ((iy >= 0) & (iy < hr))[:, :, None] & ((ix >= 0) & (ix < wr))[:, None, :]
        index = iy.clamp(0, hr - 1)[:, :, None] * wr + ix.clamp(0, wr - 1)[:, None, :]
        return index.reshape(index.shape[0], -1), ok.reshape(ok.shape[0], -1), ix.to(self.dtype), iy.to(self.dtype)

    @staticmethod
    def _radial_at(prof, p, geom, dx, dy, tiny):
        """``f`` at offsets ``dx`` (B, 1, nx) x ``dy`` (B, ny, 1) from the centre, (B, ny, nx).
        Elliptical isophotes go through ``r^2`` as a quadratic form in (dx, dy), so that only a
        few operations run over the full grid; boxy ones through the generalised radius."""
        X, Y, q, sin, cos, c0 = geom
        B = X.shape[0]
        sb, cb, qb = sin.view(B, 1, 1), cos.view(B, 1, 1), q.view(B, 1, 1)
        if c0 is not None:
            u = -sb * dx + cb * dy
            v = (-cb * dx - sb * dy) / qb
            return prof.radial(Renderer._radius(u, v, c0, tiny), p)
        # u^2 + v^2 with u = -s dx + c dy, v = -(c dx + s dy) / q (not as a quadratic form in
        # dx, dy, whose terms cancel for flat galaxies)
        u = (-sb * dx) + (cb * dy)
        v = (-cb / qb * dx) + (-sb / qb * dy)
        r2 = torch.addcmul(torch.addcmul(torch.full((), tiny, dtype=u.dtype, device=u.device), u, u), v, v)
        return prof.radial_squared(r2, p)

    @staticmethod
    def _radius(u, w, c0, tiny):
        if c0 is None:
            return torch.sqrt(u * u + w * w + tiny)
        C = (c0 + 2.0).reshape(-1, *([1] * (u.ndim - 1)))
        return (torch.abs(u) ** C + torch.abs(w) ** C + tiny) ** (1.0 / C)

    def _cells_gauss(self, prof, shape, geom, xs, ys, order, core=None):
        """Tensor-product Gauss–Legendre integral of ``f`` (times ``1 - core w`` when ``core``,
        a (B,) 0/1 tensor, is given) over cells (unit area) centred at ``xs`` (B, nx) x
        ``ys`` (B, ny); returns (B, ny, nx)."""
        X, Y, q, sin, cos, c0 = geom
        B = X.shape[0]
        t, w = gauss_legendre(order, dtype=self.dtype, device=self.device)
        p = {k: v.view(B, 1, 1) for k, v in shape.items()}
        tiny = torch.finfo(self.dtype).tiny
        acc = None
        for ta, wa in zip(t, w):
            dx = (xs - X[:, None] + (ta - 0.5))[:, None, :]
            tx = None if core is None else core.view(B, 1, 1) * self._taper(dx)
            for tb, wb in zip(t, w):
                dy = (ys - Y[:, None] + (tb - 0.5))[:, :, None]
                f = self._radial_at(prof, p, geom, dx, dy, tiny)
                # weight wa wb, times 1 - core w(dx) w(dy) (w separable: the product is an outer one)
                weight = wa * wb if tx is None else (wa * wb) - ((wa * wb) * tx) * self._taper(dy)
                term = f * weight
                acc = term if acc is None else acc + term
        return acc

    def _cells_exact(self, prof, shape, geom, edges_x, edges_y, moments=False):
        """Integrals of ``q f`` over the cells between ``edges_x`` (B, K+1) and ``edges_y``
        (B, K+1), by exact geometry: each cell is the signed sum of the four triangles
        (centre, edge), each integrated in polar coordinates in the frame where the ellipse is
        a circle, with the radial quadrature graded to the profile's cusp.

        Returns a tuple: the integrals (B, K, K) and, with ``moments``, the first moments
        (x, y) and second moments (xx, xy, yy) about the centre, in pixel axes.
        """
        X, Y, q, sin, cos, c0 = geom
        B = X.shape[0]
        sb, cb, qb = sin.view(B, 1, 1), cos.view(B, 1, 1), q.view(B, 1, 1)
        dx = (edges_x - X[:, None])[:, None, :]
        dy = (edges_y - Y[:, None])[:, :, None]
        a = -sb * dx + cb * dy           # (B, K+1, K+1): corners in the circular frame
        b = (-cb * dx - sb * dy) / qb
        horiz = self._triangles(prof, shape, c0, a[:, :, :-1], b[:, :, :-1], a[:, :, 1:], b[:, :, 1:], moments)
        vert = self._triangles(prof, shape, c0, a[:, :-1, :], b[:, :-1, :], a[:, 1:, :], b[:, 1:, :], moments)
        cells = [h[:, :-1, :] + v[:, :, 1:] - h[:, 1:, :] - v[:, :, :-1] for h, v in zip(horiz, vert)]
        if not moments:
            return tuple(cells)
        C, ma, mb, maa, mab, mbb = cells
        # back to pixel axes: (dx, dy) = A (a, b) with A = [[-s, -q c], [c, -q s]]
        s4, c4, q4 = sin.view(B, 1, 1), cos.view(B, 1, 1), q.view(B, 1, 1)
        a11, a12, a21, a22 = -s4, -q4 * c4, c4, -q4 * s4
        mx = a11 * ma + a12 * mb
        my = a21 * ma + a22 * mb
        mxx = a11 * a11 * maa + 2 * a11 * a12 * mab + a12 * a12 * mbb
        myy = a21 * a21 * maa + 2 * a21 * a22 * mab + a22 * a22 * mbb
        mxy = a11 * a21 * maa + (a11 * a22 + a12 * a21) * mab + a12 * a22 * mbb
        return C, mx, my, mxx, mxy, myy

    def _triangles(self, prof, shape, c0, ax, ay, bx, by, moments=False):
        """Signed integrals of ``f`` over the triangles (origin, A, B) in the circular frame;
        with ``moments`` also of ``a f, b f, a a f, a b f, b b f``. Returns a tuple."""
        o = self.options
        dt, dev = self.dtype, self.device
        B = ax.shape[0]
        tiny = torch.finfo(dt).tiny
        cross = ax * by - ay * bx
        dot = ax * bx + ay * by
        dtheta = torch.atan2(cross, dot)
        scale = torch.sqrt((ax * ax + ay * ay) * (bx * bx + by * by))
        live = torch.abs(cross) > 64 * torch.finfo(dt).eps * scale
        theta_a = torch.atan2(ay, ax)
        tau, wtau = gauss_legendre(o.core_angular_order if moments else o.angular_order, dtype=dt, device=dev)
        theta = theta_a[..., None] + dtheta[..., None] * tau          # (B, E1, E2, Mt)
        ex, ey = torch.cos(theta), torch.sin(theta)
        den = ex * (by - ay)[..., None] - ey * (bx - ax)[..., None]
        den = torch.where(live[..., None] & (den != 0), den, torch.ones_like(den))
        R = torch.where(live[..., None], cross[..., None] / den, torch.zeros_like(den)).clamp(min=0.0)
        if c0 is None:
            g = None
        else:
            C = (c0 + 2.0).view(B, 1, 1, 1)
            g = (torch.abs(ex) ** C + torch.abs(ey) ** C) ** (1.0 / C)
        radial = self._radial_integral(prof, shape, R, g, tiny, 3 if moments else 1,
                                       o.core_radial_order if moments else o.radial_order)
        if moments:
            angular = (torch.ones_like(ex), ex, ey, ex * ex, ex * ey, ey * ey)
            powers = (0, 1, 1, 2, 2, 2)
        else:
            angular, powers = (None,), (0,)
        out = []
        for ang, pw in zip(angular, powers):
            integrand = radial[pw] if ang is None else radial[pw] * ang
            tri = dtheta * (integrand * wtau).sum(-1)
            out.append(torch.where(live, tri, torch.zeros_like(tri)))
        return tuple(out)

    def _radial_integral(self, prof, shape, R, g, tiny, n_powers=1, order=None):
        """``int_0^R rho^(1+k) f(rho g) drho`` for k < n_powers, by Gauss–Legendre panels:
        [0, r1] graded to the central cusp, then logarithmic panels between the profile's radii
        and up to R. Returns a list indexed by k."""
        o = self.options
        B = R.shape[0]
        nd = R.ndim + 1
        t, w = gauss_legendre(order or o.radial_order, dtype=self.dtype, device=self.device)
        p = {k: v.view(B, *([1] * (nd - 1))) for k, v in shape.items()}
        pr = {k: v.view(B, *([1] * (R.ndim - 1))) for k, v in shape.items()}
        gg = 1.0 if g is None else g
        R = R.clamp(min=tiny)
        bounds = [torch.minimum(R, (r / gg)).clamp(min=tiny) for r in prof.radii(pr)] + [R]
        cusp = prof.cusp(pr)
        if isinstance(cusp, torch.Tensor):
            power = (2.0 / cusp).clamp(1.0, 24.0).detach().view(B, *([1] * (nd - 1)))
        else:
            power = min(max(2.0 / float(cusp), 1.0), 24.0)
        gn = gg if g is None else g[..., None]
        r1 = bounds[0][..., None]
        # nodes at the very centre would underflow to 0, where a cusp's derivative is infinite
        rho = (r1 * t ** power).clamp(min=tiny ** 0.5)
        base = r1 * r1 * (power * t ** (2.0 * power - 1.0) * w) * prof.radial(rho * gn, p)
        totals = [m.sum(-1) for m in _radial_moments(base, rho, n_powers)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            lo, hi = lo[..., None], hi[..., None]
            span = torch.log(hi / lo)
            rho = lo * torch.exp(span * t)
            base = span * (rho * rho * w) * prof.radial(rho * gn, p)
            totals = [tot + m.sum(-1) for tot, m in zip(totals, _radial_moments(base, rho, n_powers))]
        return totals

    # -- convolution and point sources -------------------------------------------------
    def _convolve(self, acc, extra, points, values, sl, B, shift=False):
        ny, nx = self.fft_shape
        hr, wr = self.render_shape
        psf_hat = self._psf_hat if self._psf_hat.shape[0] == 1 else self._psf_hat[sl]
        point_hat = self._point_hat if self._point_hat.shape[0] == 1 else self._point_hat[sl]
        # moving the image by +1 pixel (k cells): d/dx0 = -k d/dx, i.e. -2 pi i f k in Fourier
        # space (the Nyquist frequencies, whose derivative is undefined, left out), plus the
        # correction for the core's terms folded from mirror frequencies
        fx = torch.where(torch.abs(self._fx) < 0.5, self._fx, torch.zeros_like(self._fx))
        fy = torch.where(torch.abs(self._fy) < 0.5, self._fy, torch.zeros_like(self._fy))
        kx, ky = -2j * math.pi * self.k * fx, (-2j * math.pi * self.k * fy)[:, None]
        spec = dspec_x = dspec_y = None
        if acc is not None:
            cells = torch.fft.rfft2(acc, s=(ny, nx))
            spec = (cells if extra is None else cells + extra[0]) * psf_hat
            if shift:
                dspec_x, dspec_y = spec * kx, spec * ky
                if extra is not None:
                    # the core's terms folded from mirror frequencies (see _core_spectrum), which
                    # live in a few rows and columns near Nyquist
                    c = self._core_nodes()
                    ix, iy = c["ix_m"], c["iy_m"]
                    cx_mx, cx_mxy, cy_my, cy_mxy = (self.k * e for e in extra[1:])
                    psf_cols, psf_rows = psf_hat[:, :, ix], psf_hat[:, iy, :]
                    dspec_x = dspec_x.index_add_(2, ix, cx_mx * psf_cols)
                    rows_x = torch.zeros_like(cy_my).index_add_(2, ix, cx_mxy) * psf_rows
                    dspec_x = dspec_x.index_add_(1, iy, rows_x)
                    dspec_y = dspec_y.index_add_(1, iy, cy_my.index_add(2, ix, cy_mxy) * psf_rows)
        for comp in points:
            X = self._to_cells_x(values[f"{comp.name}.x0"])
            Y = self._to_cells_y(values[f"{comp.name}.y0"])
            # a source outside the render grid sends no light into the stamp; in the periodic
            # FFT box it would wrap around, so it is left out
            inside = (X >= 0) & (X <= wr - 1) & (Y >= 0) & (Y <= hr - 1)
            flux = torch.where(inside, self._flux(values, f"{comp.name}.mag", sl), torch.zeros_like(X))
            phase_y = torch.exp(-2j * math.pi * self._fy[None, :] * Y[:, None])
            phase_x = torch.exp(-2j * math.pi * self._fx[None, :] * X[:, None])
            term = flux[:, None, None] * phase_y[:, :, None] * phase_x[:, None, :] * point_hat
            spec = term if spec is None else spec + term
            if shift:
                dspec_x = term * kx if dspec_x is None else dspec_x + term * kx
                dspec_y = term * ky if dspec_y is None else dspec_y + term * ky
        if spec is None:
            zero = torch.zeros(B, self.height, self.width, dtype=self.dtype, device=self.device)
            return (zero, zero, zero) if shift else zero
        out = self._to_pixels(torch.fft.irfft2(spec, s=(ny, nx)), B)
        if not shift:
            return out
        dx = self._to_pixels(torch.fft.irfft2(dspec_x, s=(ny, nx)), B)
        dy = self._to_pixels(torch.fft.irfft2(dspec_y, s=(ny, nx)), B)
        return out, dx, dy

    def _to_pixels(self, conv, B):
        """The stamp's pixels from the convolved render grid (cropped; sampled or binned when
        the PSF is oversampled)."""
        k = self.k
        conv = conv[:, self.hy:self.hy + self.height * k, self.hx:self.hx + self.width * k]
        if k == 1:
            return conv
        if self.psf_kind == "optical":
            return conv.reshape(B, self.height, k, self.width, k).sum(dim=(2, 4))
        return conv[:, k // 2::k, k // 2::k]

    def _sky(self, comp, values, sl):
        p = {s.name: values[f"{comp.name}.{s.name}"][:, None, None] for s in comp.profile.params}
        centre = self._centre[sl]
        dx = (torch.arange(self.width, dtype=self.dtype, device=self.device) + 1.0)[None, None, :] \
            - centre[:, 0, None, None]
        dy = (torch.arange(self.height, dtype=self.dtype, device=self.device) + 1.0)[None, :, None] \
            - centre[:, 1, None, None]
        return comp.profile.evaluate(dx, dy, p).expand(-1, self.height, self.width)


def _is_fixed_zero(param) -> bool:
    """Whether a parameter is fixed at 0 for every galaxy (then the cheaper ellipse is used)."""
    if param.tie is not None or param.fixed is False:
        return False
    if param.value is None:
        return True
    return bool(np.all(np.asarray(torch.as_tensor(param.value).cpu()) == 0))


# the cell average along one axis from centre values, to sixth order: ``1 + d^2/24 - 17 d^4/5760``
# in central differences (the expansion of ``sinh(D/2) / (D/2)``), as a five-point filter
_ST2 = -17.0 / 5760.0
_ST1 = 1.0 / 24.0 - 4.0 * _ST2
_ST0 = 1.0 - 2.0 / 24.0 + 6.0 * _ST2


def _radial_moments(base, rho, n):
    """``base rho^k`` for k < n, by products (no powers)."""
    out = [base]
    for _ in range(n - 1):
        out.append(out[-1] * rho)
    return out


def _stencil_cells(g: torch.Tensor) -> torch.Tensor:
    """Cell integrals (unit cells) from values ``g`` (..., H + 4, W + 4) at the cell centres of
    a grid two cells larger on every side: the one-axis filter ``1 + d^2/24 - 17 d^4/5760``
    applied along x, then along y (the product's extra terms are of eighth and higher order).
    Returns (..., H, W)."""
    a, b = _ST1 / _ST0, _ST2 / _ST1   # the filter is _ST0 (1, a, a b) on offsets (0, +-1, +-2)
    h = torch.add(g[..., 1:-3], g[..., 3:-1]).add_(torch.add(g[..., :-4], g[..., 4:]), alpha=b)
    h = torch.add(g[..., 2:-2], h, alpha=a)
    v = torch.add(h[..., 1:-3, :], h[..., 3:-1, :]).add_(torch.add(h[..., :-4, :], h[..., 4:, :]), alpha=b)
    return torch.add(h[..., 2:-2, :], v, alpha=a).mul_(_ST0 * _ST0)


def _fold_weight(f: torch.Tensor) -> torch.Tensor:
    """Weight of the mirror frequency: 0 below the fold band, rising smoothly (all derivatives
    continuous) to 1 at its top and above."""
    lo, hi = _FOLD_BAND
    t = ((torch.abs(f) - lo) / (hi - lo)).clamp(0.0, 1.0)
    a = torch.where(t > 0, torch.exp(-1.0 / t.clamp(min=1e-12)), torch.zeros_like(t))
    b = torch.where(t < 1, torch.exp(-1.0 / (1.0 - t).clamp(min=1e-12)), torch.zeros_like(t))
    return a / (a + b)


def _replace(flat: torch.Tensor, index: torch.Tensor, ok: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``flat`` (B, N) with the entries at ``index`` (B, M) replaced by ``cells`` where ``ok``;
    out of place, so autodiff flows through both."""
    old = torch.gather(flat, 1, index)
    delta = torch.where(ok, cells.reshape(index.shape) - old, torch.zeros_like(old))
    return flat.scatter_add(1, index, delta)


def render(model: Model, shape: tuple[int, int], psf=None, *, psf_kind: str = "star",
           psf_oversampling: int = 1, values: Mapping | None = None, dtype: torch.dtype = torch.float64,
           device: torch.device | str = "cpu", options: RenderOptions | None = None) -> np.ndarray:
    """Render one stamp of ``shape`` (ny, nx) from a model's own values; returns a NumPy array.

    See :class:`Renderer` for the batched interface and the meaning of the arguments.
    """
    r = Renderer(model, [shape], psf, psf_kind=psf_kind, psf_oversampling=psf_oversampling,
                 options=options, dtype=dtype, device=device)
    return r.crop(r(values), 0)
