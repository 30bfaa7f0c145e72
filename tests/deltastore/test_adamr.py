import pytest
import torch

from deltastore.adamr import AdamR


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(20, 10, generator=g))
    b = torch.nn.Parameter(torch.randn(20, generator=g))
    x, y = torch.randn(64, 10, generator=g), torch.randn(64, 20, generator=g) * 3
    return [w, b], lambda: ((x @ w.T + b - y) ** 2).mean()


def _train(opt_cls, steps=50, **kw):
    params, loss = _problem()
    base = [p.detach().clone() for p in params]
    opt = opt_cls(params, lr=1e-2, **kw)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
        traj.append([p.detach().clone() for p in params])
    drift = sum(float((p.detach() - b).norm() ** 2) for p, b in zip(params, base, strict=True))
    return traj, drift**0.5


def test_reg_zero_matches_adam_step_for_step():
    ours, _ = _train(AdamR, reg=0.0)
    ref, _ = _train(torch.optim.Adam, foreach=False)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for pa, pb in zip(a, b, strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=f"step {step}")


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_reg_shrinks_drift_from_base(norm):
    _, adam = _train(AdamR, steps=200, reg=0.0)
    _, small = _train(AdamR, steps=200, reg=0.03, norm=norm)
    _, large = _train(AdamR, steps=200, reg=0.1, norm=norm)
    assert large < small < adam


def test_bad_arguments():
    params, _ = _problem()
    with pytest.raises(ValueError, match="norm"):
        AdamR(params, norm="l3")
    with pytest.raises(ValueError, match="betas"):
        AdamR(params, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="reg"):
        AdamR(params, reg=-1)
