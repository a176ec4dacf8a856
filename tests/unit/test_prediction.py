import pytest
import torch

from jointcore import prediction as P
from jointcore import schedules as S

AB = S.alphas_cumprod()


@pytest.mark.parametrize("src", P.PREDICTION_TYPES)
@pytest.mark.parametrize("dst", P.PREDICTION_TYPES)
def test_conversions_are_consistent(src, dst):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    xt = P.add_noise(x0, eps, t, AB)
    a = AB[t].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - AB[t]).sqrt().reshape(-1, 1, 1, 1)
    truth = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}
    out = P.convert(truth[src], xt, t, AB, src, dst)
    torch.testing.assert_close(out, truth[dst], rtol=1e-9, atol=1e-9)


def test_x0_from_v_at_999_matches_reference_fact():
    # REFERENCES §3: with z = 0 at t=999, x0 = -sqrt(1-ab) v  (= -0.99767 v), ab_999 = 0.004660
    assert abs(float(AB[999]) - 0.004660) < 1e-5
    v = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    x0 = P.to_x0(v, torch.zeros_like(v), 999, AB, "v_prediction")
    torch.testing.assert_close(x0, -(1 - AB[999]).sqrt() * v)
    assert abs(float(x0[0, 0, 0, 0]) + 0.99767) < 1e-5


def test_sigma_roundtrip():
    t = torch.arange(0, 1000)
    sig = P.timestep_to_sigma(t, AB)
    assert torch.all(sig[1:] > sig[:-1])
    assert P.sigma_to_timestep(sig, AB).tolist() == t.tolist()
    torch.testing.assert_close(P.alphas_cumprod_from_sigma(sig), AB)
    sched = P.schedule_sigmas(S.ddim_timesteps(4), AB)
    assert sched.shape == (5,) and sched[-1] == 0 and torch.all(sched[:-1] > sched[1:])


def test_unknown_kind():
    with pytest.raises(ValueError, match="prediction type"):
        P.to_x0(torch.zeros(1), torch.zeros(1), 0, AB, "flow")
