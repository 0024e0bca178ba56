"""Grassmannian subspace math for low-rank optimizers: pure functions on tensors.

Notation follows docs/architecture.md ("Design cited by the code"). A projected weight's gradient is G: (m, n). Its subspace is held
as an orthonormal basis on one side:

    left  (m < n):  S: (m, r), S^T S = I,   R = S^T G: (r, n),  back(N) = S N
    right (m >= n): P: (r, n), P P^T = I,   R = G P^T: (m, r),  back(N) = N P

Every right-side function is the left-side one on transposes (S = P^T, G -> G^T), so the
math is written once, for the left case, and the right case is checked by tests.

Sums over shards. Under FSDP2 a weight is sharded by rows and keeps a right-side basis P, so
everything is row-local except a few sums over rows (columns of G^T in the left notation). The
functions that need such sums are written once as generators (`*_steps`): they yield a tuple of
partial sums and receive the totals, e.g.

    GAt, AAt = yield (G @ A.t(), A @ A.t())      # summed over the shards of G's reduced axis

`run_local(gen)` runs one with nothing to sum over (one process, or a whole matrix: what
`grassmann_update` does), and `run_summed(gens, all_reduce)` runs many in
lockstep with one all-reduce per round for all of them (optim/sharding/fsdp.py).
"""
from __future__ import annotations

import torch

LEFT, RIGHT = "left", "right"

# Fira's constants (fira.fira_adamw): eps of the recovery ratio and of the limiter ratio.
RECOVERY_EPS = 1e-8


def projection_side(shape: tuple[int, int], proj_type: str = "std") -> str:
    """Which side galore-torch projects a (m, n) weight on: `std` is left when m < n, right otherwise."""
    m, n = shape
    if proj_type == "std":
        return LEFT if m < n else RIGHT
    if proj_type == "reverse_std":
        return RIGHT if m < n else LEFT
    if proj_type in (LEFT, RIGHT):
        return proj_type
    raise ValueError(f"proj_type {proj_type!r} is not supported; use 'std', 'reverse_std', 'left' or 'right'")


