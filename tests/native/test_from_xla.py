"""A run trained on XLA:CPU (the torch-xla environment's CLI) resumes and evaluates on the
native CPU backend (tests/cross_backend.py)."""

import pytest

from tests.cli_helpers import SCRIPT
from tests.cross_backend import (
    NATIVE,
    NATIVE_ENV,
    XLA,
    XLA_ENV,
    assert_the_crossed_run_evaluates,
    assert_the_run_continues_on_the_other_backend,
    other_script,
)

pytestmark = pytest.mark.native


def test_an_xla_run_resumes_and_evaluates_on_the_native_backend(tmp_path):
    xla = other_script("RETINANET_XLA_ENV", "torch-xla")
    assert_the_run_continues_on_the_other_backend((xla, XLA, XLA_ENV), (SCRIPT, NATIVE, NATIVE_ENV), tmp_path)
    assert_the_crossed_run_evaluates(SCRIPT, tmp_path, "cpu", NATIVE_ENV)
