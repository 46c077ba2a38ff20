"""The benchmark suite against autograd, as a script: the same as ``jvpgraph bench`` (see
jvpgraph/experiments/bench.py for what each part measures).

    python benchmarks/bench.py [--parts jvp sweep trace] [--models ...] [--compile] [--readme README.md]
"""

import sys

from jvpgraph.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
