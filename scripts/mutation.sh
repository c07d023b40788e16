#!/usr/bin/env bash
# Mutation testing of the core (layout, processor, session, recording, sampler, run, toy metrics) with mutmut;
# see scripts/mutation.py and docs/mutation.md. Not part of CI. Installs the dev extras if mutmut is missing.
#   bash scripts/mutation.sh                 # a fixed 1-in-5 sample of the mutants, 2 workers, then the report
#   bash scripts/mutation.sh --sample 1      # every mutant (hours on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import mutmut" 2>/dev/null; then
    EXTRAS=",dev" bash scripts/setup.sh
fi
exec "$PYTHON" scripts/mutation.py "$@"
