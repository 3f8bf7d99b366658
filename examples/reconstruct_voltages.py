"""Reconstruct your own voltage vectors with a trained model, from Python.

    python examples/reconstruct_voltages.py RUN_DIR [--voltages V.npy] [--out DIR]

RUN_DIR is one trained model: the ``--out`` of ``dgm-eit train``, or one of the
``DIR/runs/<model>_<set>`` directories of ``dgm-eit run`` (e.g. ``runs/quick/runs/cnf_2a_40dB``).

Voltages (one vector of M = 208 values per image for the study's 16 electrodes) are
**absolute** frames, not differences against a reference frame, in the order of the
``adjacent`` protocol (pyEIT's): value ``13 i + j`` is measured while unit current enters
electrode ``i`` and leaves electrode ``i + 1`` (mod 16); it is ``U[m+1] - U[m]`` for the
``j``-th electrode pair ``(m+1, m)``, m = 0..15, that touches neither current electrode.
Electrode 0 sits at ``[mesh] first_electrode_angle`` (0: the point (R, 0)) and electrodes are
numbered counter-clockwise. Units: a frame for unit current on a disk whose background
conductivity is 1 (the training phantoms'); a measured frame in volts at current I on a
background of conductivity s is ``v * s / I`` (2-D conduction is scale-free, so the disk's
radius does not change the values).

Without ``--voltages`` the script makes two such vectors itself with the package's FEM, from
phantoms it knows, so it can draw the truth beside the images. It writes ``OUT/voltages.npy``
(the vectors it reconstructed), ``OUT/images.npy`` (N, H, W), ``OUT/stds.npy`` (per-pixel std,
models that sample: CNF, score model) and ``OUT/reconstructions.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dgm_eit.data.noise import add_noise
from dgm_eit.data.phantoms import disk_mask, pixel_centres
from dgm_eit.physics import forward_model_from_config
from dgm_eit.reconstruct import load_voltages, reconstruct_voltages, save_user_output
from dgm_eit.report import comparison_figure
from dgm_eit.runs import load_run

# (centre x, centre y, radius, conductivity) in units of the disk radius; background 1
PHANTOMS = [[(-0.4, 0.3, 0.22, 1.5), (0.35, -0.3, 0.2, 0.5)],
            [(0.0, 0.5, 0.2, 0.5), (0.1, -0.35, 0.25, 1.5)]]


def phantom_values(circles, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Conductivity at points (x, y) of the unit disk."""
    sigma = np.ones(np.shape(x))
    for cx, cy, r, value in circles:
        sigma[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = value
    return sigma


def make_voltages(cfg: dict, snr_db: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(voltages (N, M), truth images (N, H, W))`` of :data:`PHANTOMS`, simulated as the
    training data were: on the run's finer ``[simulation]`` mesh, with white noise at ``snr_db``."""
    fm = forward_model_from_config(cfg, "simulation")
    centres = fm.mesh.centroids / fm.mesh.radius
    rng = np.random.default_rng(seed)
    voltages = np.stack([add_noise(fm.forward(phantom_values(c, centres[:, 0], centres[:, 1])), snr_db, rng)
                         for c in PHANTOMS])
    size = int(cfg["data"]["image_size"])
    x, y = pixel_centres(size)
    truths = np.stack([np.where(disk_mask(size), phantom_values(c, x, y), 0.0) for c in PHANTOMS])
    return voltages, truths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a trained model's run directory")
    parser.add_argument("--voltages", type=Path, help=".npy file of (M,) or (N, M) absolute voltages")
    parser.add_argument("--out", type=Path, default=Path("quickstart_out"), help="output folder")
    parser.add_argument("--samples", type=int, default=None, help="posterior samples per image (CNF, score model)")
    parser.add_argument("--sampler", default=None, help="score model only: csd, dds, dps, pc or ode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, cfg, _ = load_run(args.run_dir)   # the model's config: its mesh, protocol, image size, noise
    if args.voltages is None:
        voltages, truths = make_voltages(cfg, float(cfg["data"]["snr_db"]), args.seed)
    else:
        voltages, truths = load_voltages(args.voltages)[0], None
    result = reconstruct_voltages(args.run_dir, voltages, n_samples=args.samples, sampler=args.sampler,
                                  seed=args.seed)
    images, stds = result["recon"], result.get("recon_std")   # (N, H, W) each; no std for one-shot models

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "voltages.npy", voltages)
    np.save(args.out / "images.npy", images)
    if stds is not None:
        np.save(args.out / "stds.npy", stds)
    figure = args.out / "reconstructions.png"
    name = model.name + (f" ({args.sampler})" if args.sampler else "")
    if truths is None:
        save_user_output(figure, result, single=False)
    else:
        comparison_figure(figure, truths, {name: images}, {name: stds} if stds is not None else {},
                          f"{args.run_dir.name}: two phantoms simulated by the example", row_label="phantom")
        mse = ((images - truths) ** 2).mean(axis=(1, 2))
        print("MSE per image: " + ", ".join(f"{m:.4g}" for m in mse))
    print(f"{len(images)} image(s) of {images.shape[1]} x {images.shape[2]} px, "
          f"{result['seconds_per_image'] * 1000:.0f} ms each; wrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
