"""Closed-form diffusion problems with exact denoisers (tests, benchmarks, schedule calibration).

Two data distributions whose posterior mean ``D(x, sigma) = E[x0 | x_sigma = x]`` is known in
closed form, in both coordinate systems ComfyUI hands a sampler (see
:mod:`.parameterization`):

* **VE form** ``x = x0 + sigma * eps`` (``alpha_t = 1``, ``sigma_t = sigma``);
* **flow form** ``x = (1 - sigma) x0 + sigma * eps`` (``alpha_t = 1 - sigma``).

Both are instances of ``x = alpha_t x0 + sigma_t eps``, and everything below is written for
that general form. The probability-flow ODE (Song et al. 2021, eq. 13; Karras et al. 2022,
eq. 3 for VE) has the same right-hand side in both coordinate systems,

    dx / dsigma = (x - D(x, sigma)) / sigma,

because ``d alpha_t / d sigma = -1`` in flow form and the marginal velocity is
``E[eps - x0 | x] = (x - D) / sigma``. It is integrated in ``u = log sigma``
(``dx/du = x - D``), which is smooth at ``sigma = 1`` for flow models and keeps the step
count independent of the sigma range.

* :class:`GaussianData` (``x0 ~ N(0, c^2 I)``): linear denoiser ``D = alpha c^2 / v * x`` with
  ``v = alpha^2 c^2 + sigma^2``; every ODE solution is a rescaling ``x(s) = x(s') * sqrt(v(s) /
  v(s'))``. The tier-0 problem of the benchmark (exactly solvable, used to check coefficients
  and convergence orders). The AYS paper (Sabour et al. 2024, app. B) uses the same setting.
* :class:`GaussianMixture` (isotropic components): exact denoiser with log-sum-exp
  responsibilities, samples from the exact marginal, and a reference ODE solution from an
  8th-order Runge-Kutta method (Dormand-Prince DOP853 in scipy) at tight tolerance. The
  tier-1 problem: multi-modal, so a coarse solver can land in a different component
  ("mode flip"), which is measured by :meth:`GaussianMixture.nearest_component`.
* :class:`CountingDenoiser`: a ``model(x, sigma_batch, **extra_args)`` callable for the
  k-diffusion sampler contract that counts model evaluations (NFE).
* :data:`RANGE_PRESETS` and :data:`MIXTURE_PRESETS`: the sigma ranges of real model families
  and the mixture shapes used by the tests and the benchmark; :func:`make_problem` combines them.

Everything is float64 on the CPU. scipy is needed only for
:meth:`GaussianMixture.ode_solution` (install the ``test`` or ``bench`` extra).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from .parameterization import Parameterization

Form = Literal["ve", "flow"]
FORMS: tuple[str, ...] = get_args(Form)

__all__ = [
    "FORMS",
    "MIXTURE_PRESETS",
    "RANGE_PRESETS",
    "CountingDenoiser",
    "Form",
    "GaussianData",
    "GaussianMixture",
    "GuidedMixture",
    "MixturePreset",
    "Problem",
    "RangePreset",
    "make_problem",
    "per_sample_rms",
]

_DTYPE = torch.float64
#: where the reference ODE stops before the exact final denoise when integrating to sigma = 0
SIGMA_FLOOR = 1e-6


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def _sigma_column(sigma: Any, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (float, 0-d or per-sample 1-d tensor) as a float64 ``[B, 1]`` column."""
    s = torch.as_tensor(sigma, dtype=_DTYPE, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(s.shape)}")
    return s.reshape(-1, 1)


def _alpha_sigma(sigma: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t)`` for ComfyUI's sigma in the given form."""
    _check_form(form)
    if form == "ve":
        return torch.ones_like(sigma), sigma
    if bool((sigma > 1.0).any()):
        raise ValueError(f"flow-form sigma must be <= 1, got max {float(sigma.max())!r}")
    return 1.0 - sigma, sigma


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily run torch's CPU ops on ``threads`` threads (``None``: unchanged)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def per_sample_rms(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Root-mean-square difference per sample (over all non-batch dimensions), float64 ``[B]``."""
    diff = (x.to(_DTYPE) - reference.to(_DTYPE)).reshape(x.shape[0], -1)
    return diff.pow(2).mean(dim=1).sqrt()


