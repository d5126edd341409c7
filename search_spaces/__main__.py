"""Command line: ``python -m search_spaces describe GENOTYPE [--space ...] [--init-channels C]
[--layers L] [--classes K]`` prints one JSON line describing the genotype's network."""
from __future__ import annotations

import argparse
import json
import sys

from . import GenotypeError, count_macs, count_parameters, create_network, parse_genotype, space_names

DEFAULTS = {"darts": {"C": 36, "layers": 20}, "nas-bench-201": {"C": 16, "layers": 5}}


def describe(args: argparse.Namespace) -> dict:
    genotype = parse_genotype(args.genotype, args.space)
    d = DEFAULTS[genotype.space]
    C = args.init_channels or d["C"]
    layers = args.layers or d["layers"]
    net = create_network(genotype, C=C, layers=layers, num_classes=args.classes,
                         auxiliary=genotype.space == "darts")
    params = count_parameters(net)
    return {"space": genotype.space, "genotype": genotype.to_str(), "init_channels": C, "layers": layers,
            "classes": args.classes, "params": params, "params_millions": round(params / 1e6, 3),
            "params_with_auxiliary": count_parameters(net, include_auxiliary=True),
            "macs_32x32": count_macs(net, (1, 3, 32, 32))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search_spaces", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("describe", help="parameter count and multiply-adds of a genotype's network")
    p.add_argument("genotype", help="published name, genotype string, or path to a genotype JSON file")
    p.add_argument("--space", choices=space_names(), default=None,
                   help="require the genotype to belong to this search space")
    p.add_argument("--init-channels", type=int, default=None, help="C (default: 36 for darts, 16 for nas-bench-201)")
    p.add_argument("--layers", type=int, default=None,
                   help="cells (darts, default 20) or cells per stage (nas-bench-201, default 5)")
    p.add_argument("--classes", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        print(json.dumps(describe(args)))
    except (GenotypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
