"""Fused ops vs torch, same run: `python bench/bench_ops.py [--device cuda] [--json PATH]`.

The measurement code lives in gradfuse.bench.ops so the installed package (and the
`python -m gradfuse.bench ops` entry) can run it too.
"""

import sys

from gradfuse.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["ops", *sys.argv[1:]]))
