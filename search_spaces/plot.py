"""Pictures of cells and architecture weights (matplotlib, no display needed):

* ``cell_figure(genotype)``: DARTS normal and reduction cells (inputs 0 = ``c_{k-2}`` and
  1 = ``c_{k-1}``, nodes 2-5 as the genotype numbers them, output ``c_{k}``) or a NAS-Bench-201
  cell, edges labelled with their op;
* ``weights_figure(ops, op_names, edge_names)``: an edges x ops heatmap with the values printed;
* ``save(fig, path)``: PNG or SVG by suffix (SVG keeps labels as text);
* ``to_image(fig)``: an ``(H, W, 3)`` uint8 array (what TensorBoard's ``add_image`` takes).

Layout: every state on one line, left to right; an edge between neighbours is straight, a
longer one an arc whose height grows with its span, so no two labels share a place.
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")   # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from .genotypes import DartsGenotype, Genotype, NB201Genotype  # noqa: E402

OP_COLORS = {
    "none": "#bbbbbb", "skip_connect": "#7f7f7f", "max_pool_3x3": "#1f77b4", "avg_pool_3x3": "#17becf",
    "sep_conv_3x3": "#d62728", "sep_conv_5x5": "#ff7f0e", "dil_conv_3x3": "#2ca02c", "dil_conv_5x5": "#9467bd",
    "nor_conv_1x1": "#ff7f0e", "nor_conv_3x3": "#d62728",
}
FORMATS = (".png", ".svg")


def _node(ax, x: float, label: str, color: str, width: float = 0.9) -> FancyBboxPatch:
    box = FancyBboxPatch((x - width / 2, -0.28), width, 0.56, boxstyle="round,pad=0.04", fc=color, ec="black",
                         lw=1.0, zorder=3)
    ax.add_patch(box)
    ax.text(x, 0, label, ha="center", va="center", fontsize=10, zorder=4)
    return box


def _edge(ax, a: FancyBboxPatch, b: FancyBboxPatch, xa: float, xb: float, rise: float, label: str | None,
          color: str) -> None:
    """An arrow from box ``a`` to box ``b`` bulging ``rise`` per unit of distance (up when
    positive); the label sits at the curve's apex."""
    ax.add_patch(FancyArrowPatch((xa, 0), (xb, 0), connectionstyle=f"arc3,rad={-rise:g}", arrowstyle="-|>",
                                 mutation_scale=12, color=color, lw=1.6, patchA=a, patchB=b, zorder=1))
    if label is not None:
        ax.text((xa + xb) / 2, rise * (xb - xa) / 2, label, ha="center", va="center", fontsize=8, zorder=5,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=color, lw=1.0))


def _draw_cell(ax, states: Sequence[str], n_inputs: int, edges: Sequence[tuple[str, int, int]],
               outputs: Sequence[int], title: str) -> None:
    """``states`` left to right, the first ``n_inputs`` of them inputs; ``edges`` as (op, src,
    dst) state indices; ``outputs`` the states concatenated into the cell output ``c_{k}``."""
    xs = [2.0 * i for i in range(len(states))]
    boxes = [_node(ax, x, name, "#a6cee3" if i < n_inputs else "#fdbf6f", 1.2 if i < n_inputs else 0.9)
             for i, (x, name) in enumerate(zip(xs, states))]
    rise = 0.45
    for op, src, dst in edges:
        _edge(ax, boxes[src], boxes[dst], xs[src], xs[dst], 0.0 if dst - src == 1 else rise, op,
              OP_COLORS.get(op, "black"))
    top = rise * max([xs[d] - xs[s] for _, s, d in edges] or [2]) / 2 + 0.6
    bottom = -0.8
    if outputs:
        x_out = xs[-1] + 2.0
        out = _node(ax, x_out, "c_{k}", "#b2df8a", 1.0)
        for src in outputs:
            _edge(ax, boxes[src], out, xs[src], x_out, 0.0 if src == len(states) - 1 else -0.2, None, "#999999")
        bottom = -0.1 * (x_out - xs[min(outputs)]) - 0.6
        xs.append(x_out)
    ax.set_xlim(-0.9, xs[-1] + 0.9)
    ax.set_ylim(bottom, top)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=11)


def cell_figure(genotype: Genotype) -> Figure:
    """The genotype's cells, one panel per cell type."""
    if isinstance(genotype, DartsGenotype):
        fig, axes = plt.subplots(2, 1, figsize=(12, 8.5))
        for ax, (kind, edges, concat) in zip(axes, (("normal", genotype.normal, genotype.normal_concat),
                                                     ("reduction", genotype.reduce, genotype.reduce_concat))):
            n = len(edges) // 2
            states = ["0: c_{k-2}", "1: c_{k-1}", *map(str, range(2, n + 2))]
            cell_edges = [(op, j, k // 2 + 2) for k, (op, j) in enumerate(edges)]
            _draw_cell(ax, states, 2, cell_edges, list(concat), f"{kind} cell")
    elif isinstance(genotype, NB201Genotype):
        fig, ax = plt.subplots(1, 1, figsize=(9, 3.6))
        cell_edges = [(op, j, i) for i, node in enumerate(genotype.nodes, start=1) for op, j in node]
        _draw_cell(ax, ["0", "1", "2", "3"], 1, cell_edges, [], "NAS-Bench-201 cell (node 0: input, node 3: output)")
    else:
        raise TypeError(f"cannot draw {type(genotype).__name__}")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.94, hspace=0.12)
    return fig


def weights_figure(ops: np.ndarray, op_names: Sequence[str], edge_names: Sequence[str], title: str) -> Figure:
    """Edges x ops heatmap of architecture weights, each value printed."""
    ops = np.asarray(ops, dtype=np.float64)                       # (edges, n_ops)
    fig, ax = plt.subplots(figsize=(1.1 * len(op_names) + 2.0, 0.38 * len(edge_names) + 1.6))
    im = ax.imshow(ops, cmap="viridis", vmin=0.0, vmax=max(float(ops.max()), 1e-6), aspect="auto")
    ax.set_xticks(range(len(op_names)), op_names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(edge_names)), edge_names, fontsize=8)
    threshold = 0.6 * float(ops.max())
    for (e, k), v in np.ndenumerate(ops):
        ax.text(k, e, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > threshold else "white")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> None:
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot write {str(path)!r}: the file name must end in {' or '.join(FORMATS)}")
    with matplotlib.rc_context({"svg.fonttype": "none"}):      # SVG labels stay text (searchable)
        fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)


def to_image(fig: Figure, dpi: int = 80) -> np.ndarray:
    """The figure as an ``(H, W, 3)`` uint8 array; closes it."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
