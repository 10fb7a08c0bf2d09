"""Eq. 6 against the explicit projector built from the eigenvectors of kron(A, S), in float64."""

import pytest
import torch

from crispedit.eigen import energy_mask, energy_rank
from crispedit.kfac import KFACFactors
from crispedit.projector import build_projector, project_kronecker, staircase_blocks


def random_psd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
    return X @ X.T / n


def vec(Q: torch.Tensor) -> torch.Tensor:
    """Column-major vec, for which vec(g aᵀ) = a ⊗ g and the curvature block is A ⊗ S."""
    return Q.T.reshape(-1)


def unvec(v: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    return v.reshape(d_in, d_out).T


def dense_projector(C: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """P_γ = U_{>k} U_{>k}ᵀ from the eigendecomposition of the dense matrix C (Eq. 3); also U_{≤k}."""
    eigenvalues, U = torch.linalg.eigh(C)
    order = eigenvalues.argsort(descending=True)
    eigenvalues, U = eigenvalues[order], U[:, order]
    k = energy_rank(eigenvalues.clamp_min(0), gamma)
    return U[:, k:] @ U[:, k:].T, U[:, :k]


@pytest.mark.parametrize("gamma", [0.3, 0.7, 0.9, 0.99])
def test_kronecker_projector_equals_dense(gamma):
    d_out, d_in = 4, 3
    A, S = random_psd(d_in, 1), random_psd(d_out, 2)
    Q = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    P, top = dense_projector(torch.kron(A, S), gamma)
    proj = build_projector(KFACFactors(A=A, S=S, num_tokens=10), gamma)
    projected = proj(Q.float()).double()
    torch.testing.assert_close(projected, unvec(P @ vec(Q), d_out, d_in), atol=1e-5, rtol=1e-5)
    # idempotent, and orthogonal to the top-k (high-curvature) directions
    torch.testing.assert_close(proj(projected.float()).double(), projected, atol=1e-5, rtol=1e-5)
    assert (top.T @ vec(projected)).abs().max() < 1e-5


def test_gamma_limits_keep_all_or_remove_all():
    A, S = random_psd(3, 4), random_psd(5, 5)
    Q = torch.randn(5, 3)
    factors = KFACFactors(A=A, S=S, num_tokens=1)
    torch.testing.assert_close(build_projector(factors, 0.0)(Q), Q, atol=1e-5, rtol=1e-5)
    assert build_projector(factors, 1.0)(Q).abs().max() < 1e-6
    keeps = [build_projector(factors, g).kept_fraction for g in (0.0, 0.5, 0.9, 0.999, 1.0)]
    assert keeps == sorted(keeps, reverse=True) and keeps[0] == 1.0 and keeps[-1] == 0.0


def test_zero_curvature_directions_are_always_kept():
    curvature = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert energy_mask(curvature, 1.0).tolist() == [[False, True], [False, True]]
    assert energy_mask(curvature, 0.5).tolist() == [[False, True], [True, True]]


def test_gamma_out_of_range_is_refused():
    with pytest.raises(ValueError, match="γ"):
        energy_mask(torch.ones(3), 1.5)


def test_nullspace_projector_equals_dense_input_side_projector():
    d_out, d_in = 4, 5
    A = random_psd(d_in, 6)
    Q = torch.randn(d_out, d_in, dtype=torch.float64)
    P_A, _ = dense_projector(A, 0.9)
    proj = build_projector(KFACFactors(A=A, S=random_psd(d_out, 7), num_tokens=1), 0.9, method="nullspace")
    assert proj.U_out is None
    torch.testing.assert_close(proj(Q.float()).double(), Q @ P_A, atol=1e-5, rtol=1e-5)
    # the same thing through the Kronecker form: (P_A ⊗ I) vec(Q)
    torch.testing.assert_close(unvec(torch.kron(P_A, torch.eye(d_out, dtype=torch.float64)) @ vec(Q), d_out, d_in),
                               Q @ P_A)


def test_conv1d_layout_projects_the_transpose():
    A, S = random_psd(6, 8), random_psd(3, 9)
    factors = KFACFactors(A=A, S=S, num_tokens=1)
    linear = build_projector(factors, 0.8)
    conv = build_projector(factors, 0.8, fan_in_fan_out=True)
    grad_out_in = torch.randn(3, 6)
    torch.testing.assert_close(conv(grad_out_in.T.contiguous()), linear(grad_out_in).T)


def test_projector_memory_is_factor_sized():
    d_out, d_in = 8, 32
    factors = KFACFactors(A=random_psd(d_in, 1), S=random_psd(d_out, 2), num_tokens=1)
    assert build_projector(factors, 1.0).memory_bytes == 4 * (d_out**2 + d_in**2) + d_out * d_in  # all removed
    small = build_projector(factors, 0.5)  # only the S-eigenvectors of removed directions are kept
    assert small.memory_bytes < 4 * (d_out**2 + d_in**2) + d_out * d_in
    assert small.U_out.shape[1] < d_out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_complement_form_equals_eq6(gamma):
    from crispedit.eigen import eigh_psd, energy_mask, kronecker_eigenvalues

    A, S = random_psd(7, 10), random_psd(5, 11)
    Q = torch.randn(5, 7)
    lam_in, U_in = eigh_psd(A)
    lam_out, U_out = eigh_psd(S)
    mask = energy_mask(kronecker_eigenvalues(lam_out, lam_in), gamma)
    full = project_kronecker(Q, U_out, U_in, mask.float())
    proj = build_projector(KFACFactors(A=A, S=S, num_tokens=1), gamma)
    torch.testing.assert_close(proj(Q), full, atol=1e-5, rtol=1e-5)


def test_project_kronecker_with_identity_bases_is_a_mask():
    Q = torch.arange(6.0).reshape(2, 3)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(project_kronecker(Q, torch.eye(2), torch.eye(3), mask), Q * mask)


@pytest.mark.parametrize("ekfac", [False, True])
def test_staircase_blocks_are_exact_for_any_mask(ekfac):
    """Row blocks of the staircase (and of a mask that is no staircase, as EK-FAC's) give Eq. 6 exactly."""
    from crispedit.eigen import eigh_psd, energy_mask, kronecker_eigenvalues

    d_out, d_in = 40, 60
    A, S = random_psd(d_in, 12), random_psd(d_out, 13)
    Q = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(14))
    lam_in, U_in = eigh_psd(A)
    lam_out, U_out = eigh_psd(S)
    curvature = (torch.rand(d_out, d_in, generator=torch.Generator().manual_seed(15)) if ekfac
                 else kronecker_eigenvalues(lam_out, lam_in))
    mask = energy_mask(curvature, 0.8)
    proj = build_projector(KFACFactors(A=A, S=S, num_tokens=1), 0.8,
                           corrected_eigenvalues=curvature if ekfac else None)
    assert proj.blocks and sum(r1 - r0 for r0, r1, _, _ in proj.blocks) <= proj.removed.shape[0]
    torch.testing.assert_close(proj(Q), project_kronecker(Q, U_out, U_in, mask.float()), atol=1e-5, rtol=1e-5)


def test_staircase_blocks_take_each_block_from_its_narrower_side():
    """Rows that remove most columns are served from their kept columns; the split costs no more than equal blocks."""
    c = torch.tensor([95, 90, 90, 60, 30, 10, 5, 5, 2, 1])  # row i removes columns < c_i, of 100
    removed = torch.arange(100).view(1, -1) < c.view(-1, 1)
    blocks = staircase_blocks(removed, n_blocks=3)
    assert [r for r0, r1, _, _ in blocks for r in range(r0, r1)] == list(range(10))
    assert blocks[0] == (0, 3, 90, True)  # columns 90.. kept by rows 0-2: 10 wide against 95
    for r0, r1, width, from_kept in blocks:
        needed = removed[r0:r1]
        assert needed[:, :width].all() if from_kept else not needed[:, width:].any()

    def cost(bs):
        return sum((r1 - r0) * (100 - w if k else w) for r0, r1, w, k in bs)

    def best(r0, k):  # brute force: the least cost of rows r0.. in at most k blocks
        if r0 == 10:
            return 0
        if k == 0:
            return float("inf")
        return min((r1 - r0) * min(int(c[r0]), 100 - int(c[r1 - 1])) + best(r1, k - 1) for r1 in range(r0 + 1, 11))

    assert cost(blocks) == best(0, 3) == 3 * 10 + 2 * 60 + 5 * 10


def test_a_massive_input_direction_leaves_the_layer_unconstrained_and_is_logged(caplog):
    """One input direction with nearly all of A's energy meets γ alone, so the projector removes only its
    own column of products (BENCHMARKS.md §13): the edit warns about such a layer, not about a normal one."""
    from crispedit.edit import warn_unconstrained

    spread = torch.linspace(1.0, 0.01, 200)
    massive = spread.clone()
    massive[0] = 1e5
    normal = build_projector(KFACFactors(A=torch.diag(spread), S=torch.eye(8), num_tokens=10), 0.8)
    flat = build_projector(KFACFactors(A=torch.diag(massive), S=torch.eye(8), num_tokens=10), 0.8)
    assert flat.kept_fraction == pytest.approx(1 - 1 / 200)
    assert normal.kept_fraction < 0.9
    with caplog.at_level("WARNING", logger="crispedit.edit"):
        warn_unconstrained(["normal", "flat"], [normal, flat], 0.8)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("flat: at γ=0.8 the projector keeps 99.50%")
