"""While `mose up` fits the first calibrator beside a running server: the fitting record, and the
jury deployment refusing verdicts with a 503 until the calibrator lands, then reloading it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess

import pytest

from jury.calibrator import (
    FITTING_FILE,
    Calibrator,
    CalibratorFitting,
    clear_fitting,
    fitting_in_progress,
    mark_fitting,
    save_calibrator,
)
from registry.errors import UnavailableError
from registry.home import MoseHome


def test_the_fitting_record_is_written_read_and_cleared(tmp_path):
    assert fitting_in_progress(tmp_path) is None
    mark_fitting(tmp_path)
    fitting = fitting_in_progress(tmp_path)
    assert fitting is not None and fitting.pid == os.getpid() and fitting.host == socket.gethostname()
    clear_fitting(tmp_path)
    assert fitting_in_progress(tmp_path) is None
    clear_fitting(tmp_path)  # clearing twice is harmless


def test_a_fit_whose_process_is_gone_or_a_damaged_record_does_not_count(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    gone = CalibratorFitting(since=0.0, host=socket.gethostname(), pid=finished.pid)
    (tmp_path / FITTING_FILE).write_text(gone.model_dump_json())
    assert fitting_in_progress(tmp_path) is None
    elsewhere = gone.model_copy(update={"host": "another-node"})  # cannot be checked from here
    (tmp_path / FITTING_FILE).write_text(elsewhere.model_dump_json())
    assert fitting_in_progress(tmp_path) == elsewhere
    (tmp_path / FITTING_FILE).write_text("{not json")
    assert fitting_in_progress(tmp_path) is None


def test_the_jury_refuses_verdicts_while_its_first_calibrator_is_fitted_then_reloads_it(tmp_path):
    from serve.deployments.crosscheck import CrossCheckDeployment

    home = MoseHome.from_env(tmp_path / "home")
    deployment = CrossCheckDeployment(str(home.root), router=None, pool=None)
    assert deployment.status() == {"calibrator": None, "calibrator_fitting": False}

    mark_fitting(home.crosscheck_dir)
    assert deployment.status() == {"calibrator": None, "calibrator_fitting": True}
    with pytest.raises(UnavailableError, match="being fitted"):
        asyncio.run(deployment.crosscheck("What is the boiling point of water?", "100 degrees Celsius"))

    save_calibrator(Calibrator(method="constant"), home.crosscheck_dir)
    deployment._checked_at -= 60  # past the reload interval
    assert deployment.status() == {"calibrator": "v0001", "calibrator_fitting": False}
