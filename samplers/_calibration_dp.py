"""Dynamic programming over a teacher grid: the coarse steps with the least summed local error.

Given a teacher trajectory cached on a fine grid ``g_0 > g_1 > ... > g_(G-1)`` (states ``x_i`` and
data predictions ``D_i = D(x_i, g_i)``), the local error of one solver step from the teacher
state at ``g_i`` to ``g_j`` needs no model call: the step is a fixed linear combination of cached
vectors, ``x_j' = a x_i + b D_i + ...``, compared with the teacher's ``x_j``. GITS (Chen et al.
2024, arXiv 2405.11326, Alg. 1) picks the coarse steps by a shortest path over such costs; this
module does the same for the DPM-Solver++ steps of :mod:`.multistep` and :mod:`.singlestep`:

* first order (DDIM / DPM-Solver++1): ``x_j' = (sigma_j / sigma_i) x_i + alpha_j (1 - e^(-h)) D_i``
  (Lu et al. 2022, arXiv 2211.01095, eq. 10), an ``O(G^2)`` table;
* multistep second order: the same plus ``alpha_j c1 / r (D_i - D_k)`` with ``k`` the previous
  coarse point, ``r = h_prev / h`` and ``c1 = (1 - e^(-h)) / 2`` (midpoint) or ``h phi_2(-h)``
  (heun) (arXiv 2211.01095, Alg. 2). The cost depends on the pair ``(k, i)``, so the DP state is
  the last two points: an ``O(G^3)`` table. Third-order steps are scored with this second-order
  cost (a fourth index would make the table ``O(G^4)``); the local search that follows runs the
  true solver;
* singlestep order 2 / 3: the stage prediction at ``lambda_i + r h`` (``r = 1/2`` or ``2/3``; the
  3S update only combines ``D_i`` with its second stage) is replaced by the teacher's ``D`` at the
  nearest grid point, with ``r`` set to that point's actual ratio.

Squared norms of these combinations come from per-sample Gram matrices of the cached vectors
(one ``[B, 2G, 2G]`` reduction), so every cost is ``O(1)`` whatever the data size. A local error
at noise level ``sigma_j`` is weighted by ``sqrt(c^2 / (alpha_j^2 c^2 + sigma_j^2))``, the
contraction of the probability-flow map from ``sigma_j`` to 0 for Gaussian data of variance ``c^2``
(the data's second moment, estimated from the teacher's end points), so that errors made at high
noise are not over-counted in VE coordinates. All arithmetic is float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .parameterization import Parameterization
from .phi import h_phi

__all__ = ["GridCosts", "dp_multistep", "dp_singlestep"]

_F64 = torch.float64
#: smallest ratio ``r = h_prev / h`` a multistep step may have in the DP: the second-order update weights
#: ``D_i - D_k`` by ``1 / r``, so a long step after a short one amplifies the (coarse-run) history error
R_MIN = 0.4


def _gram_of_sample(xs: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """Mean-square products of one sample's cached vectors ``[x_0..x_(G-1), D_0..D_(G-1)]``:
    ``[2G, 2G]`` float64 on the host. One sample at a time in float64 keeps the extra memory at
    ``2 G d`` float64 values, against the whole cache's ``2 G B d`` float32."""
    vecs = torch.cat([xs.reshape(xs.shape[0], -1), ds.reshape(ds.shape[0], -1)]).to(_F64)  # [2G, d]
    return (vecs @ vecs.T).cpu() / vecs.shape[-1]


