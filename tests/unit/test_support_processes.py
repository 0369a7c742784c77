"""The clean-up every test relies on: an orphaned grandchild in its own session is still found and killed."""

import subprocess
import sys
import time

from tests.support.processes import descendants, kill_all, started_since
from tests.support.waiting import DEADLINE

SPAWN_ORPHAN = ("import subprocess, sys; "
                "p = subprocess.Popen(['sleep', '300'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid, flush=True)")


def test_an_orphaned_grandchild_in_its_own_session_is_found_and_killed():
    out = subprocess.run([sys.executable, "-c", SPAWN_ORPHAN], check=True, capture_output=True, text=True,
                         timeout=DEADLINE)
    orphan = int(out.stdout.split()[0])
    deadline = time.monotonic() + DEADLINE  # re-parenting is immediate; the deadline only guards a stalled machine
    while orphan not in descendants() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert orphan in descendants()
    kill_all({orphan})
    assert orphan not in descendants()


def test_what_an_older_process_starts_is_left_to_it():
    """A module-scoped process (a browser) that starts a child during a test keeps it; the test's own go."""
    older = subprocess.Popen([sys.executable, "-c", "import sys, subprocess; sys.stdin.readline(); "
                              "subprocess.Popen(['sleep', '300']); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, text=True)
    own = None
    try:
        before = descendants()
        older.stdin.write("\n")
        older.stdin.flush()  # now it starts its own child
        own = subprocess.Popen(["sleep", "300"])
        deadline = time.monotonic() + DEADLINE
        while len(descendants() - before) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started_since(before) == {own.pid}
    finally:
        kill_all({older.pid, *descendants(older.pid)})
        if own is not None:
            own.kill()
            own.wait()
