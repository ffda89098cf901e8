"""matplotlib for the benchmarks' PNGs, or None (with a hint) where it is not installed."""

from __future__ import annotations

from pathlib import Path


def pyplot(redraw: str, json_path: Path):
    """matplotlib.pyplot with the Agg backend, or None after printing how to redraw the
    plots later from the JSON (`python <redraw> --plot-only <json_path>`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plots (pip install matplotlib, then "
              f"python {redraw} --plot-only {json_path})")
        return None
    return plt
