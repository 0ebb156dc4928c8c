import pytest
import torch

from sdstudio.engine import schedules
from sdstudio.engine.schedules import DiscreteSchedule, get_sigmas

M = DiscreteSchedule()


def test_model_sigmas_are_sd_values():
    assert M.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert M.sigma_max == pytest.approx(14.6146, abs=1e-4)


def test_sigma_t_round_trip():
    t = torch.tensor([0.0, 10.5, 500.0, 999.0])
    assert torch.allclose(M.sigma_to_t(M.t_to_sigma(t)), t, atol=1e-3)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULE_FUNCTIONS))
def test_every_schedule_descends_to_zero(name):
    s = get_sigmas(name, 10, M)
    assert len(s) == 11 and s[-1] == 0
    assert torch.all(s[:-1] > 0) and torch.all(s[:-1] >= s[1:])


def test_karras_and_exponential_endpoints():
    for name in ("karras", "exponential"):
        s = get_sigmas(name, 20, M)
        assert float(s[0]) == pytest.approx(M.sigma_max, rel=1e-5)
        assert float(s[-2]) == pytest.approx(M.sigma_min, rel=1e-5)


def test_uniform_is_the_discrete_schedule():
    s = get_sigmas("uniform", 1000, M)
    assert torch.allclose(s[:-1].flip(0), M.sigmas, rtol=1e-4)


def test_discard_next_to_last():
    plain = get_sigmas("karras", 11, M)
    discard = get_sigmas("karras", 10, M, discard_next_to_last=True)
    assert len(discard) == 11 and torch.equal(discard, torch.cat([plain[:-2], plain[-1:]]))


def test_ddim_timesteps_as_a1111():
    assert schedules.ddim_timesteps(20).tolist() == list(range(1, 1000, 50))


def test_ddim_schedule_keeps_a1111_step_count_quirk():
    # A1111 steps through the 1000 timesteps with stride 1000 // n, so 12 steps give 13 sigmas.
    assert len(get_sigmas("ddim", 12, M)) == 14
