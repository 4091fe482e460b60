"""Run one Olive workflow in a child process: `python -m phiedge.build.olive_runner CONFIG`.

A child process keeps Olive's memory, logging and crashes out of phiedge. It exits 3 when no model came out,
because Olive exits 0 when a workflow fails ("No output model produced").
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT = "PHIEDGE_PARENT_PID"  # set by phiedge: the process this export belongs to
PR_SET_PDEATHSIG = 1


def _silence_telemetry() -> None:
    """Olive 0.13 logs a heartbeat before it reads OLIVE_DISABLE_TELEMETRY: stop that too."""
    try:
        from olive.telemetry.telemetry import Telemetry

        Telemetry._log_heartbeat = lambda self, *args, **kwargs: None
    except ImportError:  # a different Olive layout: the environment variable still applies
        pass


def _die_with_parent() -> None:
    """phiedge killed outright (SIGKILL, the out-of-memory killer) cannot stop its child: have the kernel do
    it, or an orphaned export would go on filling the partial folder the next build into OUT removes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get(PARENT)
    if parent and os.getppid() != int(parent):  # it died before prctl took effect
        sys.exit(1)


def main(config_path: str) -> int:
    _die_with_parent()
    _silence_telemetry()
    from olive.workflows import run

    output = run(config_path)
    return 0 if output is not None and output.get_output_models() else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
