"""``dgm-eit bench {fem,simulate}``: speed figures.

``fem`` times our FEM against pyEIT 1.2.4 side by side on pyEIT's ``h0 = 0.05`` mesh
(when pyeit is importable; otherwise on our own ``h0 = 0.05`` mesh with the pyEIT columns
null): forward (all excitations), Jacobian and 10 Gauss-Newton iterations, plus the
agreement of v and J. ``simulate`` is the data simulator's benchmark (dgm_eit.data.bench).
"""

from __future__ import annotations

import argparse

from dgm_eit.commands.common import add_profile_args, add_seed_arg

HELP = "time the FEM against pyEIT (fem) or the data simulator (simulate)"

FEM_KEYS = ("nodes", "elements", "ours_forward_ms", "pyeit_forward_ms", "ours_jacobian_ms",
            "pyeit_jacobian_ms", "ours_gn10_s", "pyeit_gn10_s", "speedup_forward",
            "speedup_jacobian", "speedup_gn", "max_rel_err_v", "max_rel_err_jac")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    fem = sub.add_parser("fem", help="forward, Jacobian and 10 GN iterations: ours vs pyEIT",
                         description="forward, Jacobian and 10 GN iterations: ours vs pyEIT")
    fem.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    fem.add_argument("--repeat", type=int, default=5,
                     help="timed repetitions of each of our operations; the median is reported (default: %(default)s)")
    fem.add_argument("--pyeit-repeat", type=int, default=3,
                     help="repetitions of pyEIT's forward and Jacobian (its 10 GN iterations run once) (default: %(default)s)")
    fem.add_argument("--h0", type=float, default=0.05, help="mesh size (default: %(default)s)")
    fem.add_argument("--threads", type=int, default=0, help="BLAS threads; 0 = all usable cores (default: %(default)s)")
    add_seed_arg(fem)
    sim = sub.add_parser("simulate", help="data simulation throughput (dgm_eit.data.bench)",
                         description="data simulation throughput (dgm_eit.data.bench)")
    sim.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    sim.add_argument("--workers", type=int, default=0, help="worker processes; 0 = all usable cores (default: %(default)s)")
    sim.add_argument("--samples", type=int, default=200, help="samples to simulate (default: %(default)s)")
    add_profile_args(sim, default="paper")
    add_seed_arg(sim)


def run(args) -> int:
    if args.target == "simulate":
        from dgm_eit.data.bench import run as run_simulate

        return run_simulate(args)
    return run_fem(args)


def _median_time(fn, repeat: int) -> float:
    import statistics
    import time

    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _phantom(centroids, rng):
    """Background 1 with two circular anomalies (0.5 and 1.5) placed from ``rng``."""
    import numpy as np

    sigma = np.ones(len(centroids))
    for value in (0.5, 1.5):
        radius = rng.uniform(0.15, 0.25)
        centre = rng.uniform(-0.5, 0.5, size=2)
        sigma[np.hypot(*(centroids - centre).T) < radius] = value
    return sigma


