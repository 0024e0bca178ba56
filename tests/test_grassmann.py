"""The Grassmannian math of optim/grassmann.py against closed forms and an independent construction."""
from unittest import mock

import pytest
import torch

from optim import grassmann as gm
from optim.subtrack import SubTrackAdamW
from tests.reference import (best_angle, estimation_error, exp_map, limit_norm_growth, rank_k_step, recovered_update,
                             recovery_term)


def orthonormal(m, r, generator=None, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=dtype))[0]


def low_rank_plus_noise(m, n, k, generator, noise=0.1):
    """A gradient-like matrix: a decaying rank-k signal plus noise."""
    weights = torch.linspace(3.0, 1.0, k).unsqueeze(1)
    return torch.randn(m, k, generator=generator) @ (weights * torch.randn(k, n, generator=generator)) \
        + noise * torch.randn(m, n, generator=generator)


@pytest.mark.parametrize("side", ["left", "right"])
def test_basis_stays_orthonormal_after_1000_geodesic_steps_with_random_tangents(side):
    g = torch.Generator().manual_seed(0)
    m, n, r = 48, 96, 8
    basis = orthonormal(m, r, g) if side == "left" else orthonormal(m, r, g).T.contiguous()
    shape = (m, n) if side == "left" else (n, m)
    angles = []
    for _ in range(1000):
        G = torch.randn(*shape, generator=g)
        # Random angles, both signs, up to a quarter turn: exercises large rotations too.
        theta = (torch.rand((), generator=g) - 0.5) * torch.pi
        S = basis if side == "left" else basis.T
        u, sigma, v = gm.top_singular_triplet(gm.tangent(S, G if side == "left" else G.T))
        S = gm.geodesic_step(S, u, v, theta)
        basis = S if side == "left" else S.T
        angles.append(abs(float(theta)))
    S = basis if side == "left" else basis.T
    assert max(angles) > 1.0
    assert torch.linalg.norm(S.T @ S - torch.eye(r)) < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_geodesic_step_at_moderate_angle_lowers_estimation_error(side):
    g = torch.Generator().manual_seed(1)
    m, n, r = 64, 160, 8
    G = low_rank_plus_noise(m, n, r, g)
    S = orthonormal(m, r, g)
    if side == "right":  # a (160, 64) gradient is projected on the right
        G, basis = G.T.contiguous(), S.T.contiguous()
    else:
        basis = S
    before = estimation_error(basis, G, side)
    # Step through the optimizer's entry point with eta chosen for a moderate angle (0.2 rad).
    u, sigma, v = gm.top_singular_triplet(gm.tangent(S, G if side == "left" else G.T))
    new_basis, theta = gm.grassmann_update(basis, G, side, step_size=0.2 / float(sigma))
    assert float(theta) == pytest.approx(0.2, rel=1e-5)
    assert estimation_error(new_basis, G, side) < before - 1e-3 * before
    # The opposite sign (+sin, as printed in the seed's Algorithm 1) raises the error.
    wrong = gm.geodesic_step(S, u, v, -0.2)
    assert estimation_error(wrong if side == "left" else wrong.T, G, side) > before


@pytest.mark.parametrize("side", ["left", "right"])
def test_auto_step_size_never_worse_than_any_fixed_eta(side):
    g = torch.Generator().manual_seed(2)
    for trial in range(5):
        m, n, r = 40, 100, 6
        G = low_rank_plus_noise(m, n, r, g, noise=0.3) * 10.0 ** (trial - 2)  # gradients of every scale
        S = orthonormal(m, r, g)
        basis = S if side == "left" else S.T.contiguous()
        if side == "right":
            G = G.T.contiguous()
        auto_basis, theta_auto = gm.grassmann_update(basis, G, side, step_size="auto")
        auto_error = estimation_error(auto_basis, G, side)
        for eta in [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 1e4]:
            fixed_basis, _ = gm.grassmann_update(basis, G, side, step_size=eta)
            assert auto_error <= estimation_error(fixed_basis, G, side) * (1 + 1e-5)
        # The closed form is the best point of the whole geodesic, not only of the etas tried.
        S_left = basis if side == "left" else basis.T
        u, _, v = gm.top_singular_triplet(gm.tangent(S_left, G if side == "left" else G.T))
        for theta in torch.linspace(-1.5, 1.5, 61):
            moved = gm.geodesic_step(S_left, u, v, theta)
            moved = moved if side == "left" else moved.T
            assert auto_error <= estimation_error(moved, G, side) * (1 + 1e-5)
        assert estimation_error(auto_basis, G, side) < estimation_error(basis, G, side)


