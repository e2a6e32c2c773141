"""Tests talk only to this machine (tests/conftest.py): the guard holds in this process."""

import socket

import pytest


def test_a_connection_beyond_this_machine_fails_the_test():
    probe = socket.socket()
    try:
        with pytest.raises(AssertionError, match="tests talk only to 127.0.0.1"):
            probe.connect(("169.254.169.254", 80))
    finally:
        probe.close()