def column_major(basis: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major, the layout torch.linalg.svd returns U and Vh in.

    Bases are always kept in this layout: matmuls then round exactly as galore-torch's do, and a
    saved and reloaded basis (torch.save keeps strides) continues bit-identically.
    """
    return basis.t().contiguous().t()


def _as_left(basis: torch.Tensor, side: str) -> torch.Tensor:
    """The (m, r) column basis of either side (a view, no copy)."""
    return basis if side == LEFT else basis.t()


def initial_basis(G: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-`rank` singular subspace of G: (m, n), as S: (m, r) (left) or P: (r, n) (right), float32.

    Uses the same call as galore-torch (torch.linalg.svd, thin) so the presets match it bit for bit.
    """
    U, _, Vh = torch.linalg.svd(G.to(torch.promote_types(G.dtype, torch.float32)), full_matrices=False)
    # clone(): U[:, :rank] is already column-major, so column_major() alone would return a view
    # that keeps the whole U: (m, min(m, n)) alive behind every left basis.
    return column_major(U[:, :rank].clone() if side == LEFT else Vh[:rank, :])


def project(G: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """R = S^T G: (r, n) (left) or G P^T: (m, r) (right)."""
    return torch.matmul(basis.t(), G) if side == LEFT else torch.matmul(G, basis.t())


def project_back(N: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """S N: (m, n) (left, N: (r, n)) or N P: (m, n) (right, N: (m, r)); no scale applied."""
    return torch.matmul(basis, N) if side == LEFT else torch.matmul(N, basis)


def tangent(S: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Euclidean gradient of ||G - S S^T G||^2 at S, projected on the Grassmann tangent space.

    S: (m, r) orthonormal, G: (m, n) -> T: (m, r) with S^T T = 0 (to rounding).
        A = S^T G, Rs = G - S A, T = -2 Rs A^T, T <- T - S (S^T T).
    Computed as -2 (G A^T - S (A A^T)), which never forms the (m, n) residual: two products
    of G's size instead of three.
    """
    A = S.t() @ G
    return tangent_from_sums(S, G @ A.t(), A @ A.t())


def tangent_from_sums(S: torch.Tensor, GAt: torch.Tensor, AAt: torch.Tensor) -> torch.Tensor:
    """`tangent` from the two sums over G's columns it needs: G A^T: (m, r) and A A^T: (r, r)."""
    T = -2.0 * (GAt - S @ AAt)
    return T - S @ (S.t() @ T)


def top_singular_triplet(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest singular triplet of a tall T: (m, r) without an SVD of anything m-sized.

    Takes the top eigenvector v of the r x r Gram matrix T^T T (cost O(m r^2 + r^3)), then
    u = T v / ||T v|| and sigma = ||T v||, so u sigma v^T is exactly T's component along v.
    In float32 it is as accurate as torch.linalg.svd's top triplet (tests/test_grassmann.py):
    sigma is a Rayleigh quotient, and v's error ~ eps / relative gap, as an SVD's.
    Returns u: (m,), sigma: 0-d, v: (r,).
    """
    _, vecs = torch.linalg.eigh(T.t() @ T)
    v = vecs[:, -1]
    Tv = T @ v
    sigma = Tv.norm()
    # A zero tangent (G already inside span S) gives u = 0 and no move.
    u = Tv / sigma.clamp_min(torch.finfo(T.dtype).tiny)
    return u, sigma, v


def geodesic_step(S: torch.Tensor, u: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Move S: (m, r) by angle theta along the rank-1 geodesic in direction -u v^T (descent).

        S' = S v cos(theta) v^T - u sin(theta) v^T + S (I - v v^T)
           = S + (S v (cos(theta) - 1) - u sin(theta)) v^T            (same thing, O(m r))

    u: (m,) unit and orthogonal to span S, v: (r,) unit. S' stays orthonormal.
    """
    theta = torch.as_tensor(theta, dtype=S.dtype, device=S.device)
    w = S @ v
    return S + torch.outer(w * (torch.cos(theta) - 1.0) - u * torch.sin(theta), v)


def sinusoid_peak(ab: torch.Tensor, aa: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    """The theta in (-pi/2, pi/2] maximising ||cos(theta) a - sin(theta) b||^2, from a.b, |a|^2, |b|^2
    (element-wise: one angle per direction of a rank-k step)."""
    return 0.5 * torch.atan2(-ab, 0.5 * (aa - bb))


def capped_angle(theta_star: torch.Tensor, sigma: torch.Tensor, step_size: float | str,
                 damping: float = 1.0) -> torch.Tensor:
    """The angle a subspace update takes, given the best angle theta* and the tangent's singular value sigma.

    "auto": damping * theta*. A fixed eta: the paper's eta * sigma, but never past the best angle,
    theta = sign(theta*) min(eta sigma, |theta*|). This is a deliberate departure from the paper:
    since sigma grows with ||G||^2, eta sigma alone is a different angle at every gradient scale
    (eta = 10000 on gradients of norm ~1 gives hundreds of radians, a random point of the geodesic).
    Along the geodesic the captured energy ||S(theta)^T G||^2 rises monotonically from theta = 0 to
    theta*, so a capped step can never raise the estimation error of the gradient it used.
    Works element-wise (one angle per direction of a rank-k step).
    """
    if step_size == "auto":
        return damping * theta_star
    return torch.sign(theta_star) * torch.minimum(float(step_size) * sigma, theta_star.abs())


def _geodesic_steps(S: torch.Tensor, G: torch.Tensor, k: int, step_size: float | str, damping: float,
                    max_angle: float | None, rank_one: bool):
    """The left-case geodesic update as a generator yielding its sums over G's columns (module docstring).
    Returns (S', theta).

    rank_one: the paper's step along the tangent's top singular triplet, by the best angle on that
    geodesic, theta* = 1/2 atan2(-a.b, (|a|^2 - |b|^2)/2) with a = G^T S v, b = G^T u (`sinusoid_peak`;
    the energy ||S'^T G||^2 is a sinusoid in 2 theta), capped by `capped_angle`.
    Else the top-k directions at once: with the tangent's thin SVD T = U Sigma V^T (U: (m, k)
    orthonormal and orthogonal to S, V: (r, k)),
        S' = S + (S V (cos(Theta) - I) - U sin(Theta)) V^T
    stays orthonormal, and the rows of S'^T G along different v_i are separate:
        ||S'^T G||^2 = const + sum_i ||cos(theta_i) a_i - sin(theta_i) b_i||^2,  a_i = G^T S v_i, b_i = G^T u_i,
    so each theta_i has its own closed-form best angle and `capped_angle` applies per direction. Cost
    O(m n k + m r^2); no SVD of G. k is at most min(r, m - r) (the directions orthogonal to S).
    Directions whose squared singular value is below 1e-5 of the largest, or whose singular value is
    below 1e-5 ||G||^2, do not move: float32's eigenvalues of T^T T are only accurate to ~eps x the
    largest, and T itself to ~eps ||G||^2, so their u_i would be noise. theta: the angle of largest
    magnitude, 0-d.
    """
    A = S.t() @ G
    sums = (G @ A.t(), A @ A.t()) + (() if rank_one else ((G * G).sum(),))
    GAt, AAt, *GG = yield sums
    T = tangent_from_sums(S, GAt, AAt)
    if rank_one:
        u, sigma, v = top_singular_triplet(T)
        # Re-orthogonalise u against S: keeps S' orthonormal over thousands of steps.
        u = u - S @ (S.t() @ u)
        u = u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)
        a, b = G.t() @ (S @ v), G.t() @ u
        ab, aa, bb = yield (a @ b, a @ a, b @ b)
        theta = capped_angle(sinusoid_peak(ab, aa, bb), sigma, step_size, damping)
        if max_angle is not None:
            theta = theta.clamp(-max_angle, max_angle)
        return geodesic_step(S, u, v, theta), theta
    m, r = S.shape
    k = min(k, r, m - r)
    evals, vecs = torch.linalg.eigh(T.t() @ T)  # ascending
    if k < 1:  # no direction orthogonal to S is left (r = m)
        return S.clone(), torch.zeros((), dtype=S.dtype, device=S.device)
    V, top = vecs[:, -k:].flip(1), evals[-k:].flip(0)
    sigma = top.clamp_min(0.0).sqrt()
    # ||T|| <= 2 ||G||^2, and float32 rounding leaves ~eps ||G||^2 of it when G lies inside span S
    moves = (top > 1e-5 * top[0]) & (sigma > 1e-5 * GG[0])
    U = (T @ V) * torch.where(moves, 1.0 / sigma, torch.zeros_like(sigma))  # still directions: zero columns
    U = U - S @ (S.t() @ U)  # re-orthogonalise against S and among themselves: S' stays orthonormal
    U, upper = torch.linalg.qr(U)
    U = U * torch.where(torch.diagonal(upper) < 0, -1.0, 1.0)  # keep each u_i's direction (Q of QR has a sign)
    a, b = G.t() @ (S @ V), G.t() @ U  # (n, k) each: columns a_i, b_i
    ab, aa, bb = yield ((a * b).sum(0), (a * a).sum(0), (b * b).sum(0))
    theta = torch.where(moves, capped_angle(sinusoid_peak(ab, aa, bb), sigma, step_size, damping),
                        torch.zeros_like(sigma))
    if max_angle is not None:
        theta = theta.clamp(-max_angle, max_angle)
    S_new = S + ((S @ V) * (torch.cos(theta) - 1.0) - U * torch.sin(theta)) @ V.t()
    return S_new, theta[theta.abs().argmax()]


def grassmann_update(basis: torch.Tensor, G: torch.Tensor, side: str, step_size: float | str,
                     damping: float = 1.0, max_angle: float | None = None, geodesic_rank: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SubTrack subspace update: a geodesic step of the basis toward G's dominant subspace.

    basis: S (m, r) or P (r, n) float32; G: (m, n). step_size: eta or "auto", turned into an angle
    by `capped_angle` (a fixed eta never moves past the best angle). max_angle clamps |theta|.
    geodesic_rank 1 is the paper's rank-1 step along the tangent's top singular triplet; k > 1
    moves along its top min(k, r) directions at once (`_geodesic_steps`). Returns (new basis of the
    same shape, theta as a 0-d tensor: the largest angle moved). No SVD of G.
    """
    return run_local(grassmann_update_steps(basis, G, side, step_size, damping, max_angle, geodesic_rank))


def grassmann_update_steps(basis: torch.Tensor, G: torch.Tensor, side: str, step_size: float | str,
                           damping: float = 1.0, max_angle: float | None = None, geodesic_rank: int = 1):
    """`grassmann_update` as a generator of sums (module docstring): two rounds, both sums over the
    axis the basis does not span (G's rows for a right basis P), so G may be a row shard."""
    S, Gl = _as_left(basis, side), (G if side == LEFT else G.t())
    S_new, theta = yield from _geodesic_steps(S, Gl, int(geodesic_rank), step_size, damping, max_angle,
                                              rank_one=int(geodesic_rank) == 1)
    return column_major(S_new if side == LEFT else S_new.t()), theta


def basis_change(old: torch.Tensor, new: torch.Tensor, side: str) -> torch.Tensor:
    """Q: (r, r) taking low-rank coordinates in `old` to `new`: Q = S'^T S (left), P P'^T (right)."""
    return new.t() @ old if side == LEFT else old @ new.t()


def rotate_moments(M: torch.Tensor, V: torch.Tensor, Q: torch.Tensor, side: str, compat_beta2: float | None = None,
                   mean_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection-aware Adam moments after the basis changes by Q (see `basis_change`).

    Left (M, V: (r, n)):  M' = Q M,  V' = max(0, (Q*Q)(V - w M*M) + w (Q M)*(Q M))
    Right (M, V: (m, r)): M' = M Q,  V' = max(0, (V - w M*M)(Q*Q) + w (M Q)*(M Q))
    (* element-wise). The derivation rotates the variance V - M*M of bias-corrected moments
    (M / (1 - beta1^t), V / (1 - beta2^t)); on the raw buffers that is the weight
    w = mean_weight = (1 - beta2^t) / (1 - beta1^t)^2. With w = 1 early in training, when raw V is
    still far below M*M (beta2 > beta1), V - M*M is negative, V' is clipped to ~0 where M' is not,
    and Adam's M' / (sqrt(V') + eps) jumps by orders of magnitude right after the move.
    compat_beta2 reproduces the published SubTrack++ code instead: abs() in place of the clip,
    V' multiplied by (1 - beta2), and w = 1.
    """
    Q2 = Q * Q
    w = 1.0 if compat_beta2 is not None else mean_weight
    if side == LEFT:
        M_new = Q @ M
        V_new = Q2 @ (V - w * M * M) + w * M_new * M_new
    else:
        M_new = M @ Q
        V_new = (V - w * M * M) @ Q2 + w * M_new * M_new
    if compat_beta2 is None:
        return M_new, V_new.clamp_min_(0.0)
    return M_new, V_new.abs_().mul_(1.0 - compat_beta2)


def adam_mean_weight(betas: tuple[float, float], t: int) -> float:
    """(1 - beta2^t) / (1 - beta1^t)^2: M*M in the units of raw V, after t Adam steps (1 when t = 0)."""
    if t <= 0:
        return 1.0
    beta1, beta2 = betas
    return (1.0 - beta2 ** t) / (1.0 - beta1 ** t) ** 2


def largest_principal_angle(old: torch.Tensor, new: torch.Tensor, side: str) -> torch.Tensor:
    """Largest principal angle (radians, 0-d) between the spans of two bases of the same side."""
    Q = basis_change(old, new, side)
    cos2 = torch.linalg.eigvalsh(Q.t() @ Q)[0].clamp(0.0, 1.0)
    return torch.acos(cos2.sqrt())


def recovered_update_steps(G: torch.Tensor, R: torch.Tensor, N: torch.Tensor, basis: torch.Tensor, side: str,
                           scale: float, back_scale: float, prev_norm: torch.Tensor, gamma: float = 1.01,
                           recovery_weight: float = 1.0):
    """scale * back(N) + recovery_weight * the limited recovery term, with one back-projection instead of
    three, as a generator of sums: phi is per column (left) / row (right), so only the term's squared norm
    is a sum over the shards (one round: the norm-growth limiter's).

    The Fira / SubTrack++ recovery scaling: phi = ||N_col|| / (||R_col|| + 1e-8) per column of G (left)
    or per row (right), term = (G - b back(R)) * phi, limited so its norm grows at most by gamma per step
    (prev_norm negative on the first step: no limit). Equal to
        scale * project_back(N) + w * limit_norm_growth(recovery_term(...))
    in tests/reference.py's forms (tests/test_grassmann.py checks it), w = recovery_weight: 1 in the
    published Fira / SubTrack++ code (the residual moves at the full lr while the in-subspace part moves
    at lr x scale); `scale` weights both parts alike. b = back_scale: the published code uses scale,
    1 gives the exact residual G - S S^T G. phi scales columns (left) or rows (right), so it commutes
    with the projection,
        (G - b back(R)) * phi = G * phi - b back(R * phi),
    and as S is orthonormal and S^T (G * phi) = R * phi, the term's norm needs no matmul:
        ||term||^2 = ||G * phi||^2 - (2 b - b^2) ||R * phi||^2.
    Returns (update: (m, n), limited norm to store).
    """
    dim = 0 if side == LEFT else 1
    phi = N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + RECOVERY_EPS)
    R_phi = R * phi
    G_phi_sq = (G.norm(dim=dim, keepdim=True).square() * phi.square()).sum()
    (sq,) = yield (torch.stack([G_phi_sq, R_phi.square().sum()]),)
    norm = (sq[0] - (2.0 * back_scale - back_scale ** 2) * sq[1]).clamp_min(0.0).sqrt()
    factor = (norm / (prev_norm + RECOVERY_EPS)).clamp_min(gamma) / gamma
    factor = torch.where(prev_norm < 0, torch.ones_like(factor), factor)
    applied = factor if recovery_weight == 1.0 else factor / recovery_weight  # the limiter's and w's division
    low = scale * N - (back_scale / applied) * R_phi
    G_part = G * (phi / applied)
    update = torch.addmm(G_part, basis, low) if side == LEFT else torch.addmm(G_part, low, basis)
    return update, norm / factor


# ---------------------------------------------------------------------------------------------
# Running the generators of sums
# ---------------------------------------------------------------------------------------------

def run_local(steps):
    """Run a generator of sums (module docstring) whose partial sums are already the totals; its return value."""
    reply = None
    try:
        while True:
            reply = steps.send(reply)
    except StopIteration as done:
        return done.value


def run_summed(generators, all_reduce=None) -> list:
    """Run generators of sums in lockstep; returns their return values in order.

    Each round, every generator still running yields a tuple of partial sums; all of them are
    flattened into one buffer, `all_reduce(buffer)` sums it in place across the shards (one
    collective per round, whatever the number of generators), and each generator receives its
    totals in the shapes it yielded. all_reduce None: nothing to sum over (every partial sum is a total).
    Every process must run the same generators in the same order: their rounds and shapes must match.
    """
    results, live = [None] * len(generators), [(i, g, None) for i, g in enumerate(generators)]
    while live:
        asked = []
        for i, steps, reply in live:
            try:
                asked.append((i, steps, steps.send(reply)))
            except StopIteration as done:
                results[i] = done.value
        if all_reduce is not None and asked:
            parts = [t for _, _, sums in asked for t in sums]
            buffer = torch.cat([t.reshape(-1) for t in parts])
            all_reduce(buffer)
            totals = iter(buffer.split([t.numel() for t in parts]))
            asked = [(i, steps, tuple(next(totals).view(t.shape).to(t.dtype) for t in sums))
                     for i, steps, sums in asked]
        live = asked
    return results