def test_best_angle_matches_sinusoid_closed_form_against_dense_search():
    g = torch.Generator().manual_seed(3)
    G = low_rank_plus_noise(30, 70, 4, g, noise=0.5).double()
    S = orthonormal(30, 4, g, torch.float64)
    u, _, v = gm.top_singular_triplet(gm.tangent(S, G))
    thetas = torch.linspace(-torch.pi / 2, torch.pi / 2, 20001, dtype=torch.float64)
    captured = torch.stack([(gm.geodesic_step(S, u, v, t).T @ G).norm() ** 2 for t in thetas[::100]])
    coarse = thetas[::100][captured.argmax()]
    fine = thetas[(thetas - coarse).abs() < 0.02]
    captured = torch.stack([(gm.geodesic_step(S, u, v, t).T @ G).norm() ** 2 for t in fine])
    assert float(best_angle(S, G, u, v)) == pytest.approx(float(fine[captured.argmax()]), abs=2e-4)


@pytest.mark.parametrize("theta", [0.01, 0.3, 1.2, -0.7])
def test_rank1_geodesic_step_equals_grassmann_exponential_map_by_matrix_exponential(theta):
    g = torch.Generator().manual_seed(4)
    m, n, r = 20, 50, 5
    S = orthonormal(m, r, g)
    G = torch.randn(m, n, generator=g)
    u, _, v = gm.top_singular_triplet(gm.tangent(S, G))
    ours = gm.geodesic_step(S, u, v, theta)
    # expm(H S^T - S H^T) S with the descent tangent H = -theta u v^T, in float64.
    expected = exp_map(S.double(), -theta * torch.outer(u, v).double())
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=0)
    # Right-side form of docs/architecture.md ("Grassmannian tracking"): P' = u (cos u^T P - sin v^T) + (I - u u^T) P, with P = S^T.
    P, ur, vr = S.T, v, u  # the right tangent of G^T is the transpose of the left one
    right = torch.outer(ur, torch.cos(torch.tensor(theta)) * (ur @ P) - torch.sin(torch.tensor(theta)) * vr) \
        + (torch.eye(r) - torch.outer(ur, ur)) @ P
    assert torch.allclose(right.double(), expected.T, atol=1e-5, rtol=0)


def test_tangent_is_orthogonal_to_span_and_is_the_error_gradient():
    g = torch.Generator().manual_seed(5)
    S = orthonormal(16, 3, g, torch.float64)
    G = torch.randn(16, 30, generator=g, dtype=torch.float64)
    T = gm.tangent(S, G)
    assert torch.allclose(S.T @ T, torch.zeros(3, 3, dtype=torch.float64), atol=1e-12)
    # Directional derivative of ||G - S S^T G||^2 along T equals <grad, T> = ||T||^2 (T is the
    # projected gradient and the error is invariant to moves within span S).
    X = S.clone().requires_grad_(True)
    ((G - X @ (X.T @ G)) ** 2).sum().backward()
    assert torch.allclose((X.grad * T).sum(), (T * T).sum(), rtol=1e-9)


