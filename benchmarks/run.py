"""Run the benchmarks: `python benchmarks/run.py [moe|kv|batching|pages|memory|coldstart|cli|all] [--smoke]`.

Each benchmark prints one JSON object per line (same as `vl2 bench`).
"""

import json
import sys

from bench import run

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    for result in run(args[0] if args else "all", smoke="--smoke" in sys.argv):
        print(json.dumps(result), flush=True)
