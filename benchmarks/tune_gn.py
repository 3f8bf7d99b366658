"""Scan Gauss-Newton settings on simulated phantoms (data on the finer simulation mesh).

Each setting is ``method:lam[:p[:max_iter[:lam_decay[:lam_min]]]]``; the other [gn] keys
come from the profile. Prints the mean image MSE (full image, as the paper) per setting,
and the "mesh floor": the MSE of the truth averaged onto the inversion mesh and drawn back,
which no reconstruction on that mesh can beat.

    python benchmarks/tune_gn.py --profile paper --anomalies 2 --snr 40 --samples 8 \\
        kotre:2 kotre:5 lm:10 smooth:5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dgm_eit.config import load_config
from dgm_eit.data.simulate import Simulator, add_noise, sample_rng
from dgm_eit.recon import gauss_newton, gn_config
from dgm_eit.runtime import limit_threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--anomalies", type=int, default=2)
    parser.add_argument("--snr", type=float, default=40.0)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    cfg = load_config(args.profile, [f"data.anomalies={args.anomalies}", f"data.snr_db={args.snr}"])
    sim = Simulator(cfg)
    print(f"{args.profile}: inversion {sim.coarse.mesh}, data {sim.fine.mesh}, {sim.image_size} px, "
          f"{args.anomalies} anomalies, {args.snr:g} dB, {args.samples} samples")
    samples = []
    for i in range(args.samples):
        rng = sample_rng(args.seed, "val", i)
        phantom = sim.sampler.sample(rng)
        v = add_noise(sim.fine.forward(phantom.on_elements(sim.quad_points)), args.snr, rng)
        samples.append((v, phantom.rasterise(sim.image_size, sim.supersample, inside=sim.inside)))
    floor = np.mean([np.mean((sim.grid.to_image(sim.grid.to_elements(t)) - t) ** 2) for _, t in samples])
    print(f"mesh floor MSE {floor:.5f}")
    names = ("method", "lam", "p", "max_iter", "lam_decay", "lam_min")
    for setting in args.settings:
        kwargs = gn_config(cfg)
        for name, text in zip(names, setting.split(":")):
            kwargs[name] = text if name == "method" else type(kwargs[name])(float(text))
        start = time.perf_counter()
        errors = [np.mean((sim.grid.to_image(gauss_newton(sim.coarse, v, **kwargs).sigma) - t) ** 2)
                  for v, t in samples]
        ms = (time.perf_counter() - start) / len(samples) * 1e3
        print(f"{setting:32s} MSE {np.mean(errors):.5f} +- {np.std(errors):.5f}   {ms:.0f} ms/image", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