def test_tracks_a_slowly_rotating_subspace_without_svd_of_the_gradient_after_the_first_step():
    """Gradients lie in a rank-4 subspace U(t) = expm(t K) U(0) turning ~0.005 rad per step.

    After 300 steps the subspace has moved far (> 0.5 rad from where it started), yet the tracked
    basis stays within 0.15 rad of it (largest principal angle), and torch.linalg.svd ran once.
    """
    g = torch.Generator().manual_seed(6)
    m, n, r = 48, 96, 4
    U = orthonormal(m, r, g)
    U0 = U.clone()
    K = torch.randn(m, m, generator=g)
    K = K - K.T
    step_rotation = torch.linalg.matrix_exp(0.005 * K / torch.linalg.matrix_norm(K, 2))
    weight = torch.nn.Parameter(torch.zeros(m, n))
    opt = SubTrackAdamW([{"params": [weight], "rank": r, "update_proj_gap": 1, "subspace": "grassmann",
                          "step_size": "auto"}], lr=0.0)

    def largest_angle(A, B):
        return float(torch.acos(torch.linalg.svdvals(A.T @ B).min().clamp(max=1.0)))

    svd = torch.linalg.svd
    with mock.patch("torch.linalg.svd", side_effect=svd) as counted:
        angles = []
        for _ in range(300):
            C = torch.linspace(4.0, 1.0, r).unsqueeze(1) * torch.randn(r, n, generator=g)
            weight.grad = U @ C + 0.01 * torch.randn(m, n, generator=g)
            opt.step()
            angles.append(largest_angle(opt.state[weight]["basis"], U))
            U = step_rotation @ U
    assert counted.call_count == 1
    assert int(opt.state[weight]["subspace_updates"]) == 300
    assert largest_angle(U0, U) > 0.5
    assert max(angles[100:]) < 0.15


def test_moment_rotation_clips_negative_variance_and_compat_takes_abs():
    g = torch.Generator().manual_seed(7)
    r, n = 6, 10
    M = torch.randn(r, n, generator=g)
    V = 0.01 * torch.rand(r, n, generator=g)  # V < M*M: EMAs with different betas allow it
    Q = torch.linalg.qr(torch.randn(r, r, generator=g))[0]
    _, V_new = gm.rotate_moments(M, V, Q, "left")
    assert (V_new >= 0).all()
    raw = (Q * Q) @ (V - M * M) + (Q @ M) ** 2
    assert (raw < 0).any()  # the clip is exercised
    assert torch.allclose(V_new, raw.clamp_min(0))
    _, V_compat = gm.rotate_moments(M, V, Q, "left", compat_beta2=0.999)
    assert torch.allclose(V_compat, raw.abs() * (1 - 0.999))


def test_moment_rotation_within_the_same_span_keeps_first_moment_and_total_variance():
    g = torch.Generator().manual_seed(8)
    m, n, r = 20, 12, 5
    S = orthonormal(m, r, g, torch.float64)
    Qr = orthonormal(r, r, g, torch.float64)  # a rotation inside span S
    M = torch.randn(r, n, generator=g, dtype=torch.float64)
    V = M * M + torch.rand(r, n, generator=g, dtype=torch.float64)
    S_new = S @ Qr.T
    Q = gm.basis_change(S, S_new, "left")
    M_new, V_new = gm.rotate_moments(M, V, Q, "left")
    assert torch.allclose(S_new @ M_new, S @ M)  # the full-space first moment is unchanged
    assert torch.allclose(V_new.sum(0), V.sum(0))  # per column, total second moment is unchanged
    # Right side: P (r, m) rows rotated, moments (n, r).
    P = S.T
    P_new = Qr @ P
    Qright = gm.basis_change(P, P_new, "right")
    M_new, V_new = gm.rotate_moments(M.T, V.T, Qright, "right")
    assert torch.allclose(M_new @ P_new, M.T @ P)
    assert torch.allclose(V_new.sum(1), V.T.sum(1))


