"""Our FEM vs pyEIT 1.2.4: forward, Jacobian, 10 Gauss-Newton iterations, agreement.

Same as ``dgm-eit bench fem``; extra arguments are passed through, e.g.
``python benchmarks/bench_fem.py --json --repeat 10``.
"""

import sys

from dgm_eit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "fem", *sys.argv[1:]]))
