"""From several searches to one retraining experiment: collect the genotypes that searches
wrote (``genotype.json`` beside each checkpoint), keep the best ``K`` distinct ones, and write
a retraining YAML whose ``genotype`` hyperparameter is a categorical over them.

    python -m nas_trial candidates SOURCE... --top K --base BASE.yaml --output OUT.yaml [--pick best|final]
        [--max-params N] [--max-macs N] [--max-latency-ms N --latency-table FILE] [--front FIG.png]

A SOURCE is a ``genotype.json``, a checkpoint directory, a local run's ``--output`` directory or
a directory of downloaded checkpoints (``det checkpoint download``): every ``genotype.json``
below it counts. Candidates are ranked by the search's own validation accuracy at that
checkpoint (the supernet's, under the architecture weights it had); ``--pick final`` takes only
each run's last checkpoint instead. The written YAML is self-contained (genotype strings, not
paths) and differs from BASE only in ``hyperparameters.genotype``, ``hyperparameters.candidates``
(where each came from, reported by the retraining as metrics) and ``description``.

Budgets: ``--max-params`` / ``--max-macs`` drop cells whose network, as BASE retrains it,
counts more; ``--max-latency-ms`` those a latency table (``python -m search_spaces profile``,
of that network) predicts slower. ``--front`` draws every cell's search accuracy against its
cost.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from nas_settings import ArgumentParser
from search_spaces import Genotype, GenotypeError
from search_spaces.genotypes import genotype_from_json

from .asha import plan as asha_plan

GENOTYPE_FILE = "genotype.json"
PICKS = ("best", "final")


class CandidatesError(ValueError):
    """A source, base config or option that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Found:
    """One ``genotype.json``: the genotype and where it came from."""
    genotype: Genotype
    path: Path
    run: str                       # the search run: a local output directory, or "experiment E trial T"
    checkpoint: str                # checkpoint directory name (its UUID)
    step: Optional[int]
    seed: Optional[int]
    optimizer: Optional[str]
    search_accuracy: Optional[float]   # the search's val_accuracy at that checkpoint
    benchmark_test_accuracy: Optional[float] = None   # NAS-Bench-201: the benchmark's test accuracy (%) of the cell
    warmup: bool = False              # written in the weights-only warm-up: the argmax of a tie, no candidate
    budget: Optional[dict] = None     # the search's budget record: metric, target, cell (its cost), within

    @property
    def key(self) -> str:
        """Equal for equal architectures (DARTS node inputs in any order)."""
        return self.genotype.canonical().to_str()

    def provenance(self, rank: int) -> dict[str, Any]:
        out = {"rank": rank, "genotype": self.genotype.to_str(), "run": self.run, "checkpoint": self.checkpoint,
               "step": self.step, "seed": self.seed, "optimizer": self.optimizer,
               "search_accuracy": self.search_accuracy, "benchmark_test_accuracy": self.benchmark_test_accuracy}
        if self.budget is not None:
            out.update({f"budget_{k}": self.budget.get(k) for k in ("metric", "target", "cell")})
        return {k: v for k, v in out.items() if v is not None}


def _run_of(path: Path, data: dict[str, Any]) -> str:
    if isinstance(data.get("run"), str) and data["run"]:
        return data["run"]
    ckpt = path.parent
    # a local run keeps its checkpoints as <output>/determined/<uuid>/
    return str(ckpt.parent.parent) if ckpt.parent.name == "determined" else str(ckpt)


def read_genotype_file(path: Path) -> Found:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CandidatesError(f"{path} is not a readable genotype.json ({e}); remove it or pass other sources") from None
    if not isinstance(data, dict) or "genotype" not in data:
        raise CandidatesError(f"{path} has no 'genotype' entry: it is not a genotype.json written by a search")
    try:
        genotype = genotype_from_json(data)
    except GenotypeError as e:
        raise CandidatesError(f"{path}: {e}") from None
    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    accuracy = metrics.get("val_accuracy")
    accuracy = float(accuracy) if isinstance(accuracy, (int, float)) and math.isfinite(accuracy) else None
    step = data.get("step")
    bench = (data.get("benchmark") or {}).get("benchmark_test_accuracy")
    return Found(genotype=genotype, path=path, run=_run_of(path, data), checkpoint=path.parent.name,
                 step=int(step) if isinstance(step, int) else None,
                 seed=data.get("seed") if isinstance(data.get("seed"), int) else None,
                 optimizer=data.get("optimizer") if isinstance(data.get("optimizer"), str) else None,
                 search_accuracy=accuracy, benchmark_test_accuracy=float(bench) if isinstance(bench, (int, float))
                 else None, warmup=bool(data.get("warmup")),
                 budget=data["budget"] if isinstance(data.get("budget"), dict) else None)


