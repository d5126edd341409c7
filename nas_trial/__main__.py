"""``python -m nas_trial candidates SOURCE... --top K --base BASE.yaml --output OUT.yaml``
``python -m nas_trial export SOURCE --format onnx|torchscript --output DIR``"""
from __future__ import annotations

import sys

COMMANDS = ("candidates", "export")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m nas_trial {{{','.join(COMMANDS)}}} ...; "
              "e.g. python -m nas_trial candidates runs/a runs/b --top 3 --base experiments/retrain-darts-asha.yaml "
              "--output candidates.yaml, or python -m nas_trial export runs/retrain --format onnx --output "
              "exported/", file=sys.stderr)
        return 2
    if argv[0] == "export":
        from .export import main as export
        return export(argv[1:])
    from .candidates import main as candidates

    return candidates(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
