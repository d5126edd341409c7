"""Command line:

* ``python -m search_spaces describe GENOTYPE [--space ...] [--init-channels C] [--layers L]
  [--classes K] [--plot cell.png|cell.svg]`` prints one JSON line describing the genotype's
  network and, with ``--plot``, draws its cells;
* ``python -m search_spaces lookup CELL --benchmark FILE [--dataset cifar10] [--epochs 200]``
  prints one JSON line with the benchmark's accuracy of a NAS-Bench-201 cell (an arch string,
  a search's genotype.json or a checkpoint directory holding one);
* ``python -m search_spaces profile --space darts --out table.json [--variant cifar]
  [--init-channels C] [--layers L] [--classes K] [--batch 1] [--precision fp32]
  [--device cpu] [--repeats 20] [--genotypes 20]`` measures a latency table of the target
  network (``search_spaces/latency.py``) for a search's ``budget: {metric: latency_ms}`` and
  prints one JSON line with its error against whole networks."""
from __future__ import annotations

import argparse
import json
import os
import sys

from nas_settings import ArgumentParser

from . import GenotypeError, count_macs, count_parameters, create_network, parse_genotype, space_names
from .cost import DEFAULT_TARGETS, TargetNetwork



def describe(args: argparse.Namespace) -> dict:
    for flag, value in (("--init-channels", args.init_channels), ("--layers", args.layers), ("--classes", args.classes)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".svg"):
        raise ValueError(f"--plot {args.plot!r}: the file name must end in .png or .svg")
    genotype = parse_genotype(args.genotype, args.space)
    if (genotype.space, args.variant) not in DEFAULT_TARGETS:
        raise ValueError(f"--variant {args.variant}: the {genotype.space} space has no such network")
    C_default, layers_default = DEFAULT_TARGETS[(genotype.space, args.variant)]
    C = args.init_channels if args.init_channels is not None else C_default
    layers = args.layers if args.layers is not None else layers_default
    net = create_network(genotype, C=C, layers=layers, num_classes=args.classes,
                         auxiliary=genotype.space == "darts", **({"variant": args.variant}
                                                                  if genotype.space == "darts" else {}))
    params = count_parameters(net)
    size = 224 if args.variant == "imagenet" else 32
    return {"space": genotype.space, "genotype": genotype.to_str(), "variant": args.variant, "init_channels": C,
            "layers": layers, "classes": args.classes, "params": params, "params_millions": round(params / 1e6, 3),
            "params_with_auxiliary": count_parameters(net, include_auxiliary=True),
            f"macs_{size}x{size}": count_macs(net, (1, 3, size, size))}


def plot(genotype_spec: str, space: str | None, path: str) -> None:
    from .plot import cell_figure, save

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--plot {path!r}: folder {parent} does not exist")
    save(cell_figure(parse_genotype(genotype_spec, space)), path)


def lookup(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from .nb201_benchmark import Benchmark, BenchmarkSettings

    spec = args.cell
    if Path(spec).is_dir() and (Path(spec) / "genotype.json").is_file():
        spec = str(Path(spec) / "genotype.json")
    genotype = parse_genotype(spec, "nas-bench-201")
    bench = Benchmark(BenchmarkSettings(file=str(Path(args.benchmark).resolve()), dataset=args.dataset,
                                        epochs=args.epochs))
    score = bench.score(genotype.to_str())
    return {"arch": score.arch, "dataset": args.dataset, "epochs": args.epochs, **score.metrics(),
            "file": str(bench.path), "format": bench.kind}


def profile(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from .latency import measure_table

    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--out {args.out}: give a file name in an existing folder")
    target = TargetNetwork.default(args.space, args.variant, args.classes, init_channels=args.init_channels,
                                   layers=args.layers)
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    table = measure_table(target, batch=args.batch, precision=args.precision, device=args.device,
                          warmup=args.warmup, repeats=args.repeats, rounds=args.rounds, genotypes=args.genotypes,
                          seed=args.seed, log=log)
    table.save(out)
    m = table.measured
    return {"table": str(out.resolve()), "network": target.describe(), "device": m["device"],
            "device_name": m["device_name"], "batch": m["batch"], "precision": m["precision"],
            "base_ms": round(table.base, 4), "cheapest_ms": round(table.cheapest()[0], 4),
            "mape_percent": m["error"]["mape_percent"], "max_percent": m["error"]["max_percent"],
            "genotypes": m["error"]["genotypes"]}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m search_spaces", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("describe", help="parameter count and multiply-adds of a genotype's network")
    p.add_argument("genotype", help="published name, genotype string, or path to a genotype JSON file")
    p.add_argument("--space", choices=space_names(), default=None,
                   help="require the genotype to belong to this search space")
    p.add_argument("--init-channels", type=int, default=None, help="C (default: 36 for darts, 16 for nas-bench-201)")
    p.add_argument("--layers", type=int, default=None,
                   help="cells (darts, default 20) or cells per stage (nas-bench-201, default 5)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--variant", choices=("cifar", "imagenet"), default="cifar",
                   help="darts: the CIFAR network (32 px) or the ImageNet one (stride-4 stem, 224 px; default C 48, "
                        "14 cells)")
    p.add_argument("--plot", default=None, metavar="FILE", help="draw the cells to FILE (.png or .svg)")
    q = sub.add_parser("lookup", help="the benchmark's accuracy of a NAS-Bench-201 cell")
    q.add_argument("cell", help="arch string (|nor_conv_3x3~0|+...), a genotype.json or a checkpoint directory")
    q.add_argument("--benchmark", required=True, metavar="FILE",
                   help="NATS-Bench topology -simple directory or .tar, NAS-Bench-201 .pth, or CSV")
    q.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 or ImageNet16-120")
    q.add_argument("--epochs", type=int, default=200, help="the benchmark's schedule: 200 or 12")
    r = sub.add_parser("profile", help="measure a latency table for a latency budget")
    r.add_argument("--space", choices=space_names(), required=True)
    r.add_argument("--out", required=True, metavar="FILE", help="where to write the table (JSON)")
    r.add_argument("--variant", choices=("cifar", "imagenet"), default="cifar",
                   help="darts: the network's stem and image size (cifar 32 px, imagenet 224 px)")
    r.add_argument("--init-channels", type=int, default=None,
                   help="C (default: the retraining protocol's: darts 36, or 48 for imagenet; nas-bench-201 16)")
    r.add_argument("--layers", type=int, default=None,
                   help="cells (darts, default 20, or 14 for imagenet) or cells per stage (nas-bench-201, default 5)")
    r.add_argument("--classes", type=int, default=10)
    r.add_argument("--batch", type=int, default=1, help="images per forward (default 1: one request)")
    r.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    r.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--repeats", type=int, default=10, help="timed runs per op and network per round (median kept)")
    r.add_argument("--rounds", type=int, default=3,
                   help="rounds timing every op and network once each (the median over rounds is kept)")
    r.add_argument("--genotypes", type=int, default=20, help="random cells whose whole networks check the model")
    r.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            print(json.dumps(profile(args)))
            return 0
        if args.command == "lookup":
            print(json.dumps(lookup(args)))
            return 0
        out = describe(args)
        if args.plot:
            plot(args.genotype, args.space, args.plot)
            out["plot"] = os.path.abspath(args.plot)
        print(json.dumps(out))
    except (GenotypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
