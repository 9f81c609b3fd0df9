"""Engine speed and memory against the plain reference loop: a thin wrapper of ``mr2nst bench``.

    python benchmarks/engine.py --out engine-bench.json                 # full size, CPU settings
    python benchmarks/engine.py --device cuda --patch-size 512 --iterations 400 --out gpu.json

Every argument is passed on to ``mr2nst bench`` (what it runs: benchmarks/README.md);
``--json`` is always set, so stdout holds only the JSON. Exits with the command's exit code.
"""

from __future__ import annotations

import sys

from mr2nst.node.cli.main import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["bench", "--json", *[a for a in args if a != "--json"]]))