def run_fem(args) -> int:
    import json
    import warnings

    import numpy as np
    from threadpoolctl import threadpool_limits

    from dgm_eit.errors import InputError
    from dgm_eit.physics import ForwardModel, disk_mesh, make_protocol, pyeit_like_mesh
    from dgm_eit.recon import gauss_newton
    from dgm_eit.runtime import check_seed, cpu_count

    if args.repeat < 1 or args.pyeit_repeat < 1:
        raise InputError("--repeat and --pyeit-repeat must be at least 1")
    check_seed(args.seed)
    threads = args.threads or cpu_count()
    threadpool_limits(threads)
    rng = np.random.default_rng(args.seed)
    try:
        import pyeit.eit.protocol as pyeit_protocol
        import pyeit.mesh as pyeit_mesh
        from pyeit.eit.fem import EITForward
        from pyeit.eit.jac import JAC
    except ImportError:
        pyeit_mesh = None

    protocol = make_protocol("adjacent", 16)
    if pyeit_mesh is not None:
        # distmesh draws from numpy's global generator; seed it for a reproducible mesh
        state = np.random.get_state()
        np.random.seed(args.seed % 2**32)
        try:
            pmesh = pyeit_mesh.create(16, h0=args.h0)
        finally:
            np.random.set_state(state)
        mesh = pyeit_like_mesh(pmesh.node, pmesh.element, pmesh.el_pos, pmesh.ref_node)
        source = f"pyEIT mesh h0={args.h0:g}"
    else:
        mesh = disk_mesh(16, args.h0)
        source = f"our mesh h0={args.h0:g} (pyeit not installed)"
    fm = ForwardModel(mesh, protocol)
    sigma = _phantom(mesh.centroids, rng)
    v_true = fm.forward(sigma)
    noise = rng.normal(size=v_true.shape)
    v_meas = v_true + noise * np.linalg.norm(v_true) / np.linalg.norm(noise) * 10 ** (-40 / 20)

    def ours_forward():
        fm.clear_cache()
        fm.forward(sigma)

    def ours_jacobian():
        fm.clear_cache()
        fm.jacobian(sigma)

    def ours_gn():
        fm.clear_cache()
        # exactly 10 iterations, as pyEIT's maxiter=10 (no early stop, no line search)
        res = gauss_newton(fm, v_meas, method="kotre", lam=1.0, p=0.5, max_iter=10, tol=0.0,
                           line_search=False)
        assert res.n_iter == 10

    t_fwd = _median_time(ours_forward, args.repeat)
    t_jac = _median_time(ours_jacobian, args.repeat)
    t_gn = _median_time(ours_gn, max(1, min(args.repeat, 3)))
    v_ours, J_ours = fm.jacobian(sigma)

    result = dict.fromkeys(FEM_KEYS)
    result.update(nodes=mesh.n_nodes, elements=mesh.n_elements, ours_forward_ms=t_fwd * 1e3,
                  ours_jacobian_ms=t_jac * 1e3, ours_gn10_s=t_gn)
    if pyeit_mesh is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pprot = pyeit_protocol.create(16, dist_exc=1, step_meas=1, parser_meas="std")
            fwd = EITForward(pmesh, pprot)
            p_fwd = _median_time(lambda: fwd.solve_eit(sigma), args.pyeit_repeat)
            p_jac = _median_time(lambda: fwd.compute_jac(sigma), args.pyeit_repeat)
            v_py = fwd.solve_eit(sigma)
            J_py, _ = fwd.compute_jac(sigma)
            solver = JAC(pmesh, pprot)
            solver.setup(p=0.5, lamb=1e-2, method="kotre", perm=1.0)
            # gtol=0 never triggers pyEIT's early stop, so it runs all 10 iterations
            p_gn = _median_time(lambda: solver.gn(v_meas, x0=np.ones(mesh.n_elements), maxiter=10,
                                                  gtol=0.0, p=0.5, lamb=1e-2, method="kotre"), 1)
        result.update(
            pyeit_forward_ms=p_fwd * 1e3, pyeit_jacobian_ms=p_jac * 1e3, pyeit_gn10_s=p_gn,
            speedup_forward=p_fwd / t_fwd, speedup_jacobian=p_jac / t_jac, speedup_gn=p_gn / t_gn,
            # pyEIT's Jacobian is -dv/dsigma
            max_rel_err_v=float(np.max(np.abs(v_ours - v_py)) / np.max(np.abs(v_py))),
            max_rel_err_jac=float(np.max(np.abs(J_ours + J_py)) / np.max(np.abs(J_py))),
        )

    def fmt(value, unit=""):
        return "n/a" if value is None else f"{value:.4g}{unit}"

    print(f"dgm-eit bench fem: {source}: {mesh.n_nodes} nodes, {mesh.n_elements} elements, "
          f"{protocol.n_meas} measurements, {threads} BLAS thread(s)")
    print(f"{'':24s}{'ours':>12s}{'pyEIT':>12s}{'speed-up':>10s}")
    for label, ours, theirs, speed, unit in (
            ("forward (16 exc.)", result["ours_forward_ms"], result["pyeit_forward_ms"], result["speedup_forward"], " ms"),
            ("Jacobian", result["ours_jacobian_ms"], result["pyeit_jacobian_ms"], result["speedup_jacobian"], " ms"),
            ("10 GN iterations", result["ours_gn10_s"], result["pyeit_gn10_s"], result["speedup_gn"], " s")):
        print(f"{label:24s}{fmt(ours, unit):>12s}{fmt(theirs, unit):>12s}{fmt(speed, 'x'):>10s}")
    print(f"agreement with pyEIT: max rel. error v {fmt(result['max_rel_err_v'])}, "
          f"J {fmt(result['max_rel_err_jac'])}")
    if args.json:
        print(json.dumps(result))
    return 0
