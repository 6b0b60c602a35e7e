"""The benchmarks' --plot PATH: PNG figures drawn with matplotlib (Agg), every one titled with the GPU and the
baseline measured in the same run. matplotlib is imported only to draw, so the benchmarks run without it; --plot
without it fails while the arguments are parsed, before any GPU work (pip install matplotlib, or .[bench])."""

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

MISSING = "--plot needs matplotlib: pip install matplotlib (or pip install .[bench])"


def add_plot_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--plot", metavar="PATH", type=plot_path, help=f"write a PNG of {what}; needs matplotlib")


def plot_path(path: str) -> str:
    """argparse type of --plot: refuses the flag at parse time where matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise argparse.ArgumentTypeError(MISSING) from None
    return path


@dataclass(frozen=True)
class Panel:
    """One subplot: named series of (x values, y values), a y of None where that point was not measured."""

    title: str
    xlabel: str
    series: dict[str, tuple[Sequence, Sequence[float | None]]]
    logx: bool = False
    logy: bool = False
    markers_only: bool = False  # categories (mixed batches, workload steps): no line between them


def line_chart(path: str, panels: list[Panel], *, title: str, gpu: str, baseline: str, ylabel: str,
               ceiling: float | None = None, ceiling_label: str = "ceiling") -> None:
    """Panels side by side (three a row), a dashed line at `ceiling`; series with no measured point are left out.
    A legend on the first panel, and on any other whose series differ from it."""
    plt = pyplot()
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8, 5 * ncols), 3.8 * nrows), squeeze=False)
    legend: list[str] | None = None
    for ax, panel in zip(axes.flat, panels):
        drawn = []
        for name, (xs, ys) in panel.series.items():
            if all(y is None for y in ys):
                continue
            y_values = [math.nan if y is None else y for y in ys]
            ax.plot(xs, y_values, marker="o", linestyle="none" if panel.markers_only else "-", label=name)
            drawn.append(name)
        if ceiling is not None:
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1, label=ceiling_label)
        if panel.logx:
            ax.set_xscale("log", base=2)
        if panel.logy:
            ax.set_yscale("log")
        if panel.markers_only:
            ax.tick_params(axis="x", labelrotation=30)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if drawn != legend:
            legend = drawn
            ax.legend(fontsize="small")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    save(fig, path, title, gpu, baseline)


def stacked_bars(path: str, labels: Sequence[str], parts: dict[str, Sequence[float]], *, title: str, gpu: str,
                 baseline: str, xlabel: str, ylabel: str) -> None:
    """One bar a label, its parts stacked bottom to top in the order given."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(labels)), 4.5))
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.tick_params(axis="x", labelsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    save(fig, path, title, gpu, baseline)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, title: str, gpu: str, baseline: str) -> None:
    fig.suptitle(f"{title}\n{gpu}, {baseline}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
