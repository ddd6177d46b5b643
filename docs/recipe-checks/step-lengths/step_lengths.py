"""Accuracy change per round against the length of the round's trust-region step, from cells that record it.

Why: the half-budget gap (issue 30) is mostly accepted steps that cost accuracy; if long steps were where they
happen, a cap on the trust radius would be the setting to measure. Reads ``trust_region_by_round`` (cells since
``ca8ab62``) and the accuracy after each scored round; a round counts where it and the round before were scored.

    python docs/recipe-checks/step-lengths/step_lengths.py docs/report/*/label-only/cells/ifedicl__*.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

LENGTHS = ((0.99, "under 1"), (1.99, "1 to 2"), (3.99, "2 to 4"), (float("inf"), "4 or more"))
EARLY_ROUNDS = 4  # the rounds within about half of FedAvg-LoRA's client CPU


def main(paths: list[str]) -> None:
    changes: dict[tuple[str, str], list[float]] = defaultdict(list)
    for path in paths:
        cell = json.loads(Path(path).read_text())
        accuracy = {r["round"]: 100 * r["accuracy"] for r in cell["per_round"]}
        for step in cell.get("trust_region_by_round") or []:
            rnd = step["round"]
            if rnd not in accuracy or rnd - 1 not in accuracy:
                continue
            change = accuracy[rnd] - accuracy[rnd - 1]
            length = next(name for bound, name in LENGTHS if step["step"] < bound)
            changes[(length, f"rounds 1-{EARLY_ROUNDS}" if rnd <= EARLY_ROUNDS else "later")].append(change)
            if change < -3:
                print(json.dumps({"cell": path, "round": rnd, "step": step["step"], "change": round(change, 1)}))
    for (length, rounds), values in sorted(changes.items()):
        mean = sum(values) / len(values)
        print(f"step {length:>9}, {rounds:>10}: {len(values):>3} rounds, mean {mean:+.2f}, worst {min(values):+.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
