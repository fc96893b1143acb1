"""``bench`` plot: bandwidth vs block size per mechanism with the ceiling line (matplotlib, the optional extra)."""
from __future__ import annotations

from typing import Optional

from llm_datadist_bench.common import format_size
from llm_datadist_bench.results import SAME_HOST, Results

__all__ = ["plot"]

_REFERENCE_STYLE = {"memcpy.c_1t": ("black", "--"), "memcpy.np_1t": ("black", "--"), "memcpy.c_2t": ("grey", ":"),
                    "pvm.c_2t": ("darkgrey", (0, (1, 3))),
                    "raw_tcp": ("dimgrey", "-."), "raw_tcp_n": ("silver", "-.")}


def plot(results: Results, path: str, title: str) -> Optional[str]:
    """Write the PNG; returns None on success or the reason there is no plot (e.g. matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'llm-datadist-bench[plot]'): no PNG plot"
    pairs = results.pairs()
    if not pairs:
        return "no transfer measurements to plot"
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 5.6), squeeze=False)
    sizes = results.sizes()
    for ax, (placement, direction) in zip(axes[0], pairs):
        for mech in results.columns(placement, direction):
            _line(ax, results, mech, direction, placement, sizes)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([format_size(s) for s in sizes])
        ax.set_xlabel("block size")
        ax.set_ylabel("GB/s (1e9 B/s), median; bars min-max")
        ax.set_title(f"{'pull (READ)' if direction == 'pull' else 'push (WRITE)'}, {placement}")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _line(ax, results: Results, mech: str, direction: str, placement: str, sizes) -> None:
    xs, ys, lo, hi = [], [], [], []
    for size in sizes:
        rec = results.get(mech, direction, placement, size)
        if rec is None:
            continue
        xs.append(size)
        ys.append(rec["median_gbps"])
        lo.append(rec["median_gbps"] - rec["min_gbps"])
        hi.append(rec["max_gbps"] - rec["median_gbps"])
    if not xs:
        return
    if mech in _REFERENCE_STYLE:
        color, style = _REFERENCE_STYLE[mech]
        ax.plot(xs, ys, linestyle=style, color=color, linewidth=1.8, label=f"{results.column_label(mech)} (reference)")
        return
    marker = "o" if mech in SAME_HOST else "s"
    ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, markersize=4, capsize=2, linewidth=1.4,
                label=results.column_label(mech))
