"""Before/after timings of the FEM and Gauss-Newton, in one process, interleaved.

The "before" code is ``src/dgm_eit/physics/fem.py`` and ``src/dgm_eit/recon/gauss_newton.py``
as committed at ``--ref`` (default HEAD), loaded from git into private modules; "after" is
the working tree. Each round times every operation once with each implementation, in
alternating order; the medians over rounds are printed, with the largest relative
difference of the results (v, J, GN sigma) between the two; GN must also take the same
iterations and line-search steps. Wall-clock and this thread's CPU time are both printed
(on a shared machine the CPU time is the steadier figure; BLAS runs on one thread).

GN data as in ``dgm-eit bench fem``'s per-image line: two-anomaly phantoms simulated on the
profile's ``[simulation]`` mesh with noise at its ``data.snr_db``, inverted with its ``[gn]``
settings on our ``disk_mesh(16, --h0)`` (or pyEIT's mesh with ``--pyeit-mesh``). "cold":
without the start of GN kept from the previous image (the new code keeps it per model).

    python benchmarks/gn_speed.py --rounds 30 --h0 0.05
    python benchmarks/gn_speed.py --rounds 15 --pyeit-mesh
    python benchmarks/gn_speed.py --rounds 10 --threads 2     # both BLAS libraries at 2 threads
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_ref(ref: str):
    """(fem, gauss_newton) modules of the committed code at ``ref``."""
    tmp = Path(tempfile.mkdtemp(prefix="gn_speed_"))
    mods = []
    for name, path in (("ref_fem", "src/dgm_eit/physics/fem.py"), ("ref_gn", "src/dgm_eit/recon/gauss_newton.py")):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{path}"], check=True,
                              capture_output=True, text=True).stdout
        (tmp / f"{name}.py").write_text(text)
        spec = importlib.util.spec_from_file_location(name, tmp / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def phantom(mesh):
    c = mesh.centroids
    s = np.ones(mesh.n_elements)
    s[np.hypot(c[:, 0] - 0.3, c[:, 1] - 0.2) < 0.25] = 0.5
    s[np.hypot(c[:, 0] + 0.3, c[:, 1] + 0.35) < 0.2] = 1.5
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="HEAD")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--h0", type=float, default=0.05)
    ap.add_argument("--pyeit-mesh", action="store_true", help="pyEIT's mesh (as bench fem) instead of ours")
    ap.add_argument("--profile", default="quick", help="[gn] settings of this profile")
    args = ap.parse_args(argv)

    import scipy.linalg  # noqa: F401  (load scipy's BLAS before limiting threads)
    from threadpoolctl import threadpool_info, threadpool_limits

    from dgm_eit.config import load_config
    from dgm_eit.physics import ForwardModel, disk_mesh, make_protocol, pyeit_like_mesh
    from dgm_eit.recon import gauss_newton, gn_config

    threadpool_limits(args.threads)
    ref_fem, ref_gn = load_ref(args.ref)
    if args.pyeit_mesh:
        import pyeit.mesh as pm
        np.random.seed(0)
        p = pm.create(16, h0=args.h0)
        mesh = pyeit_like_mesh(p.node, p.element, p.el_pos, p.ref_node)
    else:
        mesh = disk_mesh(16, args.h0)
    prot = make_protocol("adjacent", 16)
    new_fm, old_fm = ForwardModel(mesh, prot), ref_fem.ForwardModel(mesh, prot)
    sigma = phantom(mesh)
    cfg = load_config(args.profile)
    kw = gn_config(cfg)
    # GN data as ``dgm-eit bench fem`` makes it: two-anomaly phantoms on the profile's
    # [simulation] mesh, noise at data.snr_db (one image per round, cycling through 5)
    from dgm_eit.commands.bench import _phantom
    from dgm_eit.physics import forward_model_from_config

    fine = forward_model_from_config(cfg, "simulation")
    if fine.n_meas != new_fm.n_meas:
        raise SystemExit("the profile's protocol does not match this mesh's")
    rng = np.random.default_rng(0)
    images = []
    for _ in range(5):
        v = fine.forward(_phantom(fine.mesh.centroids, rng))
        noise = rng.normal(size=v.shape)
        images.append(v + noise * np.linalg.norm(v) / np.linalg.norm(noise) * 10 ** (-float(cfg["data"]["snr_db"]) / 20))
    current = [0]
    kw10 = dict(method="kotre", lam=1.0, p=0.5, max_iter=10, tol=0.0, line_search=False)

    def ops(fm, gn):
        def fwd():
            fm.clear_cache()
            return fm.forward(sigma)

        def jac():
            fm.clear_cache()
            return fm.jacobian(sigma)

        def gnp():
            fm.clear_cache()
            return gn(fm, images[current[0]], **kw)

        def gn_cold():
            # without the start of GN kept from the previous image (new code only)
            fm.clear_cache()
            first_steps.clear()
            return gn(fm, images[current[0]], **kw)

        def gn10():
            fm.clear_cache()
            return gn(fm, images[current[0]], **kw10)
        return {"forward": fwd, "jacobian": jac, f"GN {args.profile} [gn]": gnp,
                f"GN {args.profile} [gn], cold": gn_cold, "GN 10 it. kotre lam=1": gn10}
    # GN: the profile's [gn] settings on its own data (see above); "GN 10 it.": 10 full
    # steps on log sigma, no line search, on the first of those images

    from dgm_eit.recon import gauss_newton as gn_module

    first_steps = getattr(sys.modules[gn_module.__module__], "_FIRST_STEPS", {})
    new_ops, old_ops = ops(new_fm, gauss_newton), ops(old_fm, ref_gn.gauss_newton)
    times = {name: ([], []) for name in new_ops}
    cpu = {name: ([], []) for name in new_ops}
    for r in range(args.rounds):
        current[0] = r % len(images)
        for name in new_ops:
            pair = [(0, new_ops[name]), (1, old_ops[name])]
            if r % 2:
                pair.reverse()
            for which, fn in pair:
                start, start_cpu = time.perf_counter(), time.thread_time()
                fn()
                times[name][which].append(time.perf_counter() - start)
                cpu[name][which].append(time.thread_time() - start_cpu)

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    (vn, Jn), (vo, Jo) = new_ops["jacobian"](), old_ops["jacobian"]()
    diffs = {"forward": rel(new_ops["forward"](), old_ops["forward"]()), "jacobian": max(rel(vn, vo), rel(Jn, Jo))}
    for name in list(new_ops)[2:]:
        diffs[name] = 0.0
        for current[0] in range(len(images)):
            a, b = new_ops[name](), old_ops[name]()
            diffs[name] = max(diffs[name], rel(a.sigma, b.sigma))
            assert a.n_iter == b.n_iter and a.steps == b.steps, (a.n_iter, b.n_iter)
    blas = ", ".join(f"{i['internal_api']} {i['version']} ({i['num_threads']} thr.)" for i in threadpool_info())
    print(f"mesh: {'pyEIT' if args.pyeit_mesh else 'ours'} h0={args.h0:g}: {mesh.n_nodes} nodes, "
          f"{mesh.n_elements} elements; BLAS: {blas}; {args.rounds} rounds, medians")
    print("wall-clock and CPU time (this thread) per call, medians, ms")
    print(f"{'':28s}{'before':>9s}{'after':>9s}{'ratio':>7s}{'CPU before':>12s}{'after':>9s}{'ratio':>7s}"
          f"{'max rel diff':>14s}")
    for name in times:
        (new, old), (cnew, cold) = times[name], cpu[name]
        a, b = statistics.median(old) * 1e3, statistics.median(new) * 1e3
        ca, cb = statistics.median(cold) * 1e3, statistics.median(cnew) * 1e3
        print(f"{name:28s}{a:9.3f}{b:9.3f}{a / b:7.2f}{ca:12.3f}{cb:9.3f}{ca / cb:7.2f}{diffs[name]:14.2e}")


if __name__ == "__main__":
    main()
