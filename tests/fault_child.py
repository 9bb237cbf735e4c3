"""`prism` with one fault armed, for tests/test_faults.py: the process SIGKILLs itself at a chosen
moment, so the run directory is left exactly as a real kill would leave it.

    python tests/fault_child.py SPEC_JSON prism-arguments...

SPEC is {"stage": S, "after": seconds}: a timer started when stage S starts (S "start": at launch),
capped at the stage's end (a resumed stage may have less left to do than the seconds given: then
the kill comes as the stage finishes, before the manifest records it); or {"stage": S, "at": KIND,
"n": k}: the k-th event of KIND after stage S starts, where KIND is
  manifest  the manifest's atomic replace (killed after the temp file is written, before the rename)
  replace   any other file's atomic replace (gate files, teacher cache, checkpoint files)
  swap      a directory swap (checkpoint, adapter): killed before the new directory is renamed in,
            after the old one was moved aside if there was one
  torn      an append to a JSONL file: half of its last line is written, then the kill (what a
            crash in the middle of a write can leave)
"""

import json
import os
import signal
import sys
import threading
from pathlib import Path

spec = json.loads(sys.argv[1])
state = {"stage": "start", "count": 0, "timer": None}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def event(kind: str) -> bool:
    """Count an event; True when it is the one to die at."""
    if state["stage"] != spec["stage"] or spec.get("at") != kind:
        return False
    state["count"] += 1
    return state["count"] == spec["n"]


def arm_timer() -> None:
    if "after" in spec:
        state["timer"] = threading.Timer(spec["after"], die)
        state["timer"].daemon = True  # a run that ends first is not held open by it
        state["timer"].start()


from prism.run import RunDir  # noqa: E402  (after the spec: the patches below wrap the real code)

stage_started = RunDir.stage_started


def started(self, stage):
    state["stage"], state["count"] = stage, 0
    if stage == spec["stage"]:
        arm_timer()
    return stage_started(self, stage)


RunDir.stage_started = started
stage_done = RunDir.stage_done


def done(self, stage, **facts):
    if stage == spec["stage"] and state["timer"] is not None and state["timer"].is_alive():
        die()
    return stage_done(self, stage, **facts)


RunDir.stage_done = done

real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    if event("manifest" if Path(dst).name == "manifest.json" else "replace"):
        die()
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace

real_rename = Path.rename


def rename(self, target):
    if self.name.endswith(".tmp") and event("swap"):
        die()
    return real_rename(self, target)


Path.rename = rename

real_write = os.write


def write(fd, data):
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl") and event("torn"):
        last = data.rstrip(b"\n").rfind(b"\n") + 1  # the start of the last line
        real_write(fd, data[: last + (len(data) - last) // 2])
        die()
    return real_write(fd, data)


os.write = write

if spec["stage"] == "start":
    arm_timer()

from prism.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
