"""The iteration cost of failures per model and recovery strategy: ``dask-scar bench``.

    python benchmarks/bench_iteration_cost.py --quick          # about 7 minutes on 2 cores
    python benchmarks/bench_iteration_cost.py --simulated-only # the simulated trials alone

Everything lives in :mod:`dask_scar.bench` (so that ``dask-scar bench`` works from an
installed package); this script is its entry point beside the other benchmarks.
"""

import sys

from dask_scar.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
