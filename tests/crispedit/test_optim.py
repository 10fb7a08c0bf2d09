"""Projected Adam: gradients are projected before the Adam step; the first moment follows a new projector."""

import torch

from crispedit.kfac import KFACFactors
from crispedit.optim import ProjectedAdam
from crispedit.projector import build_projector


def psd(n, seed):
    X = torch.randn(n, n + 1, generator=torch.Generator().manual_seed(seed))
    return X @ X.T


def test_first_moment_lies_in_the_projected_subspace():
    W = torch.nn.Parameter(torch.randn(4, 6))
    projector = build_projector(KFACFactors(A=psd(6, 0), S=psd(4, 1), num_tokens=1), 0.8)
    opt = ProjectedAdam([W], [projector], lr=1e-2)
    raw = torch.randn(4, 6)
    W.grad = raw.clone()
    opt.step()
    m = opt.state[W]["exp_avg"]
    torch.testing.assert_close(m, 0.1 * projector(raw))  # (1 - β1) P g
    torch.testing.assert_close(projector(m), m, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(m, 0.1 * raw)


def test_adam_step_leaves_the_subspace_as_in_the_papers_code():
    """Only the gradient is projected: Adam's P m / sqrt(v) rescales coordinates, so the step leaves P's subspace."""
    projector = build_projector(KFACFactors(A=psd(6, 0), S=psd(4, 1), num_tokens=1), 0.8)
    W = torch.nn.Parameter(torch.zeros(4, 6))
    opt = ProjectedAdam([W], [projector], lr=1e-2)
    for seed in range(3):
        W.grad = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
        opt.step()
    step = W.detach()
    assert (step - projector(step)).norm() > 0.1 * step.norm()


def test_set_projectors_projects_the_first_moment_only():
    W = torch.nn.Parameter(torch.randn(4, 6))
    opt = ProjectedAdam([W], [None], lr=1e-2)
    W.grad = torch.randn(4, 6)
    opt.step()
    m, v = opt.state[W]["exp_avg"].clone(), opt.state[W]["exp_avg_sq"].clone()
    projector = build_projector(KFACFactors(A=psd(6, 2), S=psd(4, 3), num_tokens=1), 0.5)
    opt.set_projectors([projector])
    torch.testing.assert_close(opt.state[W]["exp_avg"], projector(m))
    torch.testing.assert_close(opt.state[W]["exp_avg_sq"], v)


def test_state_dict_round_trip():
    W = torch.nn.Parameter(torch.randn(3, 5))
    projector = build_projector(KFACFactors(A=psd(5, 4), S=psd(3, 5), num_tokens=1), 0.7)
    opt = ProjectedAdam([W], [projector], lr=1e-2)
    W.grad = torch.randn(3, 5)
    opt.step()
    fresh = ProjectedAdam([W], [projector], lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    torch.testing.assert_close(fresh.state[W]["exp_avg"], opt.state[W]["exp_avg"])
