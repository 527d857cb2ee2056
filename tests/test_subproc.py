"""The GPU tests' child-process helper (tests/subproc.py) on the CPU: logs survive, hangs dump
their stacks."""

import sys

import pytest

from tests import subproc


def test_success_and_failure_keep_the_log(tmp_path):
    log = tmp_path / "ok.log"
    subproc.run_logged([sys.executable, "-c", "print('engine ready')"], {}, log, timeout=60)
    assert "engine ready" in log.read_text()
    bad = tmp_path / "bad.log"
    with pytest.raises(AssertionError, match=r"(?s)failed \(rc 3\).*boom"):
        subproc.run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], {},
                           bad, timeout=60)


def test_a_hang_is_killed_with_every_stack_in_the_log(tmp_path):
    # a parent and its child (a "worker") both hang; both must dump their stacks
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time\\ndef worker_loop():\\n    time.sleep(600)\\nworker_loop()']); "
            "time.sleep(600)")
    log = tmp_path / "hang.log"
    with pytest.raises(AssertionError, match="hung: killed after 3 s"):
        subproc.run_logged([sys.executable, "-c", code], {}, log, timeout=3)
    text = log.read_text()  # NOTE: the two processes' dumps may interleave
    assert "Fatal Python error" in text and "worker_loop" in text, text  # the child's stack too