def collect(sources: Sequence[str]) -> list[Found]:
    """Every ``genotype.json`` named by or below the sources, each file once."""
    found, seen = [], set()
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob(GENOTYPE_FILE))
            if not files:
                raise CandidatesError(f"{source}: no {GENOTYPE_FILE} below this directory; pass a search's "
                                      "output directory, checkpoint directory or genotype.json")
        else:
            raise CandidatesError(f"{source} does not exist; pass a search's output directory, checkpoint "
                                  "directory or genotype.json")
        for f in files:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                found.append(read_genotype_file(f))
    found = [f for f in found if not f.warmup]          # the argmax of untouched weights is no candidate
    if not found:
        raise CandidatesError(f"every genotype.json under {', '.join(sources)} was written during the weights-only "
                              "warm-up (arch_warmup_epochs), before the architecture moved; pass finished searches")
    spaces = sorted({f.genotype.space for f in found})
    if len(spaces) > 1:
        examples = ", ".join(f"{next(f.path for f in found if f.genotype.space == s)} ({s})" for s in spaces)
        raise CandidatesError(f"the sources mix search spaces: {examples}; build candidates for one space at a time")
    return found


def _score(f: Found) -> tuple:
    """Sort key: known accuracy first, higher first, then the later checkpoint."""
    return (f.search_accuracy is None, -(f.search_accuracy or 0.0), -(f.step or 0))


def rank(found: Sequence[Found], top: int, pick: str = "best") -> list[Found]:
    """The ``top`` best distinct genotypes. ``pick="final"``: each run's last checkpoint only."""
    if top < 1:
        raise CandidatesError(f"--top must be >= 1, got {top}")
    if pick not in PICKS:
        raise CandidatesError(f"--pick must be one of {', '.join(PICKS)}, got {pick!r}")
    pool = list(found)
    if pick == "final":
        last: dict[str, Found] = {}
        for f in pool:
            if f.run not in last or (f.step or 0) > (last[f.run].step or 0):
                last[f.run] = f
        pool = list(last.values())
    chosen, keys = [], set()
    for f in sorted(pool, key=_score):
        if f.key not in keys:
            keys.add(f.key)
            chosen.append(f)
    return chosen[:top]


def within_budgets(found: Sequence[Found], base: dict[str, Any], limits: dict[str, float],
                   latency_table: Optional[str] = None) -> list[Found]:
    """The cells whose cost in BASE's network meets every limit (metric -> largest value)."""
    from search_spaces.cost import CostError, CostTable

    table = None
    if "latency_ms" in limits:
        try:
            table = CostTable.load(latency_table)
        except CostError as e:
            raise CandidatesError(f"--latency-table: {e}") from None
    kept = []
    for f in found:
        if table is not None:
            wanted = _target_network(f.genotype, base)
            if table.network != wanted:
                raise CandidatesError(f"--latency-table {latency_table} was measured on {table.network.describe()}, "
                                      f"BASE retrains {wanted.describe()}; profile that network")
        if all((table.cost(f.genotype) if metric == "latency_ms" else _cost(f.genotype, base, metric)) <= limit
               for metric, limit in limits.items()):
            kept.append(f)
    if not kept:
        raise CandidatesError("no cell meets the limits: every one is over " + ", ".join(
            f"{m} {v:g}" for m, v in limits.items()) + "; raise them, or search under a budget "
            "(hyperparameters.budget)")
    return kept


def _target_network(genotype: Genotype, base: dict[str, Any]):
    """The network BASE retrains ``genotype`` in (its init_channels, layers and variant, or the
    protocol's), for counting."""
    from search_spaces.cost import TargetNetwork

    from .runner import pick_hparams

    hp = pick_hparams(base.get("hyperparameters") or {})
    variant = hp.get("variant") or "cifar"
    return TargetNetwork.default(genotype.space, variant, int(hp.get("num_classes") or 10),
                                 init_channels=hp.get("init_channels"), layers=hp.get("layers"),
                                 **({"nodes": genotype.nodes, "multiplier": len(genotype.normal_concat)}
                                    if genotype.space == "darts" else {}))


def _cost(genotype: Genotype, base: dict[str, Any], metric: str) -> float:
    from search_spaces.cost import genotype_cost

    return float(genotype_cost(_target_network(genotype, base), genotype, metric))


