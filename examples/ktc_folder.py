"""The KTC2023 entry point from Python: a folder of measurements -> images, std maps, classes.

    python examples/ktc_folder.py STUDY_DIR INPUT_DIR LEVEL [--method cnf] [--out DIR]

STUDY_DIR is made by ``dgm-eit run --profile ktc --out STUDY_DIR``. INPUT_DIR holds the
challenge's files: ``ref.mat`` (the empty tank, ``Uelref``) and ``data<n>.mat`` (``Uel``: 76
injections x 31 adjacent differences = 2,356 values in volts, injection-major, NaN where the
level's removed electrodes were); the shipped public targets are in
``dgm_eit/ktc/public/`` (``dgm_eit.ktc.tank.public_dir()``). The methods reconstruct the
**difference** ``Uel - Uelref`` as sigma / sigma_water (water 1); LEVEL 1..7 drops electrodes
1..2(LEVEL-1). Writes ``OUT/<n>.mat`` (the challenge's format: 256 x 256 uint8 classes, 0
water, 1 resistive, 2 conductive), ``OUT/images.npy``, ``OUT/stds.npy`` (CNF, CSD*) and
``OUT/ktc.png``; the classes are scored when ``true<n>.mat`` files lie beside the data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dgm_eit.datasets import ktc2023
from dgm_eit.figures import CLASS_NAMES, DPI, class_colour_map, colour_map, outside_masked
from dgm_eit.ktc.entry import reconstruct_folder


def plot(path: Path, made, level: int, scores: dict[int, float]) -> None:
    """One column per target: image, std map (sampling methods) and classes with its score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("sigma / sigma_water", outside_masked(made.recon), colour_map("RdBu_r"), (0.0, 2.0))]
    if made.recon_std is not None:
        std = outside_masked(made.recon_std)
        rows.append(("per-pixel std", std, colour_map("magma"), (0.0, float(np.nanmax(std)))))
    rows.append(("classes", outside_masked(made.classes), class_colour_map(), (-0.5, 2.5)))
    fig, axes = plt.subplots(len(rows), len(made.numbers), figsize=(2.0 * len(made.numbers) + 1.5, 2.0 * len(rows)),
                             squeeze=False, layout="constrained")
    for r, (label, images, cmap, (vmin, vmax)) in enumerate(rows):
        for c, n in enumerate(made.numbers):
            ax = axes[r, c]
            im = ax.imshow(images[c], vmin=vmin, vmax=vmax, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"data{n}.mat", fontsize=9)
            if label == "classes" and n in scores:
                ax.set_xlabel(f"score {scores[n]:.3f}", fontsize=8)
        bar = fig.colorbar(im, ax=list(axes[r]), label=label, shrink=0.9)
        if label == "classes":
            bar.set_ticks([0, 1, 2], labels=CLASS_NAMES)
    fig.suptitle(f"{made.name} at level {level} (score on simulated validation data "
                 f"{made.val_score:.3f})", fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path, help="made by dgm-eit run --profile ktc")
    parser.add_argument("input_dir", type=Path, help="ref.mat and data<n>.mat")
    parser.add_argument("level", type=int, help="1..7")
    parser.add_argument("--method", default=None, help="a method the study ran (default: the study's, see dgm-eit ktc --help)")
    parser.add_argument("--out", type=Path, default=Path("ktc_out"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    made = reconstruct_folder(args.input_dir, args.level, args.study_dir, output_dir=args.out,
                              method=args.method, seed=args.seed)
    np.save(args.out / "images.npy", made.recon)            # (N, 32, 32) sigma / sigma_water
    if made.recon_std is not None:
        np.save(args.out / "stds.npy", made.recon_std)
    scores = {n: ktc2023.score(classes, ktc2023.load_truth(args.input_dir / f"true{n}.mat"))
              for n, classes in zip(made.numbers, made.classes) if (args.input_dir / f"true{n}.mat").is_file()}
    plot(args.out / "ktc.png", made, args.level, scores)
    for n in made.numbers:
        print(f"data{n}.mat -> {args.out / f'{n}.mat'}" + (f"  score {scores[n]:.3f}" if n in scores else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
