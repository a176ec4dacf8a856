import pytest
import torch
from diffusers import DDIMScheduler

from jointcore import schedules as S


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_ddim_timesteps_identical_to_diffusers(spacing, offset):
    for n in range(1, 51):
        ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012, timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(n)
        ours = S.ddim_timesteps(n, spacing, steps_offset=offset if spacing == "leading" else 0)
        # diffusers applies steps_offset to 'leading' only
        assert ours.tolist() == ref.timesteps.tolist(), (spacing, offset, n)


def test_e2e_ft_facts():
    assert S.ddim_timesteps(1, "trailing").tolist() == [999]
    assert S.ddim_timesteps(1, "leading", steps_offset=1).tolist() == [1]
    assert S.ddim_timesteps(4, "trailing").tolist() == [999, 749, 499, 249]
    assert S.ddim_timesteps(4, "leading", steps_offset=1).tolist() == [751, 501, 251, 1]


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zsnr", [False, True])
def test_alphas_cumprod_match_diffusers(schedule, zsnr):
    ref = DDIMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=zsnr)
    ours = S.alphas_cumprod(beta_schedule=schedule, zero_terminal_snr=zsnr)
    torch.testing.assert_close(ours.float(), ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    if zsnr:
        assert ours[-1] == 0


def test_leading_with_offset_stays_inside_the_table():
    for n in (500, 999, 1000):
        ts = S.ddim_timesteps(n, "leading", steps_offset=1)
        assert int(ts.max()) <= 999 and len(ts) == n


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.ddim_timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        S.ddim_timesteps(4, "uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        S.make_betas(beta_schedule="cosine")
