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
    # a parent and its child (a "worker") both hang; both must dump their stacks. The parent
    # hangs only once the child is inside worker_loop (its ready file), so that a slow start on
    # a loaded machine cannot leave the child's stack out of the log.
    ready = tmp_path / "worker.ready"
    child = ("import pathlib, time\ndef worker_loop():\n"
             f"    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(600)\nworker_loop()")
    code = (f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"{child!r}])\nwhile not os.path.exists({str(ready)!r}): time.sleep(0.05)\n"
            "time.sleep(600)")
    log = tmp_path / "hang.log"
    with pytest.raises(AssertionError, match="hung: killed after 10 s"):
        subproc.run_logged([sys.executable, "-c", code], {}, log, timeout=10)
    assert ready.exists()
    text = log.read_text()  # NOTE: the two processes' dumps may interleave
    assert "Fatal Python error" in text and "worker_loop" in text, text  # the child's stack too
