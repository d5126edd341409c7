"""The report a local run leaves in its output directory: ``report.html`` with its pictures
beside it (training and validation curves, architecture entropy, every edge's weight
trajectory, the final cells) and the run's cost. Drawn from the history the trial carries
through its checkpoints, so a resumed run reports the whole search."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

import search_spaces

from .state import write_text

SHORT_SEARCH_NOTE = (
    "Early in a search the parameter-free ops (pooling, skip connections) are ahead: their outputs "
    "are already useful while the convolutions' weights are still close to their random start, so "
    "the architecture gradient first favours them. A short search (a few hundred steps, as the quick "
    "start's) stops there; the papers' searches run 50 epochs of about 100 steps at batch 256 or more, "
    "by which time the convolutions have caught up, and PC-DARTS trains the weights alone for the first "
    "15 epochs (arch_warmup_epochs). Read the trajectories below: the curves that rise late are the "
    "trained ops catching up.")


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _curves(history: Mapping[str, list], path: Path) -> bool:
    import matplotlib.pyplot as plt

    from search_spaces.plot import save

    train, val = history.get("train", []), history.get("validation", [])
    if not train and not val:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("loss", "training loss"), ("arch_loss", "architecture loss")):
        x, y = _series(train, key)
        if x:
            ax1.plot(x, y, label=label)
    x, y = _series(val, "val_loss")
    if x:
        ax1.plot(x, y, "o-", label="validation loss")
    ax1.set_xlabel("step")
    ax1.set_title("loss")
    ax1.legend(fontsize=8)
    for records, key, label, style in ((train, "train_accuracy", "training accuracy", "-"),
                                       (val, "val_accuracy", "validation accuracy", "o-"),
                                       (val, "test_accuracy", "test accuracy (reported only)", "s--")):
        x, y = _series(records, key)
        if x:
            ax2.plot(x, y, style, label=label)
    ax2.set_xlabel("step")
    ax2.set_title("accuracy")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    return True


def _entropy(history: Mapping[str, list], path: Path) -> bool:
    import matplotlib.pyplot as plt

    from search_spaces.plot import save

    val = history.get("validation", [])
    x, ent = _series(val, "arch_entropy")
    if not x:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(x, ent, "o-", label="mean edge entropy (nats)")
    _, uniform = _series(val, "arch_entropy_uniform")
    if uniform:
        ax.axhline(uniform[0], color="gray", ls="--", label="uniform")
    _, mx = _series(val, "arch_max_weight")
    if mx:
        ax.plot(x, mx, "s-", label="mean largest weight")
    ax.set_xlabel("step")
    ax.set_title("architecture weights: entropy falls as they sparsify")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    return True


def _trajectories(arch: Sequence[Mapping[str, Any]], cell_type: str, path: Path) -> bool:
    import matplotlib.pyplot as plt

    from search_spaces.plot import OP_COLORS, save

    if not arch:
        return False
    last = arch[-1]
    op_names = last["op_names"]
    names = search_spaces.edge_names(last["space"])
    steps = [a["step"] for a in arch]
    w = np.array([a["cells"][cell_type]["ops"] for a in arch])        # (validations, edges, ops)
    cols = 5 if len(names) > 6 else 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.3 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    for e, name in enumerate(names):
        ax = axes[e // cols][e % cols]
        for k, op in enumerate(op_names):
            ax.plot(steps, w[:, e, k], color=OP_COLORS.get(op), label=op, lw=1.5, marker="." if len(steps) < 20 else None)
        ax.set_title(f"edge {name}", fontsize=9)
    for e in range(len(names), rows * cols):
        axes[e // cols][e % cols].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    what = "sampling probabilities" if last.get("sampled") else "op weights"
    fig.suptitle(f"{cell_type} cell: {what} of every edge over the search", y=0.99, fontsize=10)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(op_names), fontsize=8)
    top = 1.0 - 1.0 / fig.get_figheight()                   # room for the title and legend, in inches
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.6 / fig.get_figheight(), top=top, hspace=0.4,
                        wspace=0.12)                        # fixed margins: tight_layout took most of the time
    save(fig, path)
    return True


def _cost_rows(cost: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [("wall time", f"{cost['wall_s']:,.0f} s ({cost['wall_s'] / 3600:.2f} h)"),
            ("training steps timed", f"{cost['steps']:,}"),
            ("seconds per step", f"{cost['s_per_step']:.3f} (validation and checkpoints left out)"),
            ("images per second", f"{cost['images_per_s']:,.1f} (global batch / seconds per step)"),
            ("peak memory", f"{cost['peak_memory_gb']:.2f} GB"),
            ("device", f"{cost['device']} x {cost['device_count']}"),
            ("device-hours", f"{cost['device_hours']:.4f} ({cost['device_hours'] / 24:.5f} device-days)")]


def _benchmark(history: Mapping[str, list], path: Path) -> bool:
    """The benchmark's accuracy of the cell at each validation beside the supernet's own."""
    import matplotlib.pyplot as plt

    from search_spaces.plot import save

    val = history.get("validation", [])
    x, test = _series(val, "benchmark_test_accuracy")
    if not x:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(x, test, "o-", label="benchmark test accuracy of the cell")
    xv, valid = _series(val, "benchmark_valid_accuracy")
    if xv:
        ax.plot(xv, valid, "s--", label="benchmark validation accuracy of the cell")
    xs, supernet = _series(val, "val_accuracy")
    if xs:
        ax.plot(xs, [100 * a for a in supernet], "^:", label="supernet validation accuracy (this run)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("the searched cell, scored by the benchmark")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.9)     # fixed margins (tight_layout is slow)
    save(fig, path)
    return True


def _budget(history: Mapping[str, list], path: Path) -> bool:
    """The cell's cost and the expected cost at each validation against the target, and the
    multiplier the search adjusted."""
    import matplotlib.pyplot as plt

    from search_spaces.plot import save

    val = history.get("validation", [])
    x, cell = _series(val, "budget_cell")
    if not x:
        return False
    _, target = _series(val, "budget_target")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(x, cell, "o-", label="the cell the search holds")
    xe, expected = _series(val, "budget_expected")
    if xe:
        ax.plot(xe, expected, "s--", label="expected under the architecture weights")
    ax.axhline(target[-1], color="black", ls=":", label=f"target {target[-1]:.4g}")
    ax.set_xlabel("step")
    ax.set_ylabel("cost in the retrained network")
    ax.set_title("cost over the search")
    xm, multiplier = _series(val, "budget_multiplier")
    if xm:
        ax2 = ax.twinx()
        ax2.plot(xm, multiplier, "^-", color="gray", alpha=0.6, label="multiplier")
        ax2.set_ylabel("multiplier", color="gray")
    ax.legend(fontsize=8, loc="upper right")
    fig.subplots_adjust(left=0.12, right=0.88, bottom=0.13, top=0.9)
    save(fig, path)
    return True


def write_report(out_dir: Path, kind: str, history: Mapping[str, list], genotype: Optional[str],
                 cost: Mapping[str, Any], config_name: str, short_search: bool = False) -> Path:
    """Write ``report.html`` and its pictures into ``out_dir``; return the report's path."""
    from search_spaces.plot import cell_figure, save

    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str]] = []
    if _curves(history, out_dir / "curves.png"):
        images.append(("curves.png", "Training and validation curves"))
    if kind == "search" and _entropy(history, out_dir / "entropy.png"):
        images.append(("entropy.png", "Entropy of the architecture weights"))
    if kind == "search" and _benchmark(history, out_dir / "benchmark.png"):
        images.append(("benchmark.png", "The searched cell's accuracy in the benchmark"))
    if kind == "search" and _budget(history, out_dir / "budget.png"):
        images.append(("budget.png", "The cell's cost against the budget"))
    arch = history.get("arch", [])
    for ct in (arch[-1]["cells"] if arch else []):
        name = f"trajectories-{ct}.png"
        if _trajectories(arch, ct, out_dir / name):
            images.append((name, f"Weight trajectory of every edge ({ct} cell)"))
    if genotype:
        save(cell_figure(search_spaces.parse_genotype(genotype)), out_dir / "cell.png")
        images.append(("cell.png", "Final cell" if kind == "search" else "The cell this run trains"))
    last_val = history.get("validation", [])[-1] if history.get("validation") else {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(config_name)}: {kind} report"
             "</title><style>body{font-family:sans-serif;max-width:1150px;margin:auto}img{max-width:100%}"
             "td{padding:2px 10px}code{word-break:break-all}</style></head><body>",
             f"<h1>{html.escape(config_name)}: {kind} report</h1>"]
    if genotype:
        parts.append(f"<p>Genotype: <code>{html.escape(genotype)}</code></p>")
    if last_val:
        shown = {k: v for k, v in last_val.items() if k in ("step", "val_accuracy", "val_loss", "test_accuracy",
                                                            "arch_entropy", "arch_max_weight",
                                                            "benchmark_test_accuracy", "benchmark_valid_accuracy",
                                                            "budget_cell", "budget_target")}
        parts.append("<p>Last validation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in shown.items()) + "</p>")
    if kind == "search" and short_search:
        parts.append(f"<p><b>A short search.</b> {html.escape(SHORT_SEARCH_NOTE)}</p>")
    parts.append("<h2>Cost</h2><table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                                   for k, v in _cost_rows(cost)) + "</table>")
    for name, caption in images:
        if (out_dir / name).exists():
            parts.append(f"<h2>{html.escape(caption)}</h2><img src='{html.escape(name)}' alt='{html.escape(caption)}'>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    write_text(path, "\n".join(parts))
    return path