class GridCosts:
    """Local-error tables on a teacher grid (see the module docstring).

    Args:
        sigmas: the grid, descending, float64 host values (``G`` points, none zero).
        xs, ds: teacher states and data predictions, ``[G, B, ...]``.
        end: the teacher's end point (its data prediction at the last grid point), ``[B, ...]``.
        parameterization: VE or flow coordinates of the states.
    """

    def __init__(self, sigmas: Sequence[float], xs: torch.Tensor, ds: torch.Tensor, end: torch.Tensor,
                 parameterization: Parameterization) -> None:
        p = parameterization
        self.sigmas = [float(s) for s in sigmas]
        self.G = len(self.sigmas)
        self.lambdas = torch.tensor([p.lambda_(s) for s in self.sigmas], dtype=_F64)
        self.alphas = torch.tensor([p.alpha(s) for s in self.sigmas], dtype=_F64)
        sig = torch.tensor(self.sigmas, dtype=_F64)
        G, B = xs.shape[0], xs.shape[1]
        gram = torch.stack([_gram_of_sample(xs[:, n], ds[:, n]) for n in range(B)])
        self._gram = gram
        self.xx, self.dd = gram[:, :G, :G], gram[:, G:, G:]
        self.xd = gram[:, :G, G:]  # xd[b, i, j] = <x_i, D_j>
        c2 = float(end.to(_F64).pow(2).mean())
        self.weight = (c2 / (self.alphas**2 * c2 + sig**2)).sqrt()
        self.jacobian = self.alphas * c2 / (self.alphas**2 * c2 + sig**2)
        # step i -> j: a = sigma_j / sigma_i, b = alpha_j - alpha_i a = alpha_j (1 - e^-h)
        self.a = sig[None, :] / sig[:, None]
        self.b = self.alphas[None, :] - self.alphas[:, None] * self.a
        self.h = self.lambdas[None, :] - self.lambdas[:, None]
        self.valid = torch.ones(self.G, self.G, dtype=torch.bool).triu(1)
        ei = torch.diagonal(self.xx, dim1=1, dim2=2)  # [B, G] <x_i, x_i>
        self._xx_diag, self._dd_diag = ei, torch.diagonal(self.dd, dim1=1, dim2=2)
        self._xd_diag = torch.diagonal(self.xd, dim1=1, dim2=2)
        a, b = self.a[None], self.b[None]
        q1 = (a**2 * ei[:, :, None] + b**2 * self._dd_diag[:, :, None] + ei[:, None, :]
              + 2 * a * b * self._xd_diag[:, :, None] - 2 * a * self.xx - 2 * b * self.xd.transpose(1, 2))
        self.q1 = q1  # [B, i, j] squared first-order error
        self.first = self._reduce(q1)
        # final step i -> 0: the solver returns D_i; error against the teacher end (weight 1)
        e = end.reshape(B, -1)
        rms = [(ds[:, n].reshape(G, -1).to(_F64) - e[n].to(_F64)).pow(2).mean(-1).sqrt().cpu()
               for n in range(B)]
        self.final = torch.stack(rms, 1).mean(1)  # [G]

    def _reduce(self, q: torch.Tensor) -> torch.Tensor:
        """Weighted mean over samples of the RMS error; ``q`` is ``[B, i, j]`` or ``[B, k, j]`` etc."""
        return q.clamp_min(0.0).sqrt().mean(0)

    def _e1_dot_d(self, i: int, js: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        """``<e1(i -> j), D_k>`` for all ``k`` in ``ks`` and ``j`` in ``js``: ``[B, K, J]``."""
        a = self.a[i, js][None, None, :]
        b = self.b[i, js][None, None, :]
        return (a * self.xd[:, i, ks][:, :, None] + b * self.dd[:, i, ks][:, :, None]
                - self.xd[:, js][:, :, ks].transpose(1, 2))

    def second_order(self, solver_type: str = "midpoint") -> torch.Tensor:
        """Multistep second-order cost ``C[k, i, j]`` (inf where not ``k < i < j``)."""
        G = self.G
        out = torch.full((G, G, G), math.inf, dtype=_F64)
        hh = self.h.clone()
        c1 = torch.zeros_like(hh)
        for i in range(G):
            for j in range(i + 1, G):
                h = float(hh[i, j])
                c1[i, j] = h_phi(1, h) / 2.0 if solver_type == "midpoint" else h_phi(2, h) / h
        for i in range(1, G - 1):
            ks = torch.arange(0, i)
            js = torch.arange(i + 1, G)
            h_prev = self.lambdas[i] - self.lambdas[ks]  # [K]
            r = h_prev[:, None] / self.h[i, js][None, :]  # [K, J]
            w = self.alphas[js][None, :] * c1[i, js][None, :] / r
            w = torch.where(torch.isfinite(r), w, torch.zeros_like(w))[None]  # an infinite earlier step: order 1
            unstable = r < R_MIN  # a step much longer than the previous one amplifies history errors by 1/r
            dot_i = self._e1_dot_d(i, js, torch.tensor([i]))  # [B, 1, J]
            dot_k = self._e1_dot_d(i, js, ks)  # [B, K, J]
            dd_ik = self._dd_diag[:, i, None] - 2 * self.dd[:, i, ks] + self._dd_diag[:, ks]  # [B, K]
            q = self.q1[:, i, js][:, None, :] + 2 * w * (dot_i - dot_k) + w**2 * dd_ik[:, :, None]
            cost = self._reduce(q) * self.weight[js][None, :]
            out[:i, i, i + 1:] = torch.where(unstable, torch.full_like(cost, math.inf), cost)
        return out

    def first_order(self) -> torch.Tensor:
        """First-order cost ``C[i, j]`` (inf where ``j <= i``)."""
        return torch.where(self.valid, self.first * self.weight[None, :], torch.full_like(self.first, math.inf))

    def combination_error(self, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Mean over samples of the RMS of ``sum_n coef[m, n] v[idx[m, n]]`` for each row ``m``.

        ``v`` indexes the cached vectors: ``0 .. G-1`` are the states ``x_i``, ``G .. 2G-1`` the
        data predictions ``D_i``. Uses the Gram matrix, so the cost does not depend on the data size.
        """
        gram = self._gram
        g = gram[:, idx[:, :, None], idx[:, None, :]]  # [B, M, n, n]
        q = torch.einsum("bmuv,mu,mv->bm", g, coef, coef)
        return q.clamp_min(0.0).sqrt().mean(0)

    def singlestep(self, order: int, r: float, solver_type: str = "midpoint") -> torch.Tensor:
        """Singlestep order-2/3 cost ``C[i, j]``; the stage is at the grid point ``m`` nearest ``lambda_i + r h``.

        The stage's prediction is the teacher's ``D_m`` plus the Gaussian linearisation
        ``J_m (x_m' - x_m)`` of the error of the first-order stage state ``x_m'``, with
        ``J = alpha c^2 / (alpha^2 c^2 + sigma^2)`` the Jacobian of the Gaussian denoiser.
        """
        G = self.G
        out = torch.full((G, G), math.inf, dtype=_F64)
        lam = self.lambdas
        rows_idx: list[list[int]] = []
        rows_coef: list[list[float]] = []
        pairs: list[tuple[int, int]] = []
        for i in range(G - 2):
            if not math.isfinite(float(lam[i])):
                out[i] = self.first_order()[i]  # a step from flow's sigma = 1 is scored as first order
                continue
            for j in range(i + 2, G):
                h = float(lam[j] - lam[i])
                target = float(lam[i]) + r * h
                m = int(torch.argmin((lam[i + 1: j] - target).abs())) + i + 1
                rr = float(lam[m] - lam[i]) / h
                w1 = h_phi(1, h)
                c = w1 / (2.0 * rr) if (order == 2 and solver_type == "midpoint") else h_phi(2, h) / (rr * h)
                c *= float(self.alphas[j])
                a, b = float(self.a[i, j]), float(self.b[i, j])
                # stage state error x_m' - x_m = a_im x_i + b_im D_i - x_m, mapped through J_m
                jm = float(self.jacobian[m])
                am, bm = float(self.a[i, m]), float(self.b[i, m])
                rows_idx.append([i, G + i, G + m, j, m])
                rows_coef.append([a + c * jm * am, b - c + c * jm * bm, c, -1.0, -c * jm])
                pairs.append((i, j))
        if pairs:
            err = self.combination_error(torch.tensor(rows_idx), torch.tensor(rows_coef, dtype=_F64))
            ii = torch.tensor([q[0] for q in pairs])
            jj = torch.tensor([q[1] for q in pairs])
            out[ii, jj] = err * self.weight[jj]
        return out


def dp_multistep(costs: GridCosts, orders: Sequence[int], solver_type: str = "midpoint") -> tuple[list[int], float]:
    """Grid indices ``[0, i_1, ..., i_(N-1)]`` of the ``N`` non-zero points of a multistep schedule.

    ``orders`` are the orders of the ``N`` steps (the last one, to sigma = 0, returns ``D``). The
    DP state after a step is the pair (previous point, current point); a first-order step ignores
    the previous point. Returns the indices and the summed (weighted) local error.
    """
    n = len(orders)
    G = costs.G
    c1 = costs.first_order()
    c2 = costs.second_order(solver_type) if any(k >= 2 for k in orders[1:-1]) else None
    inf = torch.full((G, G), math.inf, dtype=_F64)
    best = inf.clone()
    best[0, :] = c1[0, :]  # state (k=0, i) after the first step
    back: list[torch.Tensor] = []
    for step in range(1, n - 1):
        if orders[step] >= 2 and c2 is not None:
            total = best[:, :, None] + c2  # [k, i, j]
            value, arg = total.min(dim=0)  # [i, j]
        else:
            value_i, arg_i = best.min(dim=0)  # best over k for each i
            value = value_i[:, None] + c1
            arg = arg_i[:, None].expand(G, G)
        back.append(arg)
        best = value
    total = best + costs.final[None, :]
    flat = int(torch.argmin(total))
    k, i = divmod(flat, G)
    score = float(total[k, i])
    if not math.isfinite(score):
        raise ValueError(f"the teacher grid has {G} points, too few for {n} steps; use more grid points")
    path = [i, k]
    for arg in reversed(back):
        k, i = int(arg[k, i]), k
        path.append(k)
    return list(reversed(path)), score


def dp_singlestep(costs: GridCosts, orders: Sequence[int], solver_type: str = "midpoint") -> tuple[list[int], float]:
    """Grid indices of the non-zero points of a singlestep schedule with the given step orders."""
    n = len(orders)
    G = costs.G
    tables = {1: costs.first_order()}
    for k in set(orders[:-1]) - {1}:
        tables[k] = costs.singlestep(k, 0.5 if k == 2 else 2.0 / 3.0, solver_type)
    best = tables[orders[0]][0].clone()  # after the first step, at point j
    back: list[torch.Tensor] = []
    for step in range(1, n - 1):
        total = best[:, None] + tables[orders[step]]
        best, arg = total.min(dim=0)
        back.append(arg)
    total = best + costs.final
    j = int(torch.argmin(total))
    score = float(total[j])
    if not math.isfinite(score):
        raise ValueError(f"the teacher grid has {G} points, too few for {n} singlestep steps; use more grid points")
    path = [j]
    for arg in reversed(back):
        j = int(arg[j])
        path.append(j)
    path.append(0)
    return list(reversed(path)), score
