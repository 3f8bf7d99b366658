"""Which model errors does the KTC2023 tank have that our simulation lacks? Probes for issue 20.

Five parts; each prints its figures (nothing is written):

``reference``: how much of the misfit of ``ref.mat`` (the empty tank) each nuisance explains,
by least squares on the simulation mesh (only the reference frame is used, as every
evaluation set ships one): the homogeneous fit the study uses (background and one contact
impedance), then per-electrode contact impedances, per-electrode positions (the mesh deformed
smoothly, so the fit stays differentiable), positions and widths.

``mesh``: the simulation mesh's own error: the ktc profile's phantoms (validation split of
``--seed``) simulated on meshes of ``--h0s`` (each with the background and contact impedance
fitted to ``ref.mat`` on it, as the study's tank does), every clean difference-voltage vector
compared with the finest mesh's: relative rms error and rms error in units of the noise model.

``targets``: the four public targets' measured difference voltages (level 1) against the
simulation of their truths (each class map on the simulation mesh's element centres, plastic and
metal at ``--resistive`` / ``--conductive`` x the water), the relative misfit as it is, with the
best scalar gain, and with the best change of the water's conductivity in the target's frame
(a grid of ``--drifts``), beside each target's share of the disk covered by objects (what a water
level raised by them would predict). It reads the truths: a diagnosis, never a setting.

``noise``: a size for ``tank.noise_scale`` from the reference frame alone: the homogeneous model
misfits ``ref.mat`` by a relative residual eps (7.8%); if the difference voltages carry the same
relative model error, its rms over ``--samples`` training phantoms of the profile, ``eps x rms(dv)``,
in units of the organisers' noise model's rms is the scale the simulated noise needs to be as large
as that error (per sample: how much it varies with the phantom). No target is read.

``study --run DIR``: on a finished ``dgm-eit run --profile ktc`` study, with the linearised
step's prior and every threshold chosen on ``val[:48]`` (as the study does) and scores on
``val[48:]``, which no choice saw; the four public targets are a development check only:

- ``gain``: per-channel gains of the spread the reference misfit shows, applied to the
  validation data and to a simulated reference frame; then the data calibrated by that frame
  (``dv * U_model / U_ref``), as the real targets would be by ``ref.mat``. Both for every
  method in ``--methods``, with the study's own chosen settings;
- ``approximation error`` (Kaipio and Somersalo): ``e = v_clean - J0 (x - 1)`` over ``--samples``
  training samples (the fine simulation against the coarse linear model), its mean subtracted
  from the data and its covariance added to the noise's (Woodbury; ``--ae-parts`` mean, cov or
  both); linearised step only, its prior re-chosen on validation.

    python benchmarks/ktc_model_error.py reference
    python benchmarks/ktc_model_error.py mesh --h0s 0.003,0.002,0.0015,0.001
    python benchmarks/ktc_model_error.py targets
    python benchmarks/ktc_model_error.py noise --samples 1000
    python benchmarks/ktc_model_error.py study --run runs/ktc --methods linear,cvae,cnf
"""

import argparse
import time

import numpy as np
import scipy.linalg as la
from scipy.optimize import least_squares

from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.ktc.nuisance import moved_electrodes
from dgm_eit.physics.fem import ForwardModel

SIM_H0 = 0.003   # the ktc profile's simulation mesh
PRIOR_STDS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
CORR_LENGTHS = (0.03, 0.06, 0.1)
N_CHOOSE, N_VAL = 48, 100


# --- reference ---------------------------------------------------------------------------

