"""A slow, obviously correct SubTrack++ for one weight matrix, written formula by formula from
docs/architecture.md ("Design cited by the code").

Float64, no in-place tricks, the Grassmann step taken by the matrix exponential and the tangent's
singular triplet by a full SVD. Tests compare optim.subtrack.SubTrackAdamW against it (it lives
in tests/: nothing else uses it). The right-side case is the left-side one on transposes.

Below it, the plain forms of optim/grassmann.py's math that the library never runs (estimation
error, best angle, recovery term, norm limiter, ...): the tests check the fused production code
against them.
"""
from __future__ import annotations

import math

import torch

from optim import grassmann as gm


def exp_map(S: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Grassmann exponential map: expm(H S^T - S H^T) S. S: (m, r) orthonormal, H: (m, r) with S^T H = 0."""
    Omega = H @ S.T - S @ H.T
    return torch.linalg.matrix_exp(Omega) @ S


class ReferenceSubTrack:
    """SubTrack++ (grassmann + rotate + recover) or SubTrack (keep, drop) on one (m, n) matrix.

    `step(W, G)` returns the new W (float64) for the gradient G, as SubTrackAdamW with
    update_proj_gap `gap`, fixed step size `eta` and the given choices would.
    """

    def __init__(self, shape, rank, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, gap=200, scale=0.25,
                 eta=10000.0, moments="rotate", residual="recover", scaled_back=True, gamma=1.01,
                 scale_recovery=False):
        m, n = shape
        self.left = m < n
        self.rank, self.lr, self.betas, self.eps, self.wd = rank, lr, betas, eps, weight_decay
        self.gap, self.scale, self.eta, self.moments, self.residual = gap, scale, eta, moments, residual
        self.scaled_back, self.gamma = scaled_back, gamma
        self.recovery_weight = scale if scale_recovery else 1.0
        self.t = 0
        self.S = self.M = self.V = self.prev_norm = None
        self.angles = []

    def step(self, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        W, G = W.double(), G.double()
        if self.left:
            return self._left_step(W, G)
        return self._left_step(W.T, G.T).T  # right projection = left projection of the transpose

    def _left_step(self, W, G):
        b1, b2 = self.betas
        if self.t == 0:
            U, _, _ = torch.linalg.svd(G)
            self.S = U[:, : self.rank]
            self.M = torch.zeros(self.rank, G.shape[1], dtype=G.dtype)
            self.V = torch.zeros_like(self.M)
        elif self.t % self.gap == 0:
            S = self.S
            A = S.T @ G
            T = -2 * (G - S @ A) @ A.T
            T = T - S @ (S.T @ T)
            U, sig, Vh = torch.linalg.svd(T, full_matrices=False)
            u, sigma, v = U[:, 0], sig[0], Vh[0]
            a, b = G.T @ (S @ v), G.T @ u  # the best angle on this geodesic caps eta * sigma
            best = 0.5 * torch.atan2(-(a @ b), 0.5 * (a @ a - b @ b))
            theta = torch.sign(best) * torch.minimum(self.eta * sigma, best.abs())
            S_new = exp_map(S, -theta * torch.outer(u, v))
            self.angles.append(float(theta))
            if self.moments == "rotate":
                Q = S_new.T @ S
                M_new = Q @ self.M
                w = (1 - b2 ** self.t) / (1 - b1 ** self.t) ** 2  # bias-corrected variance, on raw buffers
                self.V = torch.clamp((Q * Q) @ (self.V - w * self.M * self.M) + w * M_new * M_new, min=0)
                self.M = M_new
            self.S = S_new
        S = self.S
        R = S.T @ G
        self.M = b1 * self.M + (1 - b1) * R
        self.V = b2 * self.V + (1 - b2) * R * R
        N = self.M / (torch.sqrt(self.V) + self.eps)
        self.t += 1
        step_size = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        update = self.scale * (S @ N)
        if self.residual == "recover":
            phi = N.norm(dim=0) / (R.norm(dim=0) + 1e-8)  # one factor per column of G
            back = S @ R * (self.scale if self.scaled_back else 1.0)
            term = (G - back) * phi
            norm = term.norm()
            if self.prev_norm is not None and norm > self.gamma * self.prev_norm:
                term = term * (self.gamma * self.prev_norm / norm)
            self.prev_norm = term.norm()
            update = update + self.recovery_weight * term
        W = W - step_size * update
        return W - self.lr * self.wd * W


# ---------------------------------------------------------------------------------------------
# Reference forms of optim/grassmann.py's math, which only tests call (the library runs the fused
# generators of sums: optim.grassmann.grassmann_update_steps, recovered_update_steps).
# ---------------------------------------------------------------------------------------------

def estimation_error(basis: torch.Tensor, G: torch.Tensor, side: str) -> torch.Tensor:
    """||G - S S^T G||_F (left) or ||G - G P^T P||_F (right): what a subspace step should lower."""
    return (G - gm.project_back(gm.project(G, basis, side), basis, side)).norm()


def best_angle(S: torch.Tensor, G: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angle theta* on the geodesic of `geodesic_step` that minimises ||G - S' S'^T G||.

    Along the geodesic S'^T G keeps all rows of S^T G except the one along v, which becomes
    cos(theta) a - sin(theta) b with a = G^T S v, b = G^T u. Its energy
        (|a|^2 + |b|^2)/2 + cos(2 theta) (|a|^2 - |b|^2)/2 - sin(2 theta) a.b
    is a sinusoid in 2 theta with maximum at theta* = 1/2 atan2(-a.b, (|a|^2 - |b|^2)/2).
    Cost O(m n). Returns a 0-d tensor in (-pi/2, pi/2].
    """
    a = G.t() @ (S @ v)
    b = G.t() @ u
    return gm.sinusoid_peak(a @ b, a @ a, b @ b)


def rank_k_step(S: torch.Tensor, G: torch.Tensor, k: int, step_size: float | str, damping: float = 1.0,
                max_angle: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move S: (m, r) along the top-k directions of the tangent at once, each by its own best angle:
    the production rank-k geodesic step (optim.grassmann._geodesic_steps, whose docstring derives it)
    on a whole left-side matrix, for any k (grassmann_update takes the rank-1 path when k is 1).
    Returns (S', the angle of largest magnitude as 0-d)."""
    return gm.run_local(gm._geodesic_steps(S, G, k, step_size, damping, max_angle, rank_one=False))


def recovery_term(G: torch.Tensor, R: torch.Tensor, N: torch.Tensor, basis: torch.Tensor, side: str,
                  back_scale: float = 1.0) -> torch.Tensor:
    """Fira / SubTrack++ recovery scaling of the gradient outside the subspace (before the limiter).

    G: (m, n), R: low-rank gradient, N: Adam's normalised low-rank update (shape of R).
    phi = ||N_col|| / (||R_col|| + 1e-8) per column of G (left) or per row (right), and the
    term is (G - back_scale * back(R)) * phi. back_scale = 1 gives the exact residual
    G - S S^T G; the published Fira / SubTrack++ code uses back_scale = scale.
    """
    dim = 0 if side == gm.LEFT else 1
    phi = N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + gm.RECOVERY_EPS)
    back = gm.project_back(R, basis, side)
    if back_scale != 1.0:
        back = back * back_scale
    return (G - back) * phi


def limit_norm_growth(term: torch.Tensor, prev_norm: torch.Tensor, gamma: float = 1.01
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm-growth limiter: if ||term|| > gamma * prev_norm, scale term down to gamma * prev_norm.

    prev_norm: 0-d, negative on the first step (no limit). Returns (limited term, its norm to
    store for the next step). Same arithmetic as the fira package (ratio eps 1e-8), without a
    host synchronisation.
    """
    norm = term.norm()
    factor = (norm / (prev_norm + gm.RECOVERY_EPS)).clamp_min(gamma) / gamma
    factor = torch.where(prev_norm < 0, torch.ones_like(factor), factor)
    return term / factor, norm / factor


def recovered_update(G: torch.Tensor, R: torch.Tensor, N: torch.Tensor, basis: torch.Tensor, side: str,
                     scale: float, back_scale: float, prev_norm: torch.Tensor, gamma: float = 1.01,
                     recovery_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """optim.grassmann.recovered_update_steps on a whole matrix (nothing to sum over): the fused
    production form, which tests compare with scale * project_back(N) + w * limit_norm_growth(recovery_term(...))."""
    return gm.run_local(gm.recovered_update_steps(G, R, N, basis, side, scale, back_scale, prev_norm, gamma,
                                                  recovery_weight))
