"""``python -m nas_trial candidates SOURCE... --top K --base BASE.yaml --output OUT.yaml``"""
from __future__ import annotations

import sys

COMMANDS = ("candidates",)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m nas_trial {{{','.join(COMMANDS)}}} ...; "
              "e.g. python -m nas_trial candidates runs/a runs/b --top 3 --base experiments/retrain-darts-asha.yaml "
              "--output candidates.yaml", file=sys.stderr)
        return 2
    from .candidates import main as candidates

    return candidates(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
