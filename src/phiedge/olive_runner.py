"""Run one Olive workflow in a child process: `python -m phiedge.olive_runner CONFIG RESULT`.

A child process keeps Olive's memory, logging and crashes out of phiedge. It writes RESULT (JSON)
itself, because Olive exits 0 when a workflow fails ("No output model produced").
"""

from __future__ import annotations

import ctypes
import json
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


def main(config_path: str, result_path: str) -> int:
    _die_with_parent()
    _silence_telemetry()
    from olive.workflows import run

    output = run(config_path)
    models = output.get_output_models() if output is not None else []
    result = {"has_output_model": bool(models),
              "model_paths": [m.model_path for m in models if getattr(m, "model_path", None)]}
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0 if models else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
