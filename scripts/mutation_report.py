"""Summarises the last mutmut run (scripts/mutation.sh): mutants per module and status, the kill rate over
non-equivalent mutants, and every survivor that docs/mutation.md does not explain.

    python scripts/mutation_report.py [--only mutants/sample.txt] [--json results/mutation.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPLAINED = ROOT / "docs" / "mutation.md"
# mutmut's statuses: a mutant is caught when its tests fail or time out
CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}
NOT_CAUGHT = {"survived", "no tests", "suspicious"}


def mutmut_results() -> dict[str, str]:
    """{mutant name: status} for every mutant of the last run."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    results = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if match:
            results[match.group(1)] = match.group(2).strip()
    if not results:
        raise SystemExit("no mutmut results: run `bash scripts/mutation.sh` first")
    return results


def explained_survivors() -> dict[str, str]:
    """{mutant name: reason} from the lines "- `NAME`: reason" of docs/mutation.md."""
    reasons = {}
    if not EXPLAINED.exists():
        return reasons
    for line in EXPLAINED.read_text().splitlines():
        match = re.match(r"\s*- `(\S+__mutmut_\d+)`:? (.+)$", line)
        if match:
            reasons[match.group(1)] = match.group(2)
    return reasons


def module_of(name: str) -> str:
    return name.split(".x")[0] if ".x" in name else name.rsplit(".", 1)[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="a file of mutant names (one per line): report just these (the run's sample)")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    results, reasons = mutmut_results(), explained_survivors()
    if args.only:
        wanted = set(Path(args.only).read_text().split())
        results = {name: status for name, status in results.items() if name in wanted}
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unexplained = []
    for name, status in sorted(results.items()):
        row = table[module_of(name)]
        row["mutants"] += 1
        if status in CAUGHT:
            row["caught"] += 1
        elif status in NOT_CAUGHT and name in reasons:
            row["equivalent or not worth a test"] += 1
        elif status in NOT_CAUGHT:
            row["not caught, unexplained"] += 1
            unexplained.append((name, status))
        else:
            row[status] += 1  # e.g. "not checked": the run did not finish
    total = sum(table.values(), collections.Counter())
    columns = ["mutants", "caught", "equivalent or not worth a test", "not caught, unexplained"]
    headers = {"equivalent or not worth a test": "explained", "not caught, unexplained": "unexplained"}
    extra = sorted(set(total) - set(columns))
    print(f"{'module':24s}" + "".join(f"{headers.get(c, c):>13.13s}" for c in columns + extra) + f"{'kill rate':>11s}")
    summary = {}
    for module, row in sorted(table.items()) + [("total", total)]:
        judged = row["mutants"] - row["equivalent or not worth a test"] - sum(row[c] for c in extra)
        rate = row["caught"] / judged if judged else float("nan")
        summary[module] = {**{c: row[c] for c in columns + extra}, "kill_rate": round(rate, 4)}
        print(f"{module:24s}" + "".join(f"{row[c]:>13d}" for c in columns + extra) + f"{rate:>11.1%}")
    print("caught: killed or timed out; explained: not caught, and listed in docs/mutation.md as equivalent or not "
          "worth a test; kill rate: caught / (mutants - explained - not checked)")
    stale = sorted(set(reasons) - set(mutmut_results() if args.only else results))
    if stale:
        print(f"\n{len(stale)} mutants listed in docs/mutation.md no longer exist (the code changed): "
              + ", ".join(stale[:10]) + (" ..." if len(stale) > 10 else ""))
    if unexplained:
        print(f"\n{len(unexplained)} mutants not caught and not explained in docs/mutation.md "
              "(see one with: python -m mutmut show NAME):")
        for name, status in unexplained:
            print(f"  {name}: {status}")
    if args.json:
        Path(args.json).write_text(json.dumps({"modules": summary, "unexplained": unexplained}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
