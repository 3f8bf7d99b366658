"""``dgm-eit bench {fem,simulate}``: speed figures.

``fem`` times our FEM against pyEIT 1.2.4 side by side on pyEIT's ``h0 = 0.05`` mesh
(when pyeit is importable; otherwise on our own ``h0 = 0.05`` mesh with the pyEIT columns
null), and Gauss-Newton per image on a profile's own inversion mesh:

- forward: voltages of all 16 adjacent excitations for one conductivity. Ours: one band
  Cholesky and one triangular solve for the 16 unit electrode currents; pyEIT:
  ``EITForward.solve_eit`` (a sparse solve per excitation).
- Jacobian (with the voltages). Ours: the band Cholesky, two triangular solves and the
  element-gradient products; pyEIT: ``compute_jac`` (a dense inverse of the system matrix
  and a Python loop over elements and excitations).
- 10 Gauss-Newton iterations, the same work on both sides: from sigma = 1, exactly 10
  iterations (pyEIT ``gtol = 0``; ours ``tol = 0``), no line search, a full step on sigma
  itself (ours ``log_param = False``, ``max_step = 0``), the Kotre prior
  ``R = diag(J^T J)^0.5`` on both sides with pyEIT's ``lamb = 0.01``; ours scales R to the
  mean of diag(J^T J), so its ``lam`` is set to give the same ``lamb * R`` at sigma = 1.
  A Jacobian (with its factorisation) per iteration on both sides; ours also evaluates the
  residual at each new iterate (pyEIT does not), and solves the regularised system in data
  space (208 x 208) where pyEIT inverts an elements x elements matrix: that is the method,
  not a handicap. Ours starts cold in every repeat (no start kept from a previous call).
- Gauss-Newton per image on the profile's mesh (``--profile``, ``--set``; default quick):
  ``gauss_newton`` with the profile's ``[gn]`` settings (lam scaled to ``data.snr_db``) on
  its ``[mesh]``, for two-anomaly phantoms simulated on its ``[simulation]`` mesh with
  noise at ``data.snr_db``. ``warm`` is the cost per image in a run over many images (the
  start of GN at sigma0 = 1 is shared by all images); ``cold`` the first image's.

BLAS: our FEM and Gauss-Newton always run their BLAS calls on one thread
(``dgm_eit.physics.fem.blas_threads``): their matrices are small, and OpenBLAS threads
sharing 2 cores with other work stalled them 10-100x. ``--threads`` (default 1, the same as
ours) sets the threads of every loaded BLAS (numpy's and scipy's, set after both are
loaded), which pyEIT uses. ``--threads 0`` gives pyEIT all cores: faster on an idle machine
(its dense inverses), but on a machine with other work its OpenBLAS threads stall too
(measured here: pyEIT's 10 GN iterations 20 s with one thread, 71 s with two), which
would flatter the speed-ups. The BLAS libraries, their versions and thread counts,
``OMP_NUM_THREADS`` and torch's threads (when torch is loaded) are printed with the figures
and stored in the JSON object.

``simulate`` is the data simulator's benchmark (dgm_eit.data.bench), ``train`` the training
benchmark (dgm_eit.train_bench).
"""

from __future__ import annotations

import argparse

from dgm_eit.commands.common import add_profile_args, add_seed_arg

HELP = "time the FEM against pyEIT (fem), the data simulator (simulate) or training steps with each speed-up (train)"

