"""Fixtures of the training tests."""

import signal

import pytest


@pytest.fixture
def sigint_from_a_terminal():
    """SIGINT raising KeyboardInterrupt, as in a Python started from a terminal, whatever the suite
    was started under (`nohup pytest &` and a script's background jobs start with SIGINT ignored);
    the handler found is put back afterwards."""
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, found)


@pytest.fixture
def sigint_ignored():
    """SIGINT ignored, as `nohup cmd &` or a script's background job starts a process; the handler
    found is put back afterwards."""
    found = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, found)
