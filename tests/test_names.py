import pytest

from sdstudio.core.names import (
    UnknownNameError,
    get_sampler,
    get_schedule,
    resolve_schedule,
    sampler_labels,
    split_legacy_sampler,
)
from sdstudio.engine.samplers import SAMPLER_FUNCTIONS


def test_every_sampler_row_has_a_function():
    for label in sampler_labels():
        assert get_sampler(label).function in SAMPLER_FUNCTIONS


def test_aliases_and_case():
    assert get_sampler("k_euler_a").label == "Euler a"
    assert get_sampler("dpm++ 2m").label == "DPM++ 2M"
    assert get_schedule("SGMUniform").label == "SGM Uniform"


def test_unknown_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        get_sampler("Euler z")
    assert "Euler a" in str(e.value) and "DPM++ 2M" in str(e.value)


@pytest.mark.parametrize("sampler, expected", [
    ("DPM++ 2M", "Karras"), ("DPM++ SDE", "Karras"), ("DPM++ 2M SDE", "Exponential"),
    ("DPM++ 3M SDE", "Exponential"), ("Euler a", "Uniform"), ("DPM2", "Karras"), ("LMS", "Uniform"),
])
def test_automatic_resolves_to_a1111_default(sampler, expected):
    assert resolve_schedule(get_sampler(sampler), "Automatic").label == expected
    assert resolve_schedule(get_sampler(sampler), "Exponential").label == "Exponential"


def test_legacy_sampler_names_split():
    assert split_legacy_sampler("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_legacy_sampler("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert split_legacy_sampler("Euler a") == ("Euler a", None)
    assert split_legacy_sampler("Nonsense Karras") == ("Nonsense Karras", None)