def front_figure(found: Sequence[Found], chosen: Sequence[Found], base: dict[str, Any], path: Path) -> None:
    """Search accuracy against cost for every cell found, the chosen ones marked: the
    accuracy/cost front the budgets traced. Cost: the searches' budget metric when they all
    share one, else parameters counted in BASE's network."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from search_spaces.plot import save

    metrics = {f.budget.get("metric") if f.budget else None for f in found}
    metric = metrics.pop() if len(metrics) == 1 and None not in metrics else "params"
    shared = metric != "params" or all(f.budget and f.budget.get("metric") == "params" for f in found)

    def cost(f: Found) -> float:
        return float(f.budget["cell"]) if shared and f.budget else _cost(f.genotype, base, metric)

    keys = {f.key for f in chosen}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for picked, style, label in ((False, "o", "cell found"), (True, "*", "candidate retrained")):
        pts = [(cost(f), f.search_accuracy) for f in found if (f.key in keys) == picked
               and f.search_accuracy is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=style, s=90 if picked else 30, label=label)
    for t in sorted({float(f.budget["target"]) for f in found if f.budget and f.budget.get("metric") == metric}):
        ax.axvline(t, color="gray", ls=":", lw=0.8)
    ax.set_xlabel(f"{metric} of the cell's network" + (" (dotted: the searches' targets)" if shared else ""))
    ax.set_ylabel("search validation accuracy")
    ax.set_title("accuracy against cost, per cell")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.9)
    save(fig, path)


def _load_base(path: str) -> dict[str, Any]:
    from .runner import load_config

    try:
        config = load_config(path)
    except ValueError as e:
        raise CandidatesError(f"--base: {e}") from None
    hp = config["hyperparameters"]
    if "genotype" not in hp:
        raise CandidatesError(f"--base {path} is not a retraining (no 'genotype' hyperparameter); use a retrain-*.yaml "
                              "such as experiments/retrain-darts-asha.yaml or experiments/retrain-nb201-asha.yaml")
    searcher = config.get("searcher") or {}
    if searcher.get("name") == "single":
        raise CandidatesError(f"--base {path} uses the 'single' searcher, which would train one sampled candidate; "
                              "use an adaptive_asha (or grid, random) base such as experiments/retrain-nb201-asha.yaml")
    return config


def _base_space(hp: dict[str, Any]) -> Optional[str]:
    space = hp.get("space")
    if isinstance(space, dict):
        space = space.get("val")
    return space if isinstance(space, str) else None


def trials_note(searcher: dict[str, Any], k: int) -> str:
    """How the searcher spreads its trials over ``k`` candidates."""
    name = searcher.get("name")
    if name in ("adaptive_asha", "random"):
        n = asha_plan(searcher).trials if name == "adaptive_asha" else int(searcher.get("max_trials") or 0)
        missed = (1 - 1 / k) ** n if n else 1.0
        return (f"The master samples the genotype uniformly per trial: ~{n / k:.1f} of the {n} trials per candidate; "
                f"a candidate gets no trial with probability {missed:.2g}.")
    if name == "grid":
        return "The grid trains every candidate with every combination of the other grid values."
    return f"Searcher {name!r}."


def build(found: Sequence[Found], chosen: Sequence[Found], base: dict[str, Any], base_path: str,
          pick: str) -> tuple[dict[str, Any], str]:
    """The candidates experiment (a copy of ``base``) and its header comment."""
    space = chosen[0].genotype.space
    hp = base["hyperparameters"]
    if _base_space(hp) not in (None, space):
        raise CandidatesError(f"--base {base_path} retrains the {_base_space(hp)} space but the candidates are "
                              f"{space} genotypes; use a {space} base (e.g. experiments/retrain-"
                              f"{'nb201' if space == 'nas-bench-201' else 'darts'}-asha.yaml)")
    config = json.loads(json.dumps(base))       # deep copy, plain types
    provenance = [f.provenance(i) for i, f in enumerate(chosen, 1)]
    config["hyperparameters"]["genotype"] = {"type": "categorical", "vals": [f.genotype.to_str() for f in chosen]}
    config["hyperparameters"]["candidates"] = {"type": "const", "val": provenance}
    how = ("each run's last checkpoint, ranked by its validation accuracy" if pick == "final" else
           "every checkpoint, ranked by the search's own validation accuracy at that checkpoint")
    lines = [f"{len(chosen)} candidate {space} cells from {len(found)} genotype.json file(s) "
             f"({len({f.run for f in found})} run(s)), distinct genotypes only, from {how}:"]
    for p in provenance:
        acc = f"{p['search_accuracy']:.4f}" if "search_accuracy" in p else "unknown"
        if "benchmark_test_accuracy" in p:
            acc += f", benchmark test accuracy {p['benchmark_test_accuracy']:.2f}%"
        if "budget_cell" in p:
            acc += f"; {p['budget_metric']} {p['budget_cell']:.4g} (budget {p['budget_target']:.4g})"
        lines.append(f"  {p['rank']}. search val_accuracy {acc}; run {p['run']}, checkpoint {p['checkpoint']}, "
                     f"step {p.get('step', '?')}, seed {p.get('seed', '?')}, optimizer {p.get('optimizer', '?')}")
    lines.append(f"Retraining: {base_path} with hyperparameters.genotype over these cells.")
    config["description"] = "\n".join(lines)
    header = [f"Generated by: python -m nas_trial candidates (base {base_path}).", *lines,
              trials_note(config.get("searcher") or {}, len(chosen))]
    comment = "\n".join("# " + line for line in header)
    if (config.get("searcher") or {}).get("name") == "adaptive_asha":
        comment += "\n" + asha_plan(config["searcher"]).comment()
    return config, comment


def write(config: dict[str, Any], comment: str, output: Path) -> None:
    from .state import write_text

    text = comment + "\n" + yaml.safe_dump(config, sort_keys=False, width=1000)
    write_text(output, text)


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m nas_trial candidates",
                                description="Build one retraining experiment over the best distinct genotypes "
                                            "of several searches.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="genotype.json, checkpoint directory, run output directory or folder of downloaded checkpoints")
    p.add_argument("--top", type=int, required=True, help="how many distinct genotypes to keep")
    p.add_argument("--base", required=True, help="retraining experiment to copy (e.g. experiments/retrain-darts-asha.yaml)")
    p.add_argument("--output", required=True, help="the YAML to write")
    p.add_argument("--pick", choices=PICKS, default="best",
                   help="best: rank every checkpoint by its validation accuracy (default); final: each run's last "
                        "checkpoint only")
    p.add_argument("--max-params", type=float, default=None, metavar="N",
                   help="drop cells whose network, as BASE retrains it, has more parameters")
    p.add_argument("--max-macs", type=float, default=None, metavar="N",
                   help="drop cells whose network, as BASE retrains it, has more multiply-adds")
    p.add_argument("--max-latency-ms", type=float, default=None, metavar="N",
                   help="drop cells that --latency-table predicts slower (its network must be BASE's)")
    p.add_argument("--latency-table", default=None, metavar="FILE",
                   help="a table from `python -m search_spaces profile`, for --max-latency-ms")
    p.add_argument("--front", default=None, metavar="FIG.png",
                   help="draw every cell's search accuracy against its cost, the chosen ones marked")
    args = p.parse_args(argv)
    try:
        output = Path(args.output).expanduser()
        if output.is_dir():
            raise CandidatesError(f"--output {args.output} is a directory; name the YAML file to write")
        if not output.parent.is_dir():
            raise CandidatesError(f"--output {args.output}: folder {output.parent} does not exist")
        limits = {}
        for flag, metric, value in (("--max-params", "params", args.max_params), ("--max-macs", "macs", args.max_macs),
                                    ("--max-latency-ms", "latency_ms", args.max_latency_ms)):
            if value is not None:
                if not value > 0:
                    raise CandidatesError(f"{flag} must be > 0, got {value:g}")
                limits[metric] = value
        if (args.max_latency_ms is None) != (args.latency_table is None):
            raise CandidatesError("--max-latency-ms and --latency-table go together")
        front = Path(args.front).expanduser() if args.front else None
        if front is not None and (front.suffix.lower() not in (".png", ".svg") or not front.parent.is_dir()):
            raise CandidatesError(f"--front {args.front}: give a .png or .svg file in an existing folder")
        base = _load_base(args.base)
        found = collect(args.sources)
        kept = within_budgets(found, base, limits, args.latency_table) if limits else found
        chosen = rank(kept, args.top, args.pick)
        config, comment = build(found, chosen, base, args.base, args.pick)
        write(config, comment, output)
        if front is not None:
            front_figure(found, chosen, base, front)
    except CandidatesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(comment)
    if len(chosen) < args.top:
        print(f"# only {len(chosen)} distinct genotype(s) found, fewer than --top {args.top}")
    print(f"wrote {output}")
    print(f"run it: det experiment create {output} .")
    return 0
