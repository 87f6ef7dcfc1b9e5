"""A network of clinics: what the all-to-all moves (lesson 11).

Every function takes plain data, draws one figure, saves it if given a ``path`` and
returns the ``Figure``.
"""
from __future__ import annotations

import numpy as np

from ._style import _finish, _plt

__all__ = ["plot_bytes_moved"]


def plot_bytes_moved(panels, path=None, title="What the shuttle carries: bytes one rank sends per training step"):
    """Lesson 11: bytes moved by the all-to-alls against E, P, k and the capacity factor.

    ``panels``: a list of ``{"xlabel": str, "x": array, "curves": {label: array of bytes},
    "points": {label: (x array, bytes array)}}`` — curves from the cost model, points
    measured (``stats["sent_bytes"]`` of a real run); bytes are shown in KiB.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for i, (label, y) in enumerate(panel.get("curves", {}).items()):
            ax.plot(panel["x"], np.asarray(y, float) / 1024, "-", color=f"C{i}", lw=1.8, label=label)
        for i, (label, (x, y)) in enumerate(panel.get("points", {}).items()):
            ax.plot(x, np.asarray(y, float) / 1024, "o", color=f"C{i}", ms=5, mfc="white", label=label)
        ax.set(xlabel=panel["xlabel"], ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="upper left")
    axes[0][0].set_ylabel("KiB sent by one rank per step")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)
