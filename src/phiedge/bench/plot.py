"""`phiedge bench --plot FILE`: tokens/s of each test as a bar chart (PNG), with ± one standard deviation."""

from __future__ import annotations

import os
from pathlib import Path

from phiedge.errors import PhiedgeError


def bars(records: list[dict]) -> list[tuple[str, float, float]]:
    """(label, tokens/s, stddev) per record, as drawn."""
    return [(r["test"] + (f" ({r['n_threads']} thr)" if r.get("n_threads") else ""), r["avg_ts"], r["stddev_ts"])
            for r in records]


def plot(records: list[dict], path: str | Path) -> list[tuple[str, float, float]]:
    """Write the chart to path (whole or not at all) and return the bars it drew."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PhiedgeError("--plot needs matplotlib: pip install 'phiedge[plot]'") from None
    path = Path(path)
    drawn = bars(records)
    first = records[0] if records else {}
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(drawn) + 1.6))
    labels = [b[0] for b in drawn]
    ax.barh(labels, [b[1] for b in drawn], xerr=[b[2] for b in drawn], color="#3b75af", capsize=3)
    for y, (_, value, _) in enumerate(drawn):
        ax.annotate(f"{value:.1f}", (value, y), xytext=(4, 0), textcoords="offset points", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (mean ± stddev)")
    ax.set_title(f"{first.get('model_variant') or 'model'} {first.get('model_precision') or ''} · "
                 f"{first.get('cpu_info', '')}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PhiedgeError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return drawn
