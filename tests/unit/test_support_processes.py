"""The clean-up every test relies on: an orphaned grandchild in its own session is still found and killed."""

import subprocess
import sys
import time

from tests.support.processes import descendants, kill_all
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
