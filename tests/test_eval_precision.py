"""``python -m sdstudio.eval --precision``: the harness runs its engine at the precision asked (as sdstudio's own
``--precision``; the suite's default is full) and its table's header says what ran."""

from __future__ import annotations

import pytest


def test_the_harness_takes_the_precision_and_records_it(data_dir, tmp_path, capsys):
    from sdstudio.core.paths import DeviceOptions
    from sdstudio.engine.devices import plan_devices
    from sdstudio.eval.__main__ import main

    autocast = plan_devices(DeviceOptions(precision="autocast")).describe()
    assert autocast != plan_devices(DeviceOptions(precision="full")).describe()  # the suite runs full
    out = tmp_path / "RESULTS.md"
    assert main(["--data-dir", str(data_dir), "--n", "8", "--size", "64", "--steps", "1", "--precision", "autocast",
                 "--out", str(out)]) == 0
    header = out.read_text().splitlines()[2]
    assert autocast in header and "`python -m sdstudio.eval --precision autocast`" in header
    with pytest.raises(SystemExit):
        main(["--data-dir", str(data_dir), "--precision", "double"])
    assert "invalid choice: 'double'" in capsys.readouterr().err
