"""The KTC study's GN settings search, before and after it was spread over the cores, in one run.

Times ``choose_settings(methods, "gn", val)`` -- what ``dgm-eit run --profile ktc`` calls: GN
on every ``[iterated] prior_scale`` x ``iterations`` and the segmentation thresholds -- on the
first ``--images`` simulated validation images of the profile's tank (no data set needed:
they are remade from the seed), per round with each way of running the images:

- ``before``: ``gauss_newton_path`` as committed at ``--ref`` (one image after another in this
  process, whose BLAS uses every core, as ``dgm-eit run`` sets it);
- ``serial``: the working tree forced to one process (one BLAS thread);
- ``threads``: the working tree's per-image function in a thread pool of ``cpu_count()``
  threads (one BLAS thread; measured, not used: does the GIL let it pay?);
- ``processes``: the working tree as the study runs it (a process pool of ``cpu_count()``).

Prints seconds per validation image (the search's wall time / images), the largest difference
of the GN images from ``serial`` (``0`` = the same bits), the BLAS settings and ``uptime``
before and after (another job on the machine slows every figure).

    python benchmarks/gn_parallel.py --images 8
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def committed_path_method(ref: str):
    """``DifferenceReconstructor.gauss_newton_path`` of ``src/dgm_eit/ktc/tank.py`` at ``ref``."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/dgm_eit/ktc/tank.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="gn_parallel_")) / "ref_tank.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("ref_tank", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DifferenceReconstructor.gauss_newton_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ref", default="e1d6162", help="git ref of the 'before' code (default: e1d6162, the last commit before the pool)")
    parser.add_argument("--profile", default="ktc")
    parser.add_argument("--set", action="append", default=[], help="config override, as dgm-eit run --set")
    args = parser.parse_args()

    from dgm_eit.config import load_config
    from dgm_eit.ktc import tank
    from dgm_eit.ktc.study import Methods, choose_settings, validation_set
    from dgm_eit.physics.fem import blas_threads
    from dgm_eit.runtime import blas_report, cpu_count, limit_threads

    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    limit_threads()   # as dgm-eit run: the main process's BLAS on every core
    print(f"cores: {cpu_count()}; BLAS in this process: {blas_report()[1]}; workers and 'serial': 1 thread")
    cfg = load_config(args.profile, args.set)
    methods = Methods(cfg, Path(tempfile.mkdtemp(prefix="gn_parallel_")), seed=0)
    val = validation_set(methods, args.images)
    print(f"{args.images} validation images; prior scales {cfg['iterated']['prior_scale']}, "
          f"iterations {cfg['iterated']['iterations']}; {methods.physics.sim.tank.describe()}")

    new, minimum = tank.DifferenceReconstructor.gauss_newton_path, tank.MIN_IMAGES_PER_WORKER

    def threaded(self, dv, masks, counts, workers=None):
        dv = np.atleast_2d(dv)
        counts = sorted({int(k) for k in counts})
        keeps = [self._mask(row, masks[i]) for i, row in enumerate(dv)]
        with blas_threads(1), ThreadPoolExecutor(cpu_count()) as pool:
            paths = list(pool.map(lambda a: self._path(a[0], a[1], counts), zip(dv, keeps)))
        return {k: self.image(np.stack([p[j] for p in paths])) for j, k in enumerate(counts)}

    variants = {"before": (committed_path_method(args.ref), None),
                "serial": (new, 10**9), "threads": (threaded, None), "processes": (new, None)}
    times = {name: [] for name in variants}
    gn_times = {name: [] for name in variants}   # inside gauss_newton_path (the rest: thresholds)
    images = {}
    for _ in range(args.rounds):
        for name, (method, min_per_worker) in variants.items():
            made, gn_seconds = [], []   # every call's images (for the bit comparison) and time

            def recorded(*a, method=method, made=made, gn_seconds=gn_seconds, **kw):
                start = time.perf_counter()
                made.append(method(*a, **kw))
                gn_seconds.append(time.perf_counter() - start)
                return made[-1]

            tank.DifferenceReconstructor.gauss_newton_path = recorded
            tank.MIN_IMAGES_PER_WORKER = min_per_worker or minimum
            logged = []
            start = time.perf_counter()
            choose_settings(methods, "gn", val, log=logged.append)
            times[name].append((time.perf_counter() - start) / args.images)
            gn_times[name].append(sum(gn_seconds) / args.images)
            images[name] = made
            print(f"  {name}: {times[name][-1]:.2f} s per image, GN alone {gn_times[name][-1]:.2f}   "
                  f"[{logged[-1].strip()}]", flush=True)
    tank.DifferenceReconstructor.gauss_newton_path = new

    print(f"\nGN settings search, seconds per validation image (median of {args.rounds} round(s)); "
          f"speed-up against 'before'; the same for the GN paths alone (the rest is the thresholds' search):")
    for name in variants:
        diff = max(float(np.abs(a[k] - b[k]).max()) for a, b in zip(images[name], images["serial"]) for k in b)
        search, gn = np.median(times[name]), np.median(gn_times[name])
        print(f"  {name:10s} search {search:7.2f}  x{np.median(times['before']) / search:.2f}   "
              f"GN {gn:7.2f}  x{np.median(gn_times['before']) / gn:.2f}   max |image - serial| {diff:.1e}")
    print("uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
