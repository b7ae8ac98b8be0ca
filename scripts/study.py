"""Run the multi-seed study grid and write results/REPORT.md (see music/study.py).

    python scripts/study.py --config configs/study.yaml                  # the full grid
    python scripts/study.py --config configs/study.yaml --quick true     # a smoke grid
    python scripts/study.py --config configs/study.yaml --workers 4      # more processes
    python scripts/study.py --config configs/study.yaml --report_only true

Re-running the same command skips finished cells and resumes an interrupted one.
"""

import sys

from music.study import main

if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