FEM_KEYS = ("nodes", "elements", "ours_forward_ms", "pyeit_forward_ms", "ours_jacobian_ms",
            "pyeit_jacobian_ms", "ours_gn10_s", "pyeit_gn10_s", "speedup_forward",
            "speedup_jacobian", "speedup_gn", "max_rel_err_v", "max_rel_err_jac",
            # added with the BLAS report and the per-image GN line
            "threads", "blas", "omp_num_threads", "torch_threads", "gn10_lam_ours", "gn10_lamb_pyeit",
            "profile", "profile_nodes", "profile_elements", "profile_gn", "profile_gn_images",
            "profile_gn_iterations", "ours_gn_profile_ms", "ours_gn_profile_cold_ms", "ours_gn_profile_cpu_ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    fem = sub.add_parser("fem", help="forward, Jacobian and 10 GN iterations: ours vs pyEIT; GN per image "
                                     "on a profile's mesh",
                         description="forward, Jacobian and 10 GN iterations: ours vs pyEIT (the same BLAS "
                                     "threads); Gauss-Newton per image with a profile's [gn] settings on its [mesh]")
    fem.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    fem.add_argument("--repeat", type=int, default=20,
                     help="timed repetitions of each of our operations (our 10 GN iterations: at most 3; GN per "
                          "image: at most 5 rounds over the images); the median is reported (default: %(default)s)")
    fem.add_argument("--pyeit-repeat", type=int, default=3,
                     help="repetitions of pyEIT's forward and Jacobian (its 10 GN iterations run once) (default: %(default)s)")
    fem.add_argument("--h0", type=float, default=0.05, help="mesh size (default: %(default)s)")
    fem.add_argument("--threads", type=int, default=1,
                     help="BLAS threads for pyEIT (ours always use one); 0 = all usable cores (default: %(default)s, "
                          "the same as ours)")
    fem.add_argument("--gn-images", type=int, default=5,
                     help="phantoms for the GN-per-image line on the profile's mesh (default: %(default)s)")
    add_profile_args(fem, default="quick")
    add_seed_arg(fem)
    sim = sub.add_parser("simulate", help="data simulation throughput (dgm_eit.data.bench)",
                         description="data simulation throughput (dgm_eit.data.bench)")
    sim.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    sim.add_argument("--workers", type=int, default=0, help="worker processes; 0 = all usable cores (default: %(default)s)")
    sim.add_argument("--samples", type=int, default=200, help="samples to simulate (default: %(default)s)")
    add_profile_args(sim, default="paper")
    add_seed_arg(sim)
    tr = sub.add_parser("train", help="optimiser steps per second of every model, plain fp32 and with each "
                                      "speed-up, and the validation loss each reaches (dgm_eit.train_bench)",
                        description="optimiser steps per second of every model at the profile's batch size, plain "
                                    "fp32 and with each speed-up; a speed-up is kept where it is faster and its "
                                    "validation loss after the same steps is within 1%% of fp32's")
    tr.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    tr.add_argument("--out", default=None, metavar="FILE.json",
                    help="also write the JSON object to FILE, updated after every model stage")
    tr.add_argument("--data", default=None, metavar="FILE",
                    help="a data set of the profile (default: --samples simulated with the profile)")
    tr.add_argument("--samples", type=int, default=512, help="training samples to simulate (default: %(default)s)")
    tr.add_argument("--steps", type=int, default=20, help="timed optimiser steps per variant (default: %(default)s)")
    tr.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    tr.add_argument("--models", default=None, help="comma-separated models (default: all registered)")
    tr.add_argument("--variants", default=None,
                    help="comma-separated: fp32,bf16,fp16,compile,channels_last,foreach,fused,profile "
                         "(default: all; fp16 on CUDA only)")
    tr.add_argument("--threads", type=int, default=0, help="torch/BLAS threads; 0 = all usable cores (default)")
    tr.add_argument("--side-by-side", action="store_true",
                    help="also time two one-thread stages at once against one stage on every core (CPU)")
    tr.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    add_profile_args(tr, default="quick")
    add_seed_arg(tr)
    sd = sub.add_parser("seeds", help="train every model of a profile with several seeds on the same data and print "
                                      "the spread of its test MSE change against GN",
                        description="dgm-eit run with --seeds K (default 3) on the given tests (default T1), then "
                                    "per table and model: each seed's MSE change against GN, their std and the "
                                    "seed ensemble's. Resumable; an existing run directory with the same config "
                                    "(any run.tests, run.seeds) is reused, so it also reads a finished run; its report.md is "
                                    "written only in a new directory, never over a study's own.")
    sd.add_argument("--out", required=True, metavar="DIR", help="run directory (made, or reused)")
    sd.add_argument("--seeds", type=int, default=3, metavar="K", help="training seeds per model (default: %(default)s)")
    sd.add_argument("--tests", default="T1", help="comma-separated tests (default: %(default)s)")
    sd.add_argument("--goal", type=float, default=3.0, help="std over seeds to meet, in points (default: %(default)s)")
    sd.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_profile_args(sd, default="quick")
    add_seed_arg(sd)


def run(args) -> int:
    if args.target == "simulate":
        from dgm_eit.data.bench import run as run_simulate

        return run_simulate(args)
    if args.target == "train":
        from dgm_eit.train_bench import run as run_train

        return run_train(args)
    if args.target == "seeds":
        return run_seeds(args)
    return run_fem(args)


