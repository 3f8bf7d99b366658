"""``dgm-eit show FILE``: draw one sample (truth, Gauss-Newton image, voltages) to a PNG."""

from __future__ import annotations

import argparse

HELP = "draw one sample of a data set: ground truth, Gauss-Newton image and voltages"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="data-set HDF5 file written by dgm-eit simulate")
    parser.add_argument("--split", default="test", help="train | val | test (default: %(default)s)")
    parser.add_argument("--index", type=int, default=0, help="sample index in the split (default: %(default)s)")
    parser.add_argument("--out", default=None, help="image file (default: FILE-SPLIT-INDEX.png)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file that is not an image (the data set is never overwritten)")


def draw_sample(sample: dict, title: str, out) -> None:
    """Three panels: truth and GN image on one colour scale, noisy and clean voltages."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dgm_eit.files import atomic_path

    out = Path(out)
    size = sample["sigma"].shape[-1]
    c = (np.arange(size) + 0.5) / size * 2 - 1
    outside = np.add.outer(c**2, c**2) > 1
    # outside the disk is 0 by convention, not a conductivity: leave it blank so the
    # colour scale spans the values inside
    sigma, gn = (np.ma.masked_array(sample[k], outside) for k in ("sigma", "gn"))
    vmin = float(min(sigma.min(), gn.min()))
    vmax = float(max(sigma.max(), gn.max()))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for ax, image, name in ((axes[0], sigma, "ground truth"), (axes[1], gn, "Gauss-Newton")):
        # y up: row 0 is the top of the disk, as stored
        shown = ax.imshow(image, extent=(-1, 1, -1, 1), vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(name)
        ax.set_xticks([-1, 0, 1])
        ax.set_yticks([-1, 0, 1])
    fig.colorbar(shown, ax=axes[:2], shrink=0.8, label="conductivity")
    index = np.arange(len(sample["v"]))
    axes[2].plot(index, sample["v"], lw=0.8, label="noisy v")
    axes[2].plot(index, sample["v_clean"], lw=0.8, ls="--", label="clean v")
    axes[2].set_xlabel("measurement")
    axes[2].set_ylabel("voltage")
    axes[2].legend(loc="upper right")
    axes[2].set_title("boundary voltages")
    fig.suptitle(title)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=100)
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from dgm_eit.data import storage
    from dgm_eit.data.noise import measured_snr_db
    from dgm_eit.errors import InputError

    from dgm_eit.files import check_output, is_image_file

    path = Path(args.file)
    if args.out:   # refused before reading: the data set itself, a directory, a file of another kind
        check_output(args.out, inputs=[("FILE", path)], own_kind=is_image_file, kind="image file",
                     overwrite=args.overwrite)
    sizes = storage.split_sizes(path)
    if args.split not in sizes:
        raise InputError(f"unknown split {args.split!r}; choose one of {', '.join(storage.SPLITS)}")
    n = sizes[args.split]
    if not 0 <= args.index < n:
        raise InputError(f"--index {args.index} is out of range: split {args.split!r} has {n} samples")
    sample = {k: v[0] for k, v in storage.read_split(path, args.split, storage.ARRAY_KEYS, [args.index]).items()}
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}-{args.split}-{args.index}.png")
    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise InputError(f"--out {out}: use a .png, .pdf, .svg or .jpg file name")
    mse = float(np.mean((sample["gn"] - sample["sigma"]) ** 2))
    snr = float(measured_snr_db(sample["v_clean"], sample["v"]))
    draw_sample(sample, f"{path.name} {args.split}[{args.index}]: SNR {snr:.1f} dB, GN MSE {mse:.4f}", out)
    print(f"wrote {out}")
    return 0
