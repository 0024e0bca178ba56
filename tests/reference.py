"""A slow, obviously correct SubTrack++ for one weight matrix, written formula by formula from
docs/architecture.md ("Design cited by the code").

Float64, no in-place tricks, the Grassmann step taken by the matrix exponential and the tangent's
singular triplet by a full SVD. Tests compare optim.subtrack.SubTrackAdamW against it (it lives
in tests/: nothing else uses it). The right-side case is the left-side one on transposes.
"""
from __future__ import annotations

import math

import torch


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
