"""GAEA against first-order DARTS, GDAS and random search with weight sharing on the same
data, budget and seeds: ``experiments/ablation-nb201.yaml`` run locally, each method and seed
in its own process, one JSON line per run.

    python benchmarks/compare.py --preset cpu      # 43 minutes on 2 cores (NB201 C=8, 1 cell per stage)
    python benchmarks/compare.py --preset paper    # the ablation YAML as it is (a GPU's job)

Each line holds, for every epoch (one validation and one checkpoint each), the genotype, the
entropy of the architecture weights, the share of skip connections and of pooling among the
cell's edges, the supernet's validation accuracy (random search: its best candidate's) and
the wall time, then the run's totals. ``--table`` prints a markdown summary of a results file.
With ``--benchmark FILE`` (a NATS-Bench topology directory or archive, a NAS-Bench-201 .pth or a
CSV; ``--set benchmark.dataset=cifar100`` and ``benchmark.epochs=12`` choose what is read), each
epoch also holds the benchmark's test and validation accuracy of its cell, and the table the
final cell's benchmark test accuracy: the figure search methods are compared by.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ROOT / "experiments" / "ablation-nb201.yaml"
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
PRESETS = {
    # the same optimizer settings as the ablation YAML; a smaller supernet, 8,000 images
    # (4,000 per half), 10 epochs; random search scores 50 candidates on 4 batches
    "cpu": ["space_args.C=8", "space_args.layers=1", "epochs=10", "data.subset=8000",
            "optimizer_args.random.candidates=50", "optimizer_args.random.eval_batches=4"],
    "paper": [],
}
METHODS = ("gaea", "darts", "gdas", "random")
POOLS = ("avg_pool_3x3", "max_pool_3x3")


def cell_shares(genotype: str) -> dict[str, float]:
    from search_spaces import parse_genotype

    g = parse_genotype(genotype)
    ops = [op for op, _ in (g.normal + g.reduce if g.space == "darts" else g.edges)]
    return {"skip_share": ops.count("skip_connect") / len(ops),
            "pool_share": sum(ops.count(p) for p in POOLS) / len(ops),
            "none_share": ops.count("none") / len(ops)}


def read_run(output: Path) -> list[dict]:
    """Per checkpoint (epoch), what its genotype.json says, in step order."""
    rows = []
    for path in (output / "determined").glob("*/genotype.json"):
        d = json.loads(path.read_text())
        m = d.get("metrics", {})
        bench = d.get("benchmark") or {}
        rows.append({"epoch": d["epoch"], "step": d["step"], "genotype": d["genotype"],
                     "arch_entropy": m.get("arch_entropy"), "val_accuracy": m.get("val_accuracy"),
                     "wall_s": d.get("cost", {}).get("wall_s"), "warmup": bool(d.get("warmup")),
                     "benchmark_test_accuracy": bench.get("benchmark_test_accuracy"),
                     "benchmark_valid_accuracy": bench.get("benchmark_valid_accuracy"), **cell_shares(d["genotype"])})
    return sorted(rows, key=lambda r: r["step"])


def run_one(method: str, seed: int, preset: list[str], extra: list[str], out_root: Path, data_root: Path) -> dict:
    output = out_root / f"{method}-seed{seed}"
    sets = [f"optimizer={method}", f"seed={seed}", f"data.root={data_root}", "data.num_workers=0", *preset, *extra]
    cmd = [sys.executable, str(ROOT / "model_def.py"), str(BASE), "--output", str(output)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.monotonic() - t0
    (output / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (output / "log.txt").write_text(proc.stdout + proc.stderr)
    epochs = read_run(output) if proc.returncode == 0 else []
    last = epochs[-1] if epochs else {}
    return {"method": method, "seed": seed, "returncode": proc.returncode, "process_wall_s": round(wall, 1),
            "settings": sets, "epochs": epochs, "final_genotype": last.get("genotype"),
            "final_val_accuracy": last.get("val_accuracy"), "final_entropy": last.get("arch_entropy"),
            "final_skip_share": last.get("skip_share"), "final_pool_share": last.get("pool_share"),
            "final_benchmark_test_accuracy": last.get("benchmark_test_accuracy")}


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.fmean(values)
    return f"{m:.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def table(results: list[dict]) -> str:
    """Markdown: per method, final metrics (mean ± sd over seeds) and skip share by epoch."""
    bench = any(r.get("final_benchmark_test_accuracy") is not None for r in results)
    lines = ["| method | seeds | val acc (supernet) | " + ("benchmark test acc (%) | " if bench else "") +
             "entropy | skip share | pool share | none share | skip share by epoch | s/run |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if bench else "")]
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method and r["returncode"] == 0]
        if not runs:
            continue
        n_epochs = min(len(r["epochs"]) for r in runs)
        by_epoch = " ".join(f"{statistics.fmean(r['epochs'][e]['skip_share'] for r in runs):.2f}"
                            for e in range(n_epochs))
        bench_cell = f"{_mean(r.get('final_benchmark_test_accuracy') for r in runs)} | " if bench else ""
        lines.append(f"| {method} | {len(runs)} | {_mean(r['final_val_accuracy'] for r in runs)} | {bench_cell}"
                     f"{_mean(r['final_entropy'] for r in runs)} | {_mean(r['final_skip_share'] for r in runs)} | "
                     f"{_mean(r['final_pool_share'] for r in runs)} | "
                     f"{_mean(r['epochs'][-1]['none_share'] for r in runs)} | {by_epoch} | "
                     f"{_mean(r['process_wall_s'] for r in runs)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="more overrides for every run (as model_def.py's --set)")
    p.add_argument("--data", default=str(DATA), help="the CIFAR-10 JPEG folder (default ../shared/data/cifar10-jpeg)")
    p.add_argument("--output", default=str(ROOT / "runs" / "compare"), help="run directories go here")
    p.add_argument("--results", default=None, help="JSON lines file (default <output>/results.jsonl)")
    p.add_argument("--table", default=None, metavar="RESULTS", help="print the markdown table of a results file")
    p.add_argument("--benchmark", default=None, metavar="FILE",
                   help="score each epoch's cell with this NAS-Bench-201 / NATS-Bench file or CSV")
    args = p.parse_args(argv)
    if args.table:
        results = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print(table(results))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"error: unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    if not Path(args.data).exists():
        print(f"error: data folder {args.data} does not exist; pass --data", file=sys.stderr)
        return 2
    extra = list(args.extra)
    if args.benchmark:
        if not Path(args.benchmark).exists():
            print(f"error: benchmark file {args.benchmark} does not exist", file=sys.stderr)
            return 2
        extra.append(f"benchmark.file={Path(args.benchmark).resolve()}")
    out_root = Path(args.output).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results) if args.results else out_root / "results.jsonl"
    results = []
    for seed in seeds:                  # seed-major: a stopped benchmark still compares the methods
        for method in methods:
            r = run_one(method, seed, PRESETS[args.preset], extra, out_root, Path(args.data).resolve())
            r["preset"] = args.preset
            results.append(r)
            line = json.dumps(r)
            print(line, flush=True)
            with results_path.open("a") as f:
                f.write(line + "\n")
    print(table(results))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