class ReferenceFit:
    """Least-squares fits of nuisance parameters to ``ref.mat`` on the simulation mesh."""

    def __init__(self):
        from dgm_eit.ktc.tank import public_dir

        ref = ktc.load_reference(public_dir() / "ref.mat")
        self.protocol = ktc.tank_protocol(ref.injections, ref.pattern)
        self.mask = ref.mask(1)
        self.u = ref.voltages[self.mask]
        self.mesh = ktc.tank_mesh(SIM_H0)

    def voltages(self, log_sigma, z, mesh=None) -> np.ndarray:
        mesh = mesh or self.mesh
        fm = ForwardModel(mesh, self.protocol, electrode_model="cem", contact_impedance=z)
        return fm.forward(np.full(mesh.n_elements, 10.0 ** log_sigma))[self.mask]

    def fit(self, name: str, model, p0, low, high):
        start = time.perf_counter()
        norm = np.linalg.norm(self.u)
        sol = least_squares(lambda p: (model(p) - self.u) / norm, p0, bounds=(low, high), diff_step=1e-4,
                            x_scale="jac", max_nfev=60)
        print(f"{name:52s} relative residual {np.linalg.norm(sol.fun):.4f}  ({len(p0)} parameters, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
        return sol.x


def run_reference(args) -> None:
    fit = ReferenceFit()
    n = ktc.N_ELECTRODES
    s0, z0 = np.log10(0.77), 1e-6
    fit.fit("background (contact impedance 1e-6, as the study)", lambda p: fit.voltages(p[0], z0), [s0], [-2], [2])
    x = fit.fit("+ one contact impedance per electrode", lambda p: fit.voltages(p[0], 10.0 ** p[1:]),
                np.r_[s0, np.full(n, -6.0)], np.r_[-2, np.full(n, -9.0)], np.r_[2, np.zeros(n)])
    print(f"    log10 z per electrode: {np.round(x[1:], 1).tolist()}")
    step = 0.05   # radians: 5.8 mm along the wall
    x = fit.fit("+ electrode positions (one shift per electrode)",
                lambda p: fit.voltages(p[0], z0, moved_electrodes(fit.mesh, p[1:])),
                np.r_[s0, np.zeros(n)], np.r_[-2, np.full(n, -step)], np.r_[2, np.full(n, step)])
    print(f"    shifts (mm along the wall): {np.round(x[1:] * ktc.TANK_RADIUS * 1e3, 1).tolist()}")
    x = fit.fit("+ electrode positions and widths",
                lambda p: fit.voltages(p[0], z0, moved_electrodes(fit.mesh, p[1:n + 1], np.exp(p[n + 1:]))),
                np.r_[s0, np.zeros(2 * n)], np.r_[-2, np.full(n, -step), np.full(n, -0.7)],
                np.r_[2, np.full(n, step), np.full(n, 0.7)])
    print(f"    width factors: {np.round(np.exp(x[n + 1:]), 2).tolist()}")


# --- study -------------------------------------------------------------------------------

def scores(images, low, high, truths) -> np.ndarray:
    from dgm_eit.ktc.segment import segment_images

    return np.array([ktc.score(c, t) for c, t in zip(segment_images(images, low, high), truths)])


def interval(diff, seed: int) -> str:
    from dgm_eit.stats import mean_interval

    iv = mean_interval(diff, seed=seed)
    return f"{iv.change:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"


def calibration(u_model, u_ref) -> np.ndarray:
    """Per-channel factors ``u_model / u_ref`` where both exceed 1% of their largest value and
    the factor lies in [0.5, 2]; 1 elsewhere (tiny channels carry no usable ratio)."""
    big = (np.abs(u_model) > 0.01 * np.abs(u_model).max()) & (np.abs(u_ref) > 0.01 * np.nanmax(np.abs(u_ref)))
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(big, u_model / u_ref, 1.0)
    return np.where(np.isfinite(f) & (f > 0.5) & (f < 2.0), f, 1.0)


def linear_reconstructor(tank, error_mean=None, error_factor=None, error_std=None):
    """The study's linearised step, or its approximation-error form: data minus ``error_mean``,
    noise covariance ``S + F F^T`` (``error_factor`` F, M x K), or ``S + diag(error_std^2)``."""
    from dgm_eit.ktc.tank import DifferenceReconstructor

    class WithModelError(DifferenceReconstructor):
        def __init__(self, *args):
            super().__init__(*args)
            if error_std is not None:
                self.weights = 1.0 / (tank.noise_std ** 2 + error_std ** 2)

        def _step_matrix(self, J, mask):
            if error_factor is None:
                return super()._step_matrix(J, mask)
            Jm, s, F = J[mask], tank.noise_std[mask] ** 2, error_factor[mask]
            JtSi, SiF = Jm.T / s[None, :], F / s[:, None]
            JtW = JtSi - (JtSi @ F) @ la.cho_solve(la.cho_factor(np.eye(F.shape[1]) + F.T @ SiF), SiF.T)
            return la.solve(JtW @ Jm + self.prior_precision, JtW, assume_a="sym")

        def linear(self, dv, mask=None):
            if error_mean is not None:
                dv = np.asarray(dv, dtype=np.float64) - error_mean
            return super().linear(dv, mask)

    return WithModelError


def run_study(args) -> None:
    from pathlib import Path

    from dgm_eit.data.storage import read_split
    from dgm_eit.ktc.segment import tune_thresholds, upsample
    from dgm_eit.ktc.study import Methods, as_method, data_path, load_study, real_targets
    from dgm_eit.ktc.tank import public_dir

    cfg, chosen = load_study(args.run)
    methods = Methods(cfg, Path(args.run), seed=args.study_seed)
    sim, tank = methods.sim, methods.sim.tank
    rng = np.random.default_rng(args.seed)
    val = [sim.measure(args.study_seed, "val", i) for i in range(N_VAL)]
    truths = np.stack([sim.truth_classes(args.study_seed, "val", i) for i in range(N_VAL)])
    masks, v_clean = np.stack([r["mask"] for r in val]), np.stack([r["v_clean"] for r in val])
    numbers, real = real_targets(public_dir(), cfg["run"]["levels"])
    held = slice(N_CHOOSE, N_VAL)

    def public(reconstruct, low, high, factor=1.0) -> float:
        return sum(scores(reconstruct(d["dv"] * factor, d["masks"]), low, high,
                          [real["truths"][n] for n in numbers]).sum() for d in real["levels"].values())

    # gain: the spread of log(U_ref / U_model) on channels above 5% of the largest
    ratio = tank.ref.voltages / tank.u_water
    big = np.abs(tank.u_water) > 0.05 * np.abs(tank.u_water).max()
    spread = float(np.std(np.log(np.abs(ratio[big]))))
    gains = np.exp(spread * rng.standard_normal(v_clean.shape))
    noise = tank.noise_std * rng.standard_normal(v_clean.shape)
    with_gain = np.where(masks, gains * v_clean + noise, 0.0)
    ref_frames = gains * tank.u_water + tank.noise_std * rng.standard_normal(v_clean.shape)
    calibrated = with_gain * np.stack([calibration(tank.u_water, f) for f in ref_frames])
    real_factor = calibration(tank.u_water, tank.ref.voltages)
    print(f"gain probe: log(U_ref / U_model) spread {spread:.3f} on channels above 5% of the largest; scores on "
          f"val[{N_CHOOSE}:{N_VAL}] (mean challenge score per image) and public totals / 28", flush=True)
    clean = np.stack([r["v"] for r in val])
    for key in filter(None, args.methods.split(",")):
        m = as_method(key)
        record = chosen[key]["seeds"][0] if m.seeded else chosen[key]

        def reconstruct(dv, mk, m=m, record=record):
            return methods.reconstruct(m, dv, mk, record, 0)["recon"]

        s = {name: scores(reconstruct(dv[held], masks[held]), record["low"], record["high"], truths[held])
             for name, dv in (("clean", clean), ("gain", with_gain), ("calibrated", calibrated))}
        print(f"  {key:8s} val clean {s['clean'].mean():.3f}, with gains {interval(s['gain'] - s['clean'], args.seed)}, "
              f"calibrated {interval(s['calibrated'] - s['clean'], args.seed)}; public "
              f"{public(reconstruct, record['low'], record['high']):.2f}, calibrated by ref.mat "
              f"{public(reconstruct, record['low'], record['high'], real_factor):.2f}", flush=True)

    # approximation error of the linear model
    train = read_split(data_path(Path(args.run)), "train", keys=("sigma", "v_clean"), indices=slice(0, args.samples))
    base = linear_reconstructor(tank)(tank, 1.0, 0.1)
    x = train["sigma"].reshape(len(train["sigma"]), -1)[:, base.inside].astype(np.float64)
    errors = train["v_clean"].astype(np.float64) - (x - 1.0) @ base.J0.T
    mean = errors.mean(0)
    factor = (errors - mean).T / np.sqrt(len(errors) - 1)
    rms = np.sqrt((errors ** 2).mean()) / np.sqrt((tank.noise_std ** 2).mean())
    print(f"approximation error over {len(errors)} training samples: rms {rms:.0f} x the noise's; the linearised "
          f"step's prior chosen on val[:{N_CHOOSE}] per variant", flush=True)
    variants = {"nominal": (None, None), "mean": (mean, None), "cov": (None, factor), "both": (mean, factor)}
    # the empty tank's measured misfit as a per-channel error std, times beta (ref.mat alone, no truth)
    misfit = np.abs(tank.ref.voltages - tank.u_water)
    for beta in args.misfit_betas:
        variants[f"misfit x {beta:g}"] = (None, None, beta * misfit)
        # the same error energy spread evenly: what the weighting adds beyond its overall level
        variants[f"flat x {beta:g}"] = (None, None, np.full_like(misfit, beta * np.sqrt(np.mean(misfit ** 2))))
    kept = {}
    parts = [p for p in args.ae_parts.split(",") if p]
    parts += [f"{kind} x {b:g}" for b in args.misfit_betas for kind in ("misfit", "flat")]
    for name in ["nominal", *parts]:
        cls, best = linear_reconstructor(tank, *variants[name]), None
        for length in CORR_LENGTHS:
            for std in PRIOR_STDS:
                rec = cls(tank, std, length)
                images = np.stack([rec.linear(d, k) for d, k in zip(clean[:N_CHOOSE], masks[:N_CHOOSE])])
                seg = tune_thresholds(upsample(images), truths[:N_CHOOSE])
                if best is None or seg["score"] > best[0]["score"]:
                    best = (seg, rec)
        seg, rec = best

        def reconstruct(dv, mk, rec=rec):
            return np.stack([rec.linear(d, k) for d, k in zip(dv, mk)])

        kept[name] = scores(reconstruct(clean[held], masks[held]), seg["low"], seg["high"], truths[held])
        vs = "" if name == "nominal" else f" ({interval(kept[name] - kept['nominal'], args.seed)} vs nominal)"
        print(f"  {name:13s} prior std {rec.prior_std:g}, length {rec.corr_length:g} m: val {kept[name].mean():.3f}{vs}; "
              f"public {public(reconstruct, seg['low'], seg['high']):.2f}", flush=True)


# --- mesh -------------------------------------------------------------------------------

def run_mesh(args) -> None:
    import copy

    from dgm_eit.config import load_config
    from dgm_eit.ktc.simulate import KTCSimulator

    h0s = sorted(args.h0s, reverse=True)
    clean, noise = {}, None
    for h0 in h0s:
        cfg = copy.deepcopy(load_config("ktc"))
        cfg["tank"]["sim_h0"] = h0
        start = time.perf_counter()
        sim = KTCSimulator(cfg)
        clean[h0] = np.stack([sim.measure(args.seed, "val", i)["v_clean"] for i in range(args.samples)])
        noise = sim.tank.noise_std if noise is None else noise
        print(f"sim_h0 {h0:g} m: {sim.tank.fine.mesh.n_nodes} nodes, background {sim.tank.sigma_bg:.4f} S/m, "
              f"fit to ref.mat {sim.tank.fit.residual:.4f}, {args.samples} samples in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    finest = clean[h0s[-1]]
    rms_finest, rms_noise = np.sqrt((finest ** 2).mean(axis=1)), np.sqrt((noise ** 2).mean())
    for h0 in h0s[:-1]:
        err = np.sqrt(((clean[h0] - finest) ** 2).mean(axis=1))
        rel = err / rms_finest
        print(f"sim_h0 {h0:g} m vs {h0s[-1]:g} m: difference voltages off by {np.median(rel):.1%} rms (median; "
              f"{np.percentile(rel, 10):.1%}-{np.percentile(rel, 90):.1%} for 80% of samples), "
              f"{np.median(err) / rms_noise:.1f} x the noise model's rms")


# --- noise ------------------------------------------------------------------------------

def run_noise(args) -> None:
    from dgm_eit.config import load_config
    from dgm_eit.ktc.simulate import KTCSimulator

    cfg = load_config("ktc")
    cfg["tank"]["noise_scale"] = 1.0   # the organisers' model, the unit of the scale
    sim = KTCSimulator(cfg)
    tank = sim.tank
    clean = np.stack([sim.measure(args.seed, "train", i)["v_clean"] for i in range(args.samples)])
    eps, rms_noise = tank.fit.residual, np.sqrt((tank.noise_std ** 2).mean())
    misfit, rms_dv = np.sqrt(np.mean((tank.ref.voltages - tank.u_water) ** 2)), np.sqrt((clean ** 2).mean())
    per_sample = eps * np.sqrt((clean ** 2).mean(axis=1)) / rms_noise
    print(f"ref.mat: relative residual eps {eps:.2%}, {misfit * 1e3:.1f} mV rms, {misfit / rms_noise:.0f} x the "
          f"noise model's rms ({rms_noise * 1e3:.3f} mV)")
    print(f"{args.samples} training phantoms: difference voltages {rms_dv * 1e3:.1f} mV rms; eps x that = "
          f"{eps * rms_dv / rms_noise:.1f} x the noise model's rms (per sample: median {np.median(per_sample):.1f}, "
          f"10-90% {np.percentile(per_sample, 10):.1f}-{np.percentile(per_sample, 90):.1f})")


# --- targets ----------------------------------------------------------------------------

def run_targets(args) -> None:
    from dgm_eit.config import load_config
    from dgm_eit.ktc.simulate import KTCSimulator
    from dgm_eit.ktc.study import real_targets
    from dgm_eit.ktc.tank import public_dir

    sim = KTCSimulator(load_config("ktc"))
    tank, mesh = sim.tank, sim.tank.fine.mesh
    centres = mesh.nodes[mesh.elements].mean(axis=1) / ktc.TANK_RADIUS
    # the truths' pixel grid: row 0 at the top (y = +R), as the challenge's images
    col = np.clip(((centres[:, 0] + 1) / 2 * ktc.IMAGE_SIZE).astype(int), 0, ktc.IMAGE_SIZE - 1)
    row = np.clip(((1 - centres[:, 1]) / 2 * ktc.IMAGE_SIZE).astype(int), 0, ktc.IMAGE_SIZE - 1)
    numbers, real = real_targets(public_dir(), [1])
    level = real["levels"][1]
    disk = np.pi * (ktc.IMAGE_SIZE / 2) ** 2
    for k, n in enumerate(numbers):
        truth = real["truths"][n]
        classes = truth[row, col]
        relative = np.where(classes == 1, args.resistive, np.where(classes == 2, args.conductive, 1.0))
        keep = level["masks"][k]
        measured = level["dv"][k][keep]
        norm = np.linalg.norm(measured)

        def simulated(drift: float) -> np.ndarray:
            return (tank.fine.forward(tank.sigma_bg * (1 + drift) * relative) - tank.u_water)[keep]

        plain = simulated(0.0)
        gain = plain @ measured / (plain @ plain)
        misfits = [(np.linalg.norm(simulated(d) - measured) / norm, d) for d in args.drifts]
        best, drift = min(misfits)
        share = (truth > 0).sum() / disk
        print(f"target {n}: |dv| rms {np.sqrt((measured ** 2).mean()) * 1e3:.1f} mV, simulated truth misfits by "
              f"{np.linalg.norm(plain - measured) / norm:.1%} ({np.sqrt(((plain - measured) ** 2).mean()) / np.sqrt((tank.noise_std[keep] ** 2).mean()):.0f} x the noise); "
              f"best gain {gain:.3f}: {np.linalg.norm(gain * plain - measured) / norm:.1%}; best water change "
              f"{drift:+.1%}: {best:.1%}; objects cover {share:.1%} of the disk (a water level they raise: "
              f"{share / (1 - share):+.1%})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("reference", help="nuisance fits to ref.mat")
    me = sub.add_parser("mesh", help="the simulation mesh's error in the difference voltages")
    me.add_argument("--h0s", type=lambda t: [float(h) for h in t.split(",")], default=[0.003, 0.002, 0.0015, 0.001],
                    help="mesh sizes (m); the finest is the reference")
    me.add_argument("--samples", type=int, default=40, help="validation phantoms")
    me.add_argument("--seed", type=int, default=0, help="the data set's seed (its validation phantoms)")
    ta = sub.add_parser("targets", help="the public targets' data against the simulation of their truths")
    ta.add_argument("--resistive", type=float, default=0.001, help="plastic's conductivity / the water's")
    ta.add_argument("--conductive", type=float, default=100.0, help="metal's conductivity / the water's")
    ta.add_argument("--drifts", type=lambda t: [float(d) for d in t.split(",")],
                    default=[round(d, 3) + 0.0 for d in np.arange(-0.05, 0.2001, 0.005)],
                    help="relative changes of the water's conductivity tried for the target's frame")
    no = sub.add_parser("noise", help="a noise scale from the reference frame's relative misfit")
    no.add_argument("--samples", type=int, default=1000, help="training phantoms")
    no.add_argument("--seed", type=int, default=0, help="the data set's seed (its training phantoms)")
    st = sub.add_parser("study", help="gain and approximation-error probes on a finished KTC study")
    st.add_argument("--run", required=True, help="a finished dgm-eit run --profile ktc directory")
    st.add_argument("--study-seed", type=int, default=0, help="the study's --seed (its validation data)")
    st.add_argument("--methods", default="linear", help="comma-separated methods of the gain probe")
    st.add_argument("--samples", type=int, default=1000, help="training samples of the approximation error")
    st.add_argument("--ae-parts", default="mean,cov,both", help="approximation-error variants")
    st.add_argument("--misfit-betas", type=lambda t: [float(b) for b in t.split(",") if b], default=[],
                    help="variants whose data term adds to the noise model's std beta x |ref.mat - simulated empty "
                         "tank| per channel, or beta x its rms on every channel ('nominal': the study's own)")
    st.add_argument("--seed", type=int, default=0, help="seed of the gains and of the bootstrap")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        parts = {"reference": run_reference, "mesh": run_mesh, "targets": run_targets, "noise": run_noise,
                 "study": run_study}
        parts[args.part](args)


if __name__ == "__main__":
    main()
