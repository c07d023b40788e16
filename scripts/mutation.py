"""Mutation testing of the core with mutmut (configured in pyproject.toml, [tool.mutmut]).

Every mutant of layout, processor, session, recording, sampler, run and the toy metrics runs the fast tests
that execute its function. All 3,700-odd mutants take hours on 2 cores, so by default a fixed sample is run:
the mutants whose name hashes to 0 modulo ``--sample`` (1 in 5: ~750 mutants, stable from run to run, spread
over every module and function). ``--sample 1`` runs them all.

    python scripts/mutation.py                 # the 1-in-5 sample, 2 workers, then the report
    python scripts/mutation.py --sample 1      # every mutant
    python scripts/mutation.py --resume        # continue an interrupted run (keeps mutants/ and its results)

The report (scripts/mutation_report.py) counts mutants per module and status and lists every mutant that was
not caught and is not explained in docs/mutation.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mutation_report import mutmut_results  # this folder is on sys.path when the script runs

ROOT = Path(__file__).resolve().parents[1]


def generate_mutants(workers: int) -> None:
    """mutmut's own generation step (what `mutmut run` does first), without running anything."""
    code = (
        "import os\n"
        "from mutmut.__main__ import (copy_also_copy_files, copy_src_dir, create_mutants, set_mutant_under_test,\n"
        "                             setup_source_paths, store_lines_covered_by_tests)\n"
        "set_mutant_under_test('mutant_generation')\n"
        "os.makedirs('mutants', exist_ok=True)\n"
        "copy_src_dir(); copy_also_copy_files(); setup_source_paths(); store_lines_covered_by_tests()\n"
        f"create_mutants({workers})\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def all_mutant_names() -> list[str]:
    """Every generated mutant, as `mutmut show` names them (module.function__mutmut_N)."""
    names = []
    for path in sorted((ROOT / "mutants").rglob("*.py")):
        text = path.read_text()
        if "__mutmut_" not in text:
            continue
        module = ".".join(path.relative_to(ROOT / "mutants").with_suffix("").parts)
        for key in re.findall(r"^\w+\['(\w+__mutmut_\d+)'\] = ", text, flags=re.M):
            names.append(f"{module}.{key}")
    return names


def in_sample(name: str, sample: int) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % sample == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=5, help="run 1 in SAMPLE mutants (1: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutmut worker processes")
    parser.add_argument("--resume", action="store_true", help="keep mutants/ and the results already there")
    args = parser.parse_args(argv)
    if args.sample < 1:
        parser.error("--sample must be >= 1")
    os.chdir(ROOT)
    if not args.resume:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # results cached from another tree would be stale
    generate_mutants(args.jobs)
    names = all_mutant_names()
    chosen = [n for n in names if in_sample(n, args.sample)]
    print(f"{len(names)} mutants generated; running {len(chosen)} (1 in {args.sample})", flush=True)
    (ROOT / "mutants" / "sample.txt").write_text("\n".join(chosen) + "\n")
    if args.resume:  # named mutants are always re-run by mutmut: skip those with a result
        done = {name for name, status in mutmut_results().items() if status != "not checked"}
        chosen = [n for n in chosen if n not in done]
    if chosen:
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs), *chosen])
        if run.returncode != 0:
            print(f"mutmut run failed (exit {run.returncode}); its output is above", file=sys.stderr)
            return run.returncode
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "mutation_report.py"),
                           "--only", str(ROOT / "mutants" / "sample.txt")]).returncode


if __name__ == "__main__":
    sys.exit(main())