@pytest.mark.parametrize("t", [3, 20, 200])
def test_moment_rotation_early_in_training_keeps_adams_step_bounded(t):
    """Raw Adam buffers after t steps: M ~ (1 - b1^t) mean, V ~ (1 - b2^t) E[g^2], so early on raw V is far
    below M*M and the variance V - M*M of the raw form is negative. Rotating the variance of the
    bias-corrected moments (mean_weight) keeps |M'| / sqrt(V') at Adam's scale after a move; the raw
    form (weight 1) clips V' to ~0 where M' is not and Adam's step jumps by orders of magnitude."""
    g = torch.Generator().manual_seed(9)
    r, n, betas = 6, 40, (0.9, 0.999)
    M, V = torch.zeros(r, n, dtype=torch.float64), torch.zeros(r, n, dtype=torch.float64)
    for _ in range(t):  # gradients with a steady mean and noise, as Adam sees them
        grad = 1.0 + 0.5 * torch.randn(r, n, generator=g, dtype=torch.float64)
        M = betas[0] * M + (1 - betas[0]) * grad
        V = betas[1] * V + (1 - betas[1]) * grad * grad
    Q = orthonormal(r, r, g, torch.float64)  # a move that mixes every coordinate

    def adam_ratio(M, V):  # |bias-corrected M| / sqrt(bias-corrected V), Adam's normalised step
        return (M.abs() / (1 - betas[0] ** t)) / (V / (1 - betas[1] ** t)).sqrt().clamp_min(1e-12)

    assert float(adam_ratio(M, V).max()) < 1.5  # before the move
    weight = gm.adam_mean_weight(betas, t)
    M_new, V_new = gm.rotate_moments(M, V, Q, "left", mean_weight=weight)
    assert float(adam_ratio(M_new, V_new).max()) < 1.5
    if t < 50:
        _, V_raw = gm.rotate_moments(M, V, Q, "left")
        assert float(adam_ratio(M_new, V_raw).max()) > 10.0
    assert gm.adam_mean_weight(betas, 0) == 1.0 and gm.adam_mean_weight(betas, 10 ** 6) == pytest.approx(1.0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_recovery_term_exact_residual_is_orthogonal_to_span_and_scaled_per_column(side):
    g = torch.Generator().manual_seed(9)
    m, n, r = 12, 30, 3
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    S = orthonormal(m, r, g, torch.float64)
    if side == "right":
        G, basis = G.T, S.T
    else:
        basis = S
    R = gm.project(G, basis, side)
    N = torch.randn_like(R)
    term = recovery_term(G, R, N, basis, side, back_scale=1.0)
    assert gm.project(term, basis, side).abs().max() < 1e-12
    # Per column of G (left) / per row (right): the residual times ||N_col|| / ||R_col||.
    Gl, Rl, Nl, tl = (G, R, N, term) if side == "left" else (G.T, R.T, N.T, term.T)
    residual = Gl - S @ (S.T @ Gl)
    for j in range(Gl.shape[1]):
        phi = Nl[:, j].norm() / (Rl[:, j].norm() + 1e-8)
        assert torch.allclose(tl[:, j], residual[:, j] * phi)
    # back_scale < 1 leaves part of the in-span gradient in the term (the published code's way).
    scaled = recovery_term(G, R, N, basis, side, back_scale=0.25)
    assert gm.project(scaled, basis, side).abs().max() > 1e-3


def test_norm_growth_limiter_caps_growth_at_gamma_and_skips_first_step():
    term = torch.full((4, 4), 1.0)  # norm 4
    first, norm = limit_norm_growth(term, torch.tensor(-1.0))
    assert torch.equal(first, term) and float(norm) == pytest.approx(4.0)
    grown, norm2 = limit_norm_growth(term * 2, norm)  # norm 8 > 1.01 * 4
    assert float(grown.norm()) == pytest.approx(1.01 * 4.0, rel=1e-6)
    assert float(norm2) == pytest.approx(1.01 * 4.0, rel=1e-6)
    shrunk, norm3 = limit_norm_growth(term * 0.5, norm2)  # shrinking is never limited
    assert torch.equal(shrunk, term * 0.5) and float(norm3) == pytest.approx(2.0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("back_scale, weight", [(0.25, 1.0), (1.0, 1.0), (0.25, 0.25)])
def test_fused_recovered_update_equals_back_projection_plus_limited_recovery_term(side, back_scale, weight):
    g = torch.Generator().manual_seed(10)
    m, n, r = 12, 30, 3
    S = orthonormal(m, r, g, torch.float64)
    basis = S if side == "left" else S.T
    shape = (m, n) if side == "left" else (n, m)
    prev = torch.tensor(-1.0, dtype=torch.float64)
    for growth in [1.0, 3.0, 0.5]:  # first step (no limit), a limited jump, a shrink
        G = growth * torch.randn(*shape, generator=g, dtype=torch.float64)
        R = gm.project(G, basis, side)
        N = torch.randn_like(R)
        term, expected_norm = limit_norm_growth(recovery_term(G, R, N, basis, side, back_scale), prev)
        expected = 0.25 * gm.project_back(N, basis, side) + weight * term  # weight 0.25: scale_recovery
        update, norm = recovered_update(G, R, N, basis, side, 0.25, back_scale, prev, recovery_weight=weight)
        assert torch.allclose(update, expected, atol=1e-12)
        assert torch.allclose(norm, expected_norm, rtol=1e-10)
        prev = norm


def test_max_angle_clamps_and_damping_scales_the_step_angle():
    g = torch.Generator().manual_seed(11)
    G = low_rank_plus_noise(30, 60, 4, g)
    S = orthonormal(30, 4, g)
    _, auto = gm.grassmann_update(S, G, "left", step_size="auto")
    _, clamped = gm.grassmann_update(S, G, "left", step_size="auto", max_angle=0.1 * abs(float(auto)))
    assert float(clamped) == pytest.approx(0.1 * abs(float(auto)), rel=1e-6)
    _, damped = gm.grassmann_update(S, G, "left", step_size="auto", damping=0.5)
    assert float(damped) == pytest.approx(0.5 * float(auto), rel=1e-6) and float(auto) != 0.0


def test_fixed_eta_angle_is_capped_at_the_best_angle():
    """theta = sign(theta*) min(eta sigma, |theta*|): eta 1e4 gives theta* exactly, a tiny eta gives eta sigma."""
    g = torch.Generator().manual_seed(12)
    G = low_rank_plus_noise(30, 60, 4, g)
    S = orthonormal(30, 4, g)
    _, auto = gm.grassmann_update(S, G, "left", step_size="auto")
    _, paper = gm.grassmann_update(S, G, "left", step_size=1e4)
    assert float(paper) == float(auto)  # eta sigma ~ 1e5 rad: capped
    _, sigma, _ = gm.top_singular_triplet(gm.tangent(S, G))
    eta = 0.01 * abs(float(auto)) / float(sigma)
    _, small = gm.grassmann_update(S, G, "left", step_size=eta)
    assert float(small) == pytest.approx(0.01 * float(auto), rel=1e-5)


@pytest.mark.parametrize("geodesic_rank", [1, 6])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
@pytest.mark.parametrize("side", ["left", "right"])
def test_no_subspace_update_raises_the_estimation_error_at_any_gradient_scale_or_eta(side, scale, geodesic_rank):
    g = torch.Generator().manual_seed(13)
    m, n, r = 40, 100, 6
    for _ in range(4):
        G = low_rank_plus_noise(m, n, r, g, noise=0.3) * scale
        S = orthonormal(m, r, g)
        basis = S if side == "left" else S.T.contiguous()
        if side == "right":
            G = G.T.contiguous()
        before = estimation_error(basis, G, side)
        for eta in ["auto", 1e-3, 10.0, 1e4]:
            new_basis, _ = gm.grassmann_update(basis, G, side, step_size=eta, geodesic_rank=geodesic_rank)
            assert estimation_error(new_basis, G, side) <= before * (1 + 1e-6), (eta, scale)


@pytest.mark.parametrize("eta", ["auto", 1e-3, 10.0, 1e4])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_planted_subspace_stays_tracked_at_every_gradient_scale_and_eta(scale, eta):
    """64 x 96 weight, rank 8, gradients in a fixed rank-8 subspace plus 1% noise, an update every 2
    steps for 300 steps. The paper's uncapped eta sigma ended at smallest cosine 0.002 for eta 10."""
    g = torch.Generator().manual_seed(14)
    m, n, r = 64, 96, 8
    U = orthonormal(m, r, g)
    weight = torch.nn.Parameter(torch.zeros(m, n))
    opt = SubTrackAdamW([{"params": [weight], "rank": r, "update_proj_gap": 2, "step_size": eta}], lr=0.0)
    for _ in range(300):
        signal = U @ (torch.linspace(3.0, 1.0, r).unsqueeze(1) * torch.randn(r, n, generator=g))
        weight.grad = scale * (signal + 0.01 * signal.norm() / (m * n) ** 0.5 * torch.randn(m, n, generator=g))
        opt.step()
    assert int(opt.state[weight]["subspace_updates"]) == 150
    cosines = torch.linalg.svdvals(opt.state[weight]["basis"].T @ U)
    assert float(cosines.min()) > 0.99


def test_rank_k_step_moves_each_direction_to_its_own_best_angle_and_stays_orthonormal():
    g = torch.Generator().manual_seed(15)
    m, n, r, k = 48, 120, 8, 5
    G = low_rank_plus_noise(m, n, r, g, noise=0.2).double()
    S = orthonormal(m, r, g, torch.float64)
    S_k, theta = rank_k_step(S, G, k, "auto")
    assert torch.linalg.norm(S_k.T @ S_k - torch.eye(r, dtype=torch.float64)) < 1e-10
    captured = (S_k.T @ G).norm() ** 2
    # Perturb one direction's angle at a time (same U, V as the step): the captured energy only falls.
    T = gm.tangent(S, G)
    evals, vecs = torch.linalg.eigh(T.T @ T)
    V = vecs[:, -k:].flip(1)
    U = T @ V / evals[-k:].flip(0).sqrt()
    thetas = torch.linalg.lstsq(-U, S_k @ V - S @ V).solution.diagonal().asin()  # S' V = S V cos - U sin
    for i in range(k):
        for delta in (-0.05, 0.05):
            moved = thetas.clone()
            moved[i] += delta
            S_moved = S + ((S @ V) * (torch.cos(moved) - 1) - U * torch.sin(moved)) @ V.T
            assert (S_moved.T @ G).norm() ** 2 < captured
    assert float(theta) == pytest.approx(float(thetas[thetas.abs().argmax()]), abs=1e-8)
    # More directions capture at least as much as the rank-1 step, and k = 1 is the rank-1 step.
    S_1, theta_1 = gm.grassmann_update(S, G, "left", "auto")
    assert captured >= (S_1.T @ G).norm() ** 2
    S_k1, theta_k1 = rank_k_step(S, G, 1, "auto")
    assert torch.allclose(S_k1, S_1, atol=1e-10) and float(theta_k1) == pytest.approx(float(theta_1), abs=1e-10)


def test_rank_k_step_degenerate_tangents_stay_orthonormal_and_finite():
    """A tangent of rank below k (G of rank 2 against r = 6), a zero tangent (G inside span S), and
    k above m - r (no room orthogonal to S): no direction is invented, nothing is NaN."""
    g = torch.Generator().manual_seed(16)
    m, n, r = 10, 30, 6
    S = orthonormal(m, r, g)
    low = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) * 1e3
    inside = S @ torch.randn(r, n, generator=g)
    for G in (low, inside):
        S_new, theta = rank_k_step(S, G, r, "auto")
        assert torch.isfinite(S_new).all() and torch.isfinite(theta)
        assert torch.linalg.norm(S_new.T @ S_new - torch.eye(r)) < 1e-4
        assert estimation_error(S_new, G, "left") <= estimation_error(S, G, "left") * (1 + 1e-5) + 1e-3
    assert torch.equal(rank_k_step(S, inside, r, "auto")[0], S)  # nothing to gain, nothing moves
    full = orthonormal(m, m, g)
    assert torch.equal(rank_k_step(full, low, m, "auto")[0], full)  # r = m: no room to move


def _svd_top(T):
    """Top triplet of T by torch.linalg.svd (float32, thin), and the relative gap (s1 - s2) / s1."""
    U, s, Vh = torch.linalg.svd(T, full_matrices=False)
    return U[:, 0], s[0], Vh[0], float((s[0] - s[1]) / s[0])


def _check_top_triplet(T, vector_tol):
    u, sigma, v = gm.top_singular_triplet(T)
    u_ref, sigma_ref, v_ref, gap = _svd_top(T)
    sign = torch.sign(v @ v_ref)  # singular vectors are defined up to a common sign
    assert abs(float(sigma - sigma_ref)) <= 1e-4 * float(sigma_ref)
    assert float((sign * v - v_ref).norm()) <= vector_tol and float((sign * u - u_ref).norm()) <= vector_tol
    return gap


@pytest.mark.parametrize("m, n, r", [(96, 256, 16), (256, 688, 32)])
def test_top_singular_triplet_of_realistic_tangents_matches_float32_svd(m, n, r):
    """Tangents of a gradient-like G (decaying rank-2r signal + noise) at a random basis and at a
    nearly converged one (top-r SVD of a perturbed G, the case after the first SVD). The eigh of
    T^T T path agrees with torch.linalg.svd in float32: sigma to 1e-4 relative, u and v to 1e-4
    in norm. Measured against a float64 SVD: sigma to 4e-7 and vectors to 3e-7 here (gaps 0.13 to
    0.6), vectors to 8e-6 at a 1e-2 gap and 4e-5 at 1e-3, where float32 SVD itself is off by 2e-6
    and 2e-4: as accurate as float32 SVD, so the r x r problem needs no float64."""
    g = torch.Generator().manual_seed(m)
    weights = torch.logspace(1, -2, 2 * r).unsqueeze(1)
    G = torch.randn(m, 2 * r, generator=g) @ (weights * torch.randn(2 * r, n, generator=g)) \
        + 0.01 * torch.randn(m, n, generator=g)
    near = torch.linalg.svd(G + 0.1 * torch.randn(m, n, generator=g), full_matrices=False)[0][:, :r]
    for S in (orthonormal(m, r, g), near):
        gap = _check_top_triplet(gm.tangent(S, G), vector_tol=1e-4)
        assert gap > 1e-2  # a reasonable gap: the vectors are well defined to the tolerance


@pytest.mark.parametrize("gap", [1e-1, 1e-2, 1e-6])
def test_top_singular_triplet_matches_float32_svd_down_to_a_nearly_degenerate_top_pair(gap):
    """T: (256, 32) with singular values 1, 1 - gap, then 0.9 .. 1e-3. sigma agrees with
    torch.linalg.svd to 1e-4 relative at any gap; u, v to 1e-4 for gaps >= 1e-2. At gap 1e-6 the
    top vectors are not defined (either SVD can return any unit vector of the top pair), so v and
    u must lie in the span of the top two singular vectors, and T v = sigma u exactly as claimed."""
    g = torch.Generator().manual_seed(7)
    m, r = 256, 32
    s = torch.cat([torch.tensor([1.0, 1.0 - gap], dtype=torch.float64), torch.linspace(0.9, 1e-3, r - 2,
                                                                                       dtype=torch.float64)])
    T64 = (orthonormal(m, r, g, torch.float64) * s) @ orthonormal(r, r, g, torch.float64).T
    T = T64.float()
    if gap >= 1e-2:
        _check_top_triplet(T, vector_tol=1e-4)
        return
    u, sigma, v = gm.top_singular_triplet(T)
    _, sigma_ref, _, _ = _svd_top(T)
    assert abs(float(sigma - sigma_ref)) <= 1e-4 * float(sigma_ref)
    U, _, Vh = torch.linalg.svd(T64, full_matrices=False)
    U2, V2 = U[:, :2], Vh[:2].T
    assert float((v.double() - V2 @ (V2.T @ v.double())).norm()) < 1e-4
    assert float((u.double() - U2 @ (U2.T @ u.double())).norm()) < 1e-4
    assert torch.allclose(T @ v, sigma * u, atol=1e-6)