def run_seeds(args) -> int:
    """``dgm-eit bench seeds``: the spread over training seeds of every model's MSE change against GN."""
    import json
    import sys
    from pathlib import Path

    from dgm_eit.config import load_config
    from dgm_eit.experiments import Experiment
    from dgm_eit.files import output_lock
    from dgm_eit.report import write_outputs

    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    cfg = load_config(args.profile, [*args.overrides, f"run.seeds={args.seeds}", f"run.tests={json.dumps(tests)}"])
    experiment = Experiment(cfg, args.out, seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    with output_lock(args.out, "dgm-eit bench seeds"):
        result = experiment.run()
        # a study's own report covers all of its tests: one of only these tests must not replace it
        own_report = not (Path(args.out) / "report.md").exists()
        if own_report:
            write_outputs(result)
    rows = seed_spread(result, args.goal)
    print(f"dgm-eit bench seeds: profile {cfg.get('profile', args.profile)}, --seed {args.seed}, {args.seeds} "
          f"training seeds per model; MSE change against GN on the test split (points)")
    print(f"{'table':18s}{'method':12s}{'per seed':>28s}{'mean':>8s}{'std':>7s}{'95% interval':>15s}"
          f"{'ensemble':>10s}  std <= {args.goal:g}")
    for r in rows:
        ens = "-" if r["ensemble"] is None else f"{r['ensemble']:+.1f}"
        interval = "-" if r["verdict"] is None else f"[{r['std_low']:.1f}, {r['std_high']:.1f}]"
        per_seed = ' / '.join(f'{c:+.1f}' for c in r['per_seed'])
        print(f"{r['test'] + ' ' + r['test_set']:18s}{r['method']:12s}{per_seed:>28s}"
              f"{r['mean']:+8.1f}{r['std']:7.1f}{interval:>15s}{ens:>10s}  {r['verdict'] or '-'}")
    print(f"(std: over seeds, ddof 1; its 95% chi-square interval: met = the interval lies at or below {args.goal:g}, "
          f"missed = above it, undecided = it straddles it: more seeds would tell)")
    failures = result.failures
    if failures:
        print(f"dgm-eit bench seeds: {len(failures)} stage(s) did not complete; re-run to resume", file=sys.stderr)
    if not own_report:
        print(f"dgm-eit bench seeds: {args.out}/report.md left as it was (the study's own)", file=sys.stderr)
    if args.json:
        print(json.dumps({"profile": str(cfg.get("profile")), "seed": args.seed, "seeds": args.seeds, "goal": args.goal,
                          "rows": rows}))
    return 1 if failures else 0


def seed_spread(result, goal: float) -> list[dict]:
    """Per table and trained method of a run's result: each seed's MSE change against GN in
    percent, their mean and std over seeds (ddof = 1) with its 95% interval and whether that
    shows the std at most ``goal``, and the seed ensemble's change when there is one."""
    import math

    import numpy as np

    from dgm_eit.methods import ENSEMBLE_SUFFIX, GAUSS_NEWTON
    from dgm_eit.stats import spread_verdict, std_interval

    rows = []
    for sr in result.settings:
        gn = sr.get(GAUSS_NEWTON.key)
        if gn is None:
            continue
        base = float(np.mean(gn.errors("MSE")))
        for mr in sr.methods:
            if not mr.seeded:
                continue
            changes = [100.0 * (float(np.mean(e)) / base - 1.0) for e in mr.errors("MSE")]
            ens = sr.get(mr.method + ENSEMBLE_SUFFIX)
            std, low, high, verdict = math.nan, math.nan, math.nan, None
            if len(changes) > 1:
                std, low, high = std_interval(changes)
                verdict = spread_verdict(low, high, goal)
            rows.append({"test": sr.setting.test, "test_set": sr.setting.data.label, "method": mr.name,
                         "per_seed": changes, "mean": float(np.mean(changes)), "std": std, "std_low": low,
                         "std_high": high, "verdict": verdict,
                         "ensemble": None if ens is None else 100.0 * (float(np.mean(ens.errors("MSE"))) / base - 1.0)})
    return rows


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
    import os
    import statistics
    import sys
    import time
    import warnings

    import numpy as np
    import scipy.linalg  # noqa: F401  (load scipy's BLAS before setting the thread count)
    from threadpoolctl import threadpool_limits

    from dgm_eit.config import load_config
    from dgm_eit.errors import InputError
    from dgm_eit.physics import ForwardModel, disk_mesh, forward_model_from_config, make_protocol, pyeit_like_mesh
    from dgm_eit.recon import gauss_newton, gn_config
    from dgm_eit.recon.gauss_newton import clear_start_cache
    from dgm_eit.runtime import blas_report, check_seed, cpu_count

    if args.repeat < 1 or args.pyeit_repeat < 1 or args.gn_images < 1:
        raise InputError("--repeat, --pyeit-repeat and --gn-images must be at least 1")
    check_seed(args.seed)
    cfg = load_config(args.profile, args.overrides)
    threads = args.threads or cpu_count()
    rng = np.random.default_rng(args.seed)
    try:
        import pyeit.eit.protocol as pyeit_protocol
        import pyeit.mesh as pyeit_mesh
        from pyeit.eit.fem import EITForward
        from pyeit.eit.jac import JAC
    except ImportError:
        pyeit_mesh = None
    # every BLAS is loaded now (numpy's, scipy's; pyEIT uses both): set them all
    threadpool_limits(threads)

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

    # GN (10 iterations): pyEIT's regularisation lamb * diag(J^T J)^p; ours is scaled to
    # mean(diag J^T J), so the same lamb * R at sigma = 1 needs lam = lamb * mean(d) / mean(diag)
    lamb, p = 1e-2, 0.5
    _, J1 = fm.jacobian(np.ones(mesh.n_elements))
    jtj = np.einsum("ke,ke->e", J1, J1)
    lam_ours = float(lamb * np.mean(jtj ** p) / np.mean(jtj))

    def ours_forward():
        fm.clear_cache()
        fm.forward(sigma)

    def ours_jacobian():
        fm.clear_cache()
        fm.jacobian(sigma)

    gn10 = {}

    def ours_gn():
        fm.clear_cache()
        clear_start_cache(fm)
        # exactly 10 full steps on sigma, as pyEIT's gn(maxiter=10, gtol=0): no early stop,
        # no line search, no step limit
        res = gauss_newton(fm, v_meas, method="kotre", lam=lam_ours, p=p, max_iter=10, tol=0.0,
                           line_search=False, log_param=False, max_step=0.0)
        assert res.n_iter == 10
        gn10["sigma"] = res.sigma

    t_fwd = _median_time(ours_forward, args.repeat)
    t_jac = _median_time(ours_jacobian, args.repeat)
    t_gn = _median_time(ours_gn, max(1, min(args.repeat, 3)))
    v_ours, J_ours = fm.jacobian(sigma)

    result = dict.fromkeys(FEM_KEYS)
    result.update(nodes=mesh.n_nodes, elements=mesh.n_elements, ours_forward_ms=t_fwd * 1e3,
                  ours_jacobian_ms=t_jac * 1e3, ours_gn10_s=t_gn, gn10_lam_ours=lam_ours)
    gn10_diff = None
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
            solver.setup(p=p, lamb=lamb, method="kotre", perm=1.0)

            def pyeit_gn():
                # gtol=0 never triggers pyEIT's early stop, so it runs all 10 iterations
                gn10["pyeit"] = solver.gn(v_meas, x0=np.ones(mesh.n_elements), maxiter=10, gtol=0.0,
                                          p=p, lamb=lamb, method="kotre")

            p_gn = _median_time(pyeit_gn, 1)
        gn10_diff = float(np.linalg.norm(gn10["sigma"] - np.real(gn10["pyeit"])) / np.linalg.norm(gn10["pyeit"]))
        result.update(
            pyeit_forward_ms=p_fwd * 1e3, pyeit_jacobian_ms=p_jac * 1e3, pyeit_gn10_s=p_gn,
            speedup_forward=p_fwd / t_fwd, speedup_jacobian=p_jac / t_jac, speedup_gn=p_gn / t_gn,
            # pyEIT's Jacobian is -dv/dsigma
            max_rel_err_v=float(np.max(np.abs(v_ours - v_py)) / np.max(np.abs(v_py))),
            max_rel_err_jac=float(np.max(np.abs(J_ours + J_py)) / np.max(np.abs(J_py))),
            gn10_lamb_pyeit=lamb,
        )

    # Gauss-Newton per image on the profile's inversion mesh, data from its simulation mesh
    fm_p = forward_model_from_config(cfg)
    fine = forward_model_from_config(cfg, "simulation")
    gn_kwargs = gn_config(cfg)
    snr_db = float(cfg["data"]["snr_db"])
    volts = []
    for _ in range(args.gn_images):
        v = fine.forward(_phantom(fine.mesh.centroids, rng))
        e = rng.normal(size=v.shape)
        volts.append(v + e * np.linalg.norm(v) / np.linalg.norm(e) * 10 ** (-snr_db / 20))
    warm, cold, cpu, iterations = [], [], [], []
    for _ in range(min(args.repeat, 5)):
        for start_cached in (False, True):
            for v in volts:
                if not start_cached:
                    clear_start_cache(fm_p)
                started, started_cpu = time.perf_counter(), time.thread_time()
                res = gauss_newton(fm_p, v, **gn_kwargs)
                (warm if start_cached else cold).append(time.perf_counter() - started)
                if start_cached:
                    # one BLAS thread: this thread's CPU time is all of GN's (what an idle core would take)
                    cpu.append(time.thread_time() - started_cpu)
                iterations.append(res.n_iter)
    result.update(profile=str(cfg.get("profile", args.profile)), profile_nodes=fm_p.mesh.n_nodes,
                  profile_elements=fm_p.n_elements, profile_gn=gn_kwargs, profile_gn_images=args.gn_images,
                  profile_gn_iterations=float(np.mean(iterations)),
                  ours_gn_profile_ms=statistics.median(warm) * 1e3, ours_gn_profile_cold_ms=statistics.median(cold) * 1e3,
                  ours_gn_profile_cpu_ms=statistics.median(cpu) * 1e3)

    blas, blas_text = blas_report()
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    result.update(threads=threads, blas=blas, omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                  torch_threads=torch_threads)

    def fmt(value, unit=""):
        return "n/a" if value is None else f"{value:.4g}{unit}"

    print(f"dgm-eit bench fem: {source}: {mesh.n_nodes} nodes, {mesh.n_elements} elements, "
          f"{protocol.n_meas} measurements")
    print(f"BLAS: {blas_text}; OMP_NUM_THREADS={result['omp_num_threads'] or 'unset'}; "
          f"torch threads: {'not loaded' if torch_threads is None else torch_threads}; "
          f"pyEIT: --threads {threads}; ours: 1 BLAS thread always")
    print(f"{'':24s}{'ours':>12s}{'pyEIT':>12s}{'speed-up':>10s}")
    for label, ours, theirs, speed, unit in (
            ("forward (16 exc.)", result["ours_forward_ms"], result["pyeit_forward_ms"], result["speedup_forward"], " ms"),
            ("Jacobian", result["ours_jacobian_ms"], result["pyeit_jacobian_ms"], result["speedup_jacobian"], " ms"),
            ("10 GN iterations", result["ours_gn10_s"], result["pyeit_gn10_s"], result["speedup_gn"], " s")):
        print(f"{label:24s}{fmt(ours, unit):>12s}{fmt(theirs, unit):>12s}{fmt(speed, 'x'):>10s}")
    print(f"  (GN: kotre p={p:g}, 10 full steps on sigma; pyEIT lamb={lamb:g}, ours lam={lam_ours:.4g} "
          f"(the same lamb*R at sigma=1); final images differ by {fmt(gn10_diff)} (relative L2))")
    g = gn_kwargs
    print(f"Gauss-Newton per image on the profile's mesh ({result['profile']}: {fm_p.mesh.n_nodes} nodes, "
          f"{fm_p.n_elements} elements; {g['method']} lam={g['lam']:.3g}, max_iter={g['max_iter']}, "
          f"line search {'on' if g['line_search'] else 'off'}; {result['profile_gn_iterations']:.2g} iterations "
          f"on average): {fmt(result['ours_gn_profile_ms'], ' ms')} per image in a run "
          f"({fmt(result['ours_gn_profile_cold_ms'], ' ms')} for the first; "
          f"CPU {fmt(result['ours_gn_profile_cpu_ms'], ' ms')} per image)")
    print(f"agreement with pyEIT: max rel. error v {fmt(result['max_rel_err_v'])}, "
          f"J {fmt(result['max_rel_err_jac'])}")
    if args.json:
        print(json.dumps(result))
    return 0
