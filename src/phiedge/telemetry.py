"""Opting out of the stack's telemetry: Olive, ONNX Runtime (1.29+), ONNX Runtime GenAI, Hugging Face."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

OPT_OUT = {
    "OLIVE_DISABLE_TELEMETRY": "1",
    "ORT_DISABLE_TELEMETRY": "1",
    "ORTGENAI_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def opt_out(env: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """Set each opt-out variable unless the user set it already; returns env."""
    for key, value in OPT_OUT.items():
        env.setdefault(key, value)
    return env
