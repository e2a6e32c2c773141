"""A run trained on the native CPU backend (the native environment's CLI, PyPI's current
torch) resumes and evaluates on XLA:CPU (tests/cross_backend.py)."""

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

pytestmark = pytest.mark.xla


def test_a_native_run_resumes_and_evaluates_on_xla(tmp_path):
    native = other_script("RETINANET_NATIVE_ENV", "native")
    assert_the_run_continues_on_the_other_backend((native, NATIVE, NATIVE_ENV), (SCRIPT, XLA, XLA_ENV), tmp_path)
    assert_the_crossed_run_evaluates(SCRIPT, tmp_path, "xla", XLA_ENV)
