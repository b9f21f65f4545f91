"""The process table and session clean-up (fedtune/runtime/processes.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fedtune.runtime.processes import (family, is_running, kill_processes, kill_session, process_table, read_process,
                                       stop_process)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")

# A leader that starts a child, which moves to a process group of its own (as Ray's
# workers may) and outlives the leader; the leader prints the child's pid and waits.
ORPHAN_IN_OWN_GROUP = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgrp(); time.sleep(120)"])
while os.getpgid(child.pid) == os.getpgrp():  # until the child has left our group
    time.sleep(0.01)
print(child.pid, flush=True)
time.sleep(120)
"""

# A parent whose child ignores SIGTERM (as a stuck SuperExec child might); prints the child's pid.
STUBBORN_CHILD = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print(flush=True); time.sleep(120)"], stdout=subprocess.PIPE)
child.stdout.readline()  # its handler is in place
print(child.pid, flush=True)
time.sleep(120)
"""


def test_read_process_describes_this_process() -> None:
    me = read_process(os.getpid())
    assert me is not None and me.alive
    assert (me.ppid, me.pgrp, me.session) == (os.getppid(), os.getpgrp(), os.getsid(0))
    assert sys.executable.rsplit("/", 1)[-1].split(".")[0] in me.cmdline
    assert any(p.pid == os.getpid() for p in process_table())


def test_a_reaped_process_is_gone_and_a_zombie_is_not_running() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    while is_running(proc.pid):
        time.sleep(0.01)
    zombie = read_process(proc.pid)  # exited, not yet reaped by us
    assert zombie is not None and zombie.state == "Z" and not is_running(proc.pid)
    proc.wait()
    assert read_process(proc.pid) is None and not is_running(proc.pid)


def test_kill_session_reaches_a_child_that_left_the_process_group() -> None:
    leader = subprocess.Popen([sys.executable, "-c", ORPHAN_IN_OWN_GROUP], stdout=subprocess.PIPE,
                              start_new_session=True, text=True)
    try:
        child = int(leader.stdout.readline())
        assert os.getpgid(child) == child != leader.pid and os.getsid(child) == leader.pid
        os.killpg(leader.pid, signal.SIGKILL)  # what study.py did before: the leader's group only
        leader.wait()
        assert is_running(child), "a process-group kill leaves the child running"
        assert kill_session(leader.pid) == []
        assert not is_running(child)
        assert [p for p in process_table() if p.session == leader.pid and p.alive] == []
    finally:
        kill_session(leader.pid)
        leader.stdout.close()



def test_stop_process_ends_the_tree_and_kills_what_ignores_sigterm() -> None:
    parent = subprocess.Popen([sys.executable, "-c", STUBBORN_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert family([parent.pid]) == [parent.pid, child]
        started = time.monotonic()
        assert stop_process(parent.pid, timeout_s=1.0) == []  # SIGTERM ends the parent; the child needs SIGKILL
        assert time.monotonic() - started >= 1.0
        assert parent.wait(timeout=5) == -signal.SIGTERM and not is_running(child)
    finally:
        kill_processes([parent.pid])
        parent.stdout.close()


def test_kill_processes_takes_the_children_too() -> None:
    parent = subprocess.Popen([sys.executable, "-c", STUBBORN_CHILD], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert kill_processes([parent.pid], timeout_s=10) == []
    assert parent.wait(timeout=5) == -signal.SIGKILL and not is_running(child)
    assert kill_processes([parent.pid]) == []  # gone already: no error
    parent.stdout.close()