# ---------------------------------------------------------------------------------------------
# Tier 0: Gaussian data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianData:
    """``x0 ~ N(0, c^2 I)`` in ``dim`` dimensions: exact denoiser and exact ODE solutions."""

    c: float = 1.0
    dim: int = 8

    def __post_init__(self) -> None:
        if not self.c > 0:
            raise ValueError(f"GaussianData needs c > 0, got {self.c!r}")

    def marginal_var(self, sigma: Any, form: Form = "ve") -> torch.Tensor:
        """Per-coordinate variance ``alpha_t^2 c^2 + sigma_t^2`` of ``x_sigma`` (float64)."""
        s = torch.as_tensor(sigma, dtype=_DTYPE)
        alpha, sig = _alpha_sigma(s, form)
        return alpha**2 * self.c**2 + sig**2

    def denoise(self, x: torch.Tensor, sigma: Any, form: Form = "ve") -> torch.Tensor:
        """Exact posterior mean ``E[x0 | x] = alpha c^2 / (alpha^2 c^2 + sigma^2) * x``.

        VE form: ``c^2 / (c^2 + sigma^2) x``; flow form: ``(1 - s) c^2 / ((1 - s)^2 c^2 + s^2) x``.
        """
        flat = x.to(_DTYPE).reshape(x.shape[0], -1)
        alpha, sig = _alpha_sigma(_sigma_column(sigma, flat), form)
        coef = alpha * self.c**2 / (alpha**2 * self.c**2 + sig**2)
        return (coef * flat).reshape(x.shape)

    def sample(self, n: int, sigma: float, form: Form = "ve", generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of ``x_sigma`` from the exact marginal ``N(0, v I)``, shape ``[n, dim]``."""
        std = float(self.marginal_var(sigma, form).sqrt())
        return std * torch.randn(n, self.dim, dtype=_DTYPE, generator=generator)

    def ode_solution(self, x: torch.Tensor, sigma_start: float, sigma_end: float, form: Form = "ve") -> torch.Tensor:
        """Exact probability-flow ODE solution ``x(sigma_end)`` from ``x(sigma_start) = x``.

        For Gaussian data the flow is a pure rescaling by the ratio of marginal standard
        deviations: ``x(sigma_end) = x * sqrt(v(sigma_end) / v(sigma_start))``; in VE form
        ``sqrt((c^2 + sigma_end^2) / (c^2 + sigma_start^2))``. ``sigma_end = 0`` is exact.
        """
        ratio = (self.marginal_var(sigma_end, form) / self.marginal_var(sigma_start, form)).sqrt()
        return x.to(_DTYPE) * ratio


# ---------------------------------------------------------------------------------------------
# Tier 1: isotropic Gaussian mixture
# ---------------------------------------------------------------------------------------------


class GaussianMixture:
    """Isotropic Gaussian mixture ``sum_k w_k N(m_k, s_k^2 I)`` with an exact denoiser.

    Args:
        means: ``[K, d]`` component means.
        stds: ``[K]`` component standard deviations (> 0).
        weights: ``[K]`` non-negative weights (normalised here).
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor) -> None:
        means = torch.as_tensor(means, dtype=_DTYPE)
        stds = torch.as_tensor(stds, dtype=_DTYPE).flatten()
        weights = torch.as_tensor(weights, dtype=_DTYPE).flatten()
        if means.dim() != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(means.shape)}")
        k = means.shape[0]
        if stds.shape != (k,) or weights.shape != (k,):
            raise ValueError(
                f"stds and weights need shape ({k},) to match {k} means, got {tuple(stds.shape)} "
                f"and {tuple(weights.shape)}"
            )
        if bool((stds <= 0).any()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("stds must be > 0 and weights >= 0 with a positive sum")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()
        self.log_weights = torch.log(self.weights)
        self._mean_sq = (self.means * self.means).sum(1)

    @classmethod
    def random(
        cls,
        dim: int = 16,
        n_components: int = 8,
        std_range: tuple[float, float] = (0.05, 0.3),
        seed: int = 0,
    ) -> GaussianMixture:
        """Means ``~ N(0, I)``, stds uniform in ``std_range``, weights uniform in [0.5, 1.5] then normalised."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(n_components, dim, dtype=_DTYPE, generator=g)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(n_components, dtype=_DTYPE, generator=g)
        weights = 0.5 + torch.rand(n_components, dtype=_DTYPE, generator=g)
        return cls(means, stds, weights)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    def _terms(self, flat: torch.Tensor, sigma: Any, form: str):
        alpha, sig = _alpha_sigma(_sigma_column(sigma, flat), form)  # [B, 1]
        var = alpha**2 * self.stds**2 + sig**2  # [B, K]: per-coordinate variance of component k
        # |x - alpha m_k|^2 expanded into matrix products (float64: the cancellation error,
        # ~1e-14 absolute, is far below the smallest component variance used here)
        sq = (
            (flat * flat).sum(1, keepdim=True) - 2.0 * alpha * (flat @ self.means.T) + alpha**2 * self._mean_sq
        ).clamp_min(0.0)  # [B, K]
        log_p = self.log_weights - 0.5 * self.dim * torch.log(var) - 0.5 * sq / var
        return alpha, sig, var, log_p

    def log_responsibilities(self, x: torch.Tensor, sigma: Any, form: Form = "ve") -> torch.Tensor:
        """``log p(k | x_sigma = x)``, ``[B, K]`` (normalised with log-sum-exp)."""
        flat = x.to(_DTYPE).reshape(x.shape[0], -1)
        *_, log_p = self._terms(flat, sigma, form)
        return log_p - torch.logsumexp(log_p, dim=1, keepdim=True)

    def denoise(self, x: torch.Tensor, sigma: Any, form: Form = "ve") -> torch.Tensor:
        """Exact posterior mean ``E[x0 | x_sigma = x]`` (Bayes' rule, per component then mixed).

        For ``x = alpha x0 + sigma eps`` and component ``k`` the marginal is
        ``N(alpha m_k, v_k I)`` with ``v_k = alpha^2 s_k^2 + sigma^2`` and
        ``E[x0 | x, k] = (sigma^2 m_k + alpha s_k^2 x) / v_k``; the result mixes these with the
        responsibilities ``p(k | x)``. ``sigma`` may be a scalar or per sample.
        """
        flat = x.to(_DTYPE).reshape(x.shape[0], -1)
        alpha, sig, var, log_p = self._terms(flat, sigma, form)
        resp = torch.softmax(log_p, dim=1)  # [B, K]
        coef_x = (resp * alpha * self.stds**2 / var).sum(1, keepdim=True)  # [B, 1]
        coef_m = resp * sig**2 / var  # [B, K]
        return (coef_x * flat + coef_m @ self.means).reshape(x.shape)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws of ``x0`` and their component indices."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x0 = self.means[k] + self.stds[k, None] * torch.randn(n, self.dim, dtype=_DTYPE, generator=generator)
        return x0, k

    def sample(self, n: int, sigma: float, form: Form = "ve", generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of ``x_sigma = alpha x0 + sigma eps`` from the exact marginal, ``[n, dim]``."""
        return self.sample_with_noise(n, sigma, form, generator)[0]

    def sample_with_noise(
        self, n: int, sigma: float, form: Form = "ve", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` and the standard-normal ``eps`` of each draw (the same draws)."""
        s = torch.tensor([float(sigma)], dtype=_DTYPE)
        alpha, sig = _alpha_sigma(s, form)
        x0, _ = self.sample_data(n, generator)
        eps = torch.randn(n, self.dim, dtype=_DTYPE, generator=generator)
        return alpha * x0 + sig * eps, eps

    def nearest_component(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable component of a clean sample: ``argmax_k log w_k + log N(x; m_k, s_k^2 I)``."""
        flat = x.to(_DTYPE).reshape(x.shape[0], -1)
        *_, log_p = self._terms(flat, 0.0, "ve")
        return log_p.argmax(dim=1)

    def ode_solution(
        self,
        x: torch.Tensor,
        sigma_start: float,
        sigma_end: float,
        form: Form = "ve",
        rtol: float = 1e-10,
        atol: float = 1e-12,
        sigma_floor: float = SIGMA_FLOOR,
        threads: int | None = 1,
    ) -> torch.Tensor:
        """Reference probability-flow ODE solution ``x(sigma_end)`` from ``x(sigma_start) = x``.

        Integrates ``dx/du = x - D(x, e^u)`` in ``u = log sigma`` (valid in both forms, see the
        module docstring) with scipy's DOP853 (Hairer, Norsett & Wanner 1993, 8th order),
        vectorised over the batch. For ``sigma_end = 0`` it integrates to ``sigma_floor`` and
        returns ``D(x(sigma_floor), sigma_floor)``, whose distance to the exact limit is
        ``O(sigma_floor^2 / s_k^2)`` (below 1e-8 for ``s_k >= 0.02``).

        The right-hand side works on small tensors, where torch's intra-op thread pool costs
        more than it gains (up to 20x slower on a busy 2-core machine), so the integration runs
        with ``torch.set_num_threads(threads)`` and restores the previous setting afterwards;
        ``threads=None`` leaves it alone.
        """
        try:
            from scipy.integrate import solve_ivp
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "GaussianMixture.ode_solution needs scipy: pip install 'comfyui-fewstep[test]'"
            ) from exc
        _check_form(form)
        sigma_start, sigma_end = float(sigma_start), float(sigma_end)
        if not sigma_start > 0 or sigma_end < 0 or sigma_end > sigma_start:
            raise ValueError(
                f"need sigma_start > 0 and 0 <= sigma_end <= sigma_start, got {sigma_start!r}, {sigma_end!r}"
            )
        shape = x.shape
        flat = x.to(_DTYPE).reshape(shape[0], -1).clone()
        target = sigma_end if sigma_end > 0 else min(sigma_floor, sigma_start)
        if target < sigma_start:
            n = flat.shape[0]

            def rhs(u: float, y):
                xs = torch.from_numpy(y).view(n, -1)
                return (xs - self.denoise(xs, math.exp(u), form)).numpy().ravel()

            with _torch_threads(threads):
                sol = solve_ivp(
                    rhs,
                    (math.log(sigma_start), math.log(target)),
                    flat.numpy().ravel(),
                    method="DOP853",
                    rtol=rtol,
                    atol=atol,
                )
            if not sol.success:
                raise RuntimeError(f"reference ODE integration failed: {sol.message}")
            flat = torch.from_numpy(sol.y[:, -1].copy()).view(n, -1)
        if sigma_end == 0.0:
            flat = self.denoise(flat, target, form)
        return flat.reshape(shape)


class GuidedMixture:
    """Classifier-free guidance on a mixture (Ho & Salimans 2022, arXiv 2207.12598, eq. 6 in data
    prediction): ``D = D_u + cfg (D_c - D_u)``, with ``D_u`` the mixture's exact denoiser and ``D_c``
    that of its first ``n_cond`` components (the "prompt"). Wrap it in :class:`CountingDenoiser` for
    the sampler contract; its probability-flow ODE (:meth:`GaussianMixture.ode_solution` does not
    apply) is solved numerically by the callers.
    """

    def __init__(self, mixture: GaussianMixture, n_cond: int, cfg: float) -> None:
        if not 1 <= n_cond <= mixture.n_components:
            raise ValueError(f"n_cond must be 1..{mixture.n_components}, got {n_cond!r}")
        self.mixture, self.cfg = mixture, float(cfg)
        self.cond = GaussianMixture(mixture.means[:n_cond], mixture.stds[:n_cond], mixture.weights[:n_cond])

    def denoise(self, x: torch.Tensor, sigma: Any, form: Form = "ve") -> torch.Tensor:
        d_u = self.mixture.denoise(x, sigma, form)
        return d_u + self.cfg * (self.cond.denoise(x, sigma, form) - d_u)


# ---------------------------------------------------------------------------------------------
# NFE-counting model for the sampler contract
# ---------------------------------------------------------------------------------------------


class CountingDenoiser:
    """``model(x, sigma_batch, **extra_args) -> denoised`` backed by an exact denoiser.

    Implements the k-diffusion / ComfyUI sampler contract (extra keyword arguments such as
    ``model_options``, ``seed`` or ``denoise_mask`` are accepted and ignored). ``nfe`` counts
    calls, ``sigmas`` records the sigma of the first sample at each call. The output has the
    dtype and device of ``x``; the denoiser runs in float64 on the CPU.
    """

    def __init__(self, problem: GaussianData | GaussianMixture | GuidedMixture, form: Form = "ve") -> None:
        _check_form(form)
        self.problem = problem
        self.form = form
        self.nfe = 0
        self.sigmas: list[float] = []

    def reset(self) -> None:
        self.nfe = 0
        self.sigmas = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        self.nfe += 1
        s = torch.as_tensor(sigma).to("cpu", _DTYPE).reshape(-1)
        self.sigmas.append(float(s[0].detach()))
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        out = self.problem.denoise(x.to("cpu", _DTYPE), s, self.form)  # differentiable in x and sigma
        return out.to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RangePreset:
    """The sigma range and coordinate form of a model family."""

    name: str
    form: Form
    sigma_min: float
    sigma_max: float
    family: str
    shift: float = 1.0
    description: str = ""
    sigma_data: float = 1.0

    def parameterization(self) -> Parameterization:
        """Coordinates of the range; SD1.5's discrete family carries its 1000-step timestep table
        (time-based schedules and the AYS / GITS tables are those of a discrete-time model). The
        data scale is ``sigma_data`` (1: the mixtures' per-dimension variance is 0.7-1)."""
        table = _SD15_TABLE if self.family in ("eps", "v", "x0") else None
        return Parameterization(self.form, self.sigma_min, self.sigma_max, self.family, table,
                                self.sigma_data)


def _sd15_table() -> tuple[float, ...]:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=_DTYPE) ** 2
    abar = torch.cumprod(1.0 - betas, 0)
    return tuple(float(s) for s in ((1 - abar) / abar).sqrt())


def _flow_sigma(t: float, shift: float) -> float:
    return shift * t / (1.0 + (shift - 1.0) * t)


_SD15_TABLE = _sd15_table()
_SD15_MIN, _SD15_MAX = _SD15_TABLE[0], _SD15_TABLE[-1]

#: sigma ranges of real model families (``flow_*`` use ComfyUI's 1000-step discrete flow)
RANGE_PRESETS: dict[str, RangePreset] = {
    p.name: p
    for p in (
        RangePreset("sd15", "ve", _SD15_MIN, _SD15_MAX, "eps", description="SD1.5/SDXL discrete, 0.0292..14.61"),
        RangePreset("edm", "ve", 0.002, 80.0, "edm", description="EDM, 0.002..80"),
        RangePreset(
            "flow_shift1", "flow", _flow_sigma(1e-3, 1.0), 1.0, "flow", 1.0, "rectified flow, shift 1, 0.001..1"
        ),
        RangePreset(
            "flow_shift3", "flow", _flow_sigma(1e-3, 3.0), 1.0, "flow", 3.0, "rectified flow, shift 3, 0.003..1"
        ),
    )
}


@dataclass(frozen=True)
class MixturePreset:
    """Shape of a benchmark mixture (see :meth:`GaussianMixture.random`)."""

    name: str
    dim: int
    n_components: int
    std_range: tuple[float, float]
    seed: int = 0

    def build(self) -> GaussianMixture:
        return GaussianMixture.random(self.dim, self.n_components, self.std_range, self.seed)


#: mixture shapes: component widths from 0.02 (final-step regime dominates) to 0.3
MIXTURE_PRESETS: dict[str, MixturePreset] = {
    p.name: p
    for p in (
        MixturePreset("gmm16", 16, 8, (0.05, 0.30)),
        MixturePreset("gmm16_narrow", 16, 8, (0.02, 0.06)),
        MixturePreset("gmm64_wide", 64, 16, (0.10, 0.30), seed=1),
        MixturePreset("gmm2", 2, 6, (0.05, 0.20), seed=2),
    )
}


@dataclass
class Problem:
    """A mixture, a sigma range, starting noise and the reference solution at sigma = 0."""

    name: str
    mixture: GaussianMixture
    range: RangePreset
    x_start: torch.Tensor
    reference: torch.Tensor
    reference_component: torch.Tensor
    #: the standard-normal noise in ``x_start = alpha x0 + sigma_max * noise``, when known
    noise: torch.Tensor | None = None

    @property
    def form(self) -> Form:
        return self.range.form

    def denoiser(self) -> CountingDenoiser:
        return CountingDenoiser(self.mixture, self.form)


def make_problem(range_name: str, mixture_name: str = "gmm16", n_samples: int = 512, seed: int = 0) -> Problem:
    """Build a :class:`Problem`: noise from the exact marginal at ``sigma_max``, DOP853 reference at 0."""
    if range_name not in RANGE_PRESETS:
        raise ValueError(f"unknown range preset {range_name!r}; expected one of {tuple(RANGE_PRESETS)}")
    if mixture_name not in MIXTURE_PRESETS:
        raise ValueError(f"unknown mixture preset {mixture_name!r}; expected one of {tuple(MIXTURE_PRESETS)}")
    rng = RANGE_PRESETS[range_name]
    mixture = MIXTURE_PRESETS[mixture_name].build()
    g = torch.Generator().manual_seed(seed)
    x_start, noise = mixture.sample_with_noise(n_samples, rng.sigma_max, rng.form, generator=g)
    reference = mixture.ode_solution(x_start, rng.sigma_max, 0.0, rng.form)
    return Problem(
        f"{range_name}/{mixture_name}", mixture, rng, x_start, reference,
        mixture.nearest_component(reference), noise,
    )
