"""Searches under a budget on real data (the issue's "must show"): for each case an
unconstrained search, then the same search (same seed, data and steps) with a target at
``--fraction`` of the unconstrained cell's cost in the retrained network.

    .venv/bin/python benchmarks/bench_budget.py                      # all three, ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_budget.py --cases nb201-macs --out /tmp/budget

Cases: ``pcdarts-params`` (PC-DARTS space, parameters at C=36/20 cells), ``nb201-macs``
(NAS-Bench-201, multiply-adds at C=16/N=5), ``nb201-latency`` (NAS-Bench-201, a latency table
measured here first: ``python -m search_spaces profile``; the found cell's network is then
timed too). Each search is the quick start's (``experiments/quickstart.yaml``: CIFAR-10 from
``../shared``, 2000 images, 4 epochs, GAEA, one epoch of weights-only warm-up); the
NAS-Bench-201 cases swap in that space with C 8, 2 cells per stage.

One JSON line per case: the unconstrained cell's cost, the target, the budgeted cell's cost,
the genotype rule's cell before repair, whether the cell is within the target and by how much,
both searches' final validation accuracy and seconds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("pcdarts-params", "nb201-macs", "nb201-latency")


def _config(out: Path, space: str) -> Path:
    config = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    config["data"]["root"] = str((ROOT / config["data"]["root"]).resolve())
    config["data"]["cache_dir"] = str((ROOT / config["data"]["cache_dir"]).resolve())
    if space == "nas-bench-201":
        config["hyperparameters"].update(space="nas-bench-201", space_args={"C": 8, "layers": 2})
    path = out / f"{space}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _search(config: Path, output: Path, *sets: str) -> tuple[dict, float]:
    """Run one search; its last genotype.json and the seconds it took."""
    if not (output / "determined").exists():
        t0 = time.time()
        cmd = [sys.executable, str(ROOT / "model_def.py"), str(config), "--output", str(output)]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"search failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        (output / "seconds").write_text(str(time.time() - t0))
    last = max((json.loads(p.read_text()) for p in (output / "determined").glob("*/genotype.json")),
               key=lambda g: g["step"])
    return last, float((output / "seconds").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--fraction", type=float, default=0.6, help="target as a fraction of the unconstrained cell's cost")
    p.add_argument("--out", default="/tmp/bench_budget", help="searches and tables go here (reused when present)")
    args = p.parse_args()
    import search_spaces
    from search_spaces.cost import CostTable, TargetNetwork, count_table
    from search_spaces.latency import measure_network, measure_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        space = "darts" if case.startswith("pcdarts") else "nas-bench-201"
        metric = case.split("-")[1].replace("latency", "latency_ms")
        config = _config(out, space)
        free, free_s = _search(config, out / f"{space}-free")
        target_net = TargetNetwork.default(space)
        sets = []
        if metric == "latency_ms":
            table_path = out / f"latency-{space}.json"
            if not table_path.exists():
                measure_table(target_net).save(table_path)
            table = CostTable.load(table_path)
            sets.append(f"budget.table={table_path}")
        else:
            table = count_table(target_net, metric)
        free_cell = search_spaces.parse_genotype(free["genotype"])
        target = args.fraction * table.cost(free_cell)
        budget, budget_s = _search(config, out / f"{case}-{args.fraction}", f"budget.metric={metric}",
                                   f"budget.target={target!r}", *sets)
        record = budget["budget"]
        line = {"case": case, "network": target_net.describe(), "metric": metric, "fraction": args.fraction,
                "free_cell": table.cost(free_cell), "target": target, "cell": record["cell"],
                "rule_cell": record["rule_cell"], "repaired": record["repaired"], "within": record["within"],
                "cell_over_target_percent": round(100 * (record["cell"] / target - 1), 2),
                "free_val_accuracy": free["metrics"].get("val_accuracy"),
                "budget_val_accuracy": budget["metrics"].get("val_accuracy"), "steps": budget["step"],
                "free_s": round(free_s, 1), "budget_s": round(budget_s, 1),
                "free_genotype": free["genotype"], "genotype": budget["genotype"]}
        if metric == "latency_ms":
            cell = search_spaces.parse_genotype(budget["genotype"])
            line["cell_measured_ms"] = round(measure_network(target_net, cell), 3)
            line["free_cell_measured_ms"] = round(measure_network(target_net, free_cell), 3)
            line["table_mape_percent"] = table.measured["error"]["mape_percent"]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
