"""``report.md``, ``scores.csv`` and the figure of a KTC study directory."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from dgm_eit.files import atomic_path, write_text
from dgm_eit.ktc import METHOD_NAMES
from dgm_eit.ktc.segment import disk as segment_disk

LEADERBOARD = ("all-background prediction 6.70 / 21; official linearised baseline + Otsu 10.31; "
               "1st place (post-processing UNet, Bremen/UCL) 15.24 (all 7 levels of the hidden evaluation "
               "targets, not the public ones scored here)")


def _scores_csv(results: dict) -> str:
    """Scores only: the same study gives the same bytes (times are in ``timings.json``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "level", "target", "score"])
    for method, per_level in results["methods"].items():
        for level, r in per_level.items():
            for n, s in zip(results["numbers"], r["scores"]):
                writer.writerow([method, level, n, f"{s:.6f}"])
    return buf.getvalue()


def _seconds_per_image(results: dict) -> dict:
    return {method: {str(level): r["seconds_per_image"] for level, r in per_level.items()}
            for method, per_level in results["methods"].items()}


def _figure(path: Path, results: dict, level: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = results["numbers"]
    methods = list(results["methods"])
    rows = [("truth", None, None)]
    for m in methods:
        rows.append((f"{METHOD_NAMES[m]} image", m, "recon"))
        rows.append((f"{METHOD_NAMES[m]} classes", m, "classes"))
        if "recon_std" in results["methods"][m][level]:
            rows.append((f"{METHOD_NAMES[m]} std", m, "recon_std"))
    fig, axes = plt.subplots(len(rows), len(numbers), figsize=(2.0 * len(numbers), 2.0 * len(rows)), squeeze=False)
    for r, (label, m, key) in enumerate(rows):
        for c, n in enumerate(numbers):
            ax = axes[r, c]
            if m is None:
                ax.imshow(results["truths"][n], vmin=0, vmax=2, cmap="viridis")
                ax.set_title(f"target {n}", fontsize=9)
            else:
                data = results["methods"][m][level]
                if key == "classes":
                    ax.imshow(data[key][c], vmin=0, vmax=2, cmap="viridis")
                    ax.set_title(f"{data['scores'][c]:.3f}", fontsize=8)
                elif key == "recon_std":
                    image = data[key][c]
                    ax.imshow(np.where(segment_disk(image.shape[-1]), image, np.nan), cmap="magma")
                else:
                    image = data[key][c]
                    inside = segment_disk(image.shape[-1])
                    ax.imshow(np.where(inside, image, np.nan), vmin=0, vmax=2, cmap="RdBu_r")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"KTC2023 public targets, level {level} (classes: 0 water, 1 resistive, 2 conductive; images: "
                 "sigma / sigma_water, 0-2)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def write_report(out: Path, cfg: dict, methods, chosen: dict, results: dict, manifest: dict) -> dict:
    out = Path(out)
    levels = sorted({level for per_level in results["methods"].values() for level in per_level})
    numbers = results["numbers"]
    write_text(out / "scores.csv", _scores_csv(results))
    figure_level = int(cfg["run"]["figure_level"]) if int(cfg["run"]["figure_level"]) in levels else levels[0]
    figure = out / "figures" / f"ktc_level{figure_level}.png"
    _figure(figure, results, figure_level)

    lin = methods.linear_settings
    lines = ["# KTC2023 water tank: linearised, GN, CVAE, CNF and CSD* on the four public targets", "",
             f"`dgm-eit run --profile {cfg.get('profile', 'ktc')} --seed {manifest['seed']}`. Scores are the "
             "challenge's (per target: mean SSIM of the conductive and the resistive maps, at most 1; "
             f"{len(numbers)} targets per level, so at most {len(numbers)} per level).", "",
             "**Nothing here was tuned on the real targets.** Every method's settings (the linearised step's prior, "
             "GN's iteration count, CSD*'s t0) and its segmentation thresholds were chosen on simulated validation "
             f"data (the first {cfg['run']['tune_images']} validation images of `data/ktc.h5`) by the same score; "
             "the real targets are only scored.", "",
             "## Scores (sum over the targets, per level)", ""]
    head = "| method | " + " | ".join(f"level {k}" for k in levels) + " | total |"
    lines += [head, "|---" * (len(levels) + 2) + "|"]
    for m, per_level in results["methods"].items():
        sums = [sum(per_level[k]["scores"]) for k in levels]
        lines.append(f"| {METHOD_NAMES[m]} | " + " | ".join(f"{s:.2f}" for s in sums) + f" | **{sum(sums):.2f}** |")
    lines += ["", f"Maximum {len(numbers)} per level, {len(numbers) * len(levels)} in total. For orientation, the "
              "organisers' linearised baseline scores 2.99 / 4 on these targets at level 1 (our count). Leaderboard "
              f"(hidden targets): {LEADERBOARD}.", "", f"## Level {levels[0]}, per target", ""]
    lines += ["| method | " + " | ".join(f"target {n}" for n in numbers) + " | s per image |",
              "|---" * (len(numbers) + 2) + "|"]
    for m, per_level in results["methods"].items():
        r = per_level[levels[0]]
        lines.append(f"| {METHOD_NAMES[m]} | " + " | ".join(f"{s:.3f}" for s in r["scores"])
                     + f" | {r['seconds_per_image']:.3f} |")
    lines += ["", "## Settings, all chosen on simulated validation data", ""]
    if lin:
        lines.append(f"- {lin['tank']}.")
        if lin.get("tuned"):
            lines.append(f"- Linearised step (every model's conditioning image): Gaussian smoothness prior, std "
                         f"{lin['prior_std']:g}, correlation length {lin['corr_length']:g} m, chosen on "
                         f"{lin['tuned_on']} from {len(lin['candidates'])} candidates (val score {lin['val_score']:.3f}).")
    lines += ["", "| method | own settings | low / high threshold | val score | val resistive | val conductive |",
              "|---|---|---|---|---|---|"]
    for m in results["methods"]:
        c = chosen[m]
        own = ", ".join(f"{k} = {c[k]:.3g}" for k in ("iterations", "prior_std", "t0", "n_steps", "dc_weight")
                        if k in c) or "-"
        lines.append(f"| {METHOD_NAMES[m]} | {own} | {c['low']:g} / {c['high']:g} | {c['score']:.3f} | "
                     f"{c['resistive']:.3f} | {c['conductive']:.3f} |")
    if "linear_model" in chosen.get("csd", {}):
        lm = chosen["csd"]["linear_model"]
        lines += ["", f"CSD* samples with a data-consistency step at every reverse step (`dds`): the linearised model "
                  f"in the models' representation, dv ~ {lm['gain']:.3g} J (x - 1), fitted on {lm['n_samples']} training "
                  f"samples; its error, {lm['error_scale']:.3g} x the measurement noise (RMS), weights the data term."]
    lines += ["", "Segmentation (every method): the relative-conductivity image is upsampled bilinearly to 256 x 256 "
              "(water outside the disk); below `low` is resistive, above `high` conductive. The models reconstruct "
              "sigma / sigma_water clipped to [0, 2] (plastic ~0, water 1, metal 2); CNF and CSD* give the mean of "
              f"{cfg['run']['cnf_samples']} and {cfg['run']['csd_samples']} samples, and their std maps are in the "
              "figure.", "", f"![level {figure_level}](figures/{figure.name})", "", "## Time", ""]
    for name, seconds in manifest["timings"].items():
        lines.append(f"- {name}: {seconds / 60:.1f} min")
    lines += ["", "Stages already done (data, training, `methods.json`) are reused and count as ~0 here.", "",
              "Submissions in the challenge's format: `submissions/<method>/level_<L>/<n>.mat`; score them with "
              "`dgm-eit ktc-score --pred DIR --truth TRUTH_DIR`. Per-target scores: `scores.csv`."]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    with atomic_path(out / "timings.json") as tmp:
        Path(tmp).write_text(json.dumps({**manifest, "seconds_per_image": _seconds_per_image(results)}, indent=2))
    return {"report": out / "report.md", "scores": out / "scores.csv", "figure": figure}
