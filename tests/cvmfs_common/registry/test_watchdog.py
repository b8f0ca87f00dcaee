"""The transfer watchdog (cvmfs_common.registry.watchdog): it outlives whatever a check
raises, and says what that was."""

from __future__ import annotations

import logging
import socket
import time
from types import SimpleNamespace

from cvmfs_common.oci.reference import parse_reference
from cvmfs_common.registry.errors import Aborted, TransferTooSlow
from cvmfs_common.registry.limits import TransferLimits
from cvmfs_common.registry.watchdog import Watchdog

REF = parse_reference("r.example.org/a/b:1")


def _wait_for(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_an_unexpected_error_in_a_check_is_logged_and_the_watchdog_goes_on(caplog):
    dog = Watchdog(TransferLimits(check_interval=0.02))
    raised = []

    def broken_check(now, deadline, aborted):
        if not raised:
            raised.append(now)
            raise RuntimeError("a bug in the check")
        return TransferTooSlow(REF, "too slow")

    caplog.set_level(logging.DEBUG, logger="cvmfs_common.registry.watchdog")
    try:
        with dog.tracked(REF, "blob x") as t:
            t.check = broken_check
            assert _wait_for(lambda: t.failure is not None), "the watchdog stopped after the error"
    finally:
        dog.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is not None
    assert "a bug in the check" in caplog.text
    assert isinstance(t.failure, TransferTooSlow)


def test_a_socket_already_closed_when_cut_is_a_debug_message(caplog):
    dog = Watchdog(TransferLimits(check_interval=60))
    sock = socket.socket()
    sock.close()  # the reader finished and closed its connection meanwhile
    resp = SimpleNamespace(url="http://r.example.org/v2/a/b/blobs/x", raw=SimpleNamespace(_connection=SimpleNamespace(sock=sock)))
    caplog.set_level(logging.DEBUG, logger="cvmfs_common.registry.watchdog")
    try:
        with dog.tracked(REF, "blob x") as t:
            t.resp = resp
            dog.abort("stopping")
    finally:
        dog.close()
    assert isinstance(t.failure, Aborted)
    records = [r for r in caplog.records if "no socket to shut down" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG and records[0].exc_info is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
