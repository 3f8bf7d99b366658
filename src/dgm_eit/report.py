"""``report.md``, ``metrics.csv`` and figures of a run, from its :class:`~dgm_eit.results.RunResult`.

Only records reach this module (data flows run -> results -> report); the paper's numbers
to compare with come from :mod:`dgm_eit.paper`.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from dgm_eit.files import atomic_path, write_text
from dgm_eit.methods import GAUSS_NEWTON
from dgm_eit.metrics import (CALIBRATION_LEVEL, COVERAGE, COVERAGE_LEVELS, LOWER_IS_BETTER, METRICS, SCALED_COVERAGE,
                             Summary, calibrated_sampler_coverage, coverage_name)
from dgm_eit.paper import PAPER_CITATION, PAPER_PARAMETERS, PAPER_RESULTS, TESTS, paper_mse_change
from dgm_eit.recon.tuning import describe
from dgm_eit.results import MethodResult, RunResult, Setting, SettingResult

# decimals per metric in tables: enough to separate methods at the paper's scale
DIGITS = {"MSE": 5, "PSNR": 2, "SSIM": 3, "RE": 3, "AE": 4, "DR": 3,
          "std_err_corr_pixels": 2, "std_err_corr_images": 2}

REMAKE_SCRIPT = "remake.sh"   # next to report.md: the command behind every seed's reconstruction file
CSV_COLUMNS = ("test", "train_set", "test_set", "method", "seed", "metric", "mean", "std", "n")
PER_SAMPLE_COLUMNS = ("test", "train_set", "test_set", "method", "seed", "index", *METRICS)
INTERVAL_COLUMNS = ("test", "train_set", "test_set", "method", "mse_vs_gn_percent", "ci_low", "ci_high", "verdict",
                    "win_rate", "rank", "tied_with", "images", "seeds", "resamples", "bootstrap_seed", "level")

CALIBRATION_FIGURE = Path("figures") / "calibration.png"   # under the run directory
SCALED_SUFFIX = ", std x s"   # a calibration curve of std maps times their validation scale
HEADLINE_LEVEL = CALIBRATION_LEVEL   # the interval whose coverage the calibration table gives
SLIGHTLY = 0.05            # a coverage this close to HEADLINE_LEVEL is "slightly" over- or under-confident


def format_metric(metric: str, summary: Summary) -> str:
    """``mean ± std``, or the mean alone where there is no spread to give (NaN std: one seed)."""
    if math.isnan(summary.std):
        return f"{summary.mean:.{DIGITS[metric]}f}"
    return summary.format(DIGITS[metric])


def format_percent(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.0f}%"


def best_methods(rows: Mapping[str, Mapping[str, Summary]]) -> dict[str, set[str]]:
    """Per metric, the method(s) with the best mean (DR: closest to 1), ties included."""
    best = {}
    for metric in METRICS:
        lower = LOWER_IS_BETTER[metric]
        scores = {}
        for method, summaries in rows.items():
            mean = summaries[metric].mean
            scores[method] = abs(mean - 1.0) if lower is None else (mean if lower else -mean)
        finite = {m: v for m, v in scores.items() if math.isfinite(v)}
        if finite:
            top = min(finite.values())
            best[metric] = {m for m, v in finite.items() if v == top}
    return best


def metrics_table(rows: Mapping[str, Mapping[str, Summary]],
                  extra: Mapping[str, Mapping[str, str]] | None = None, highlight: bool = False) -> str:
    """Markdown table ``Method | MSE | PSNR | SSIM | RE | AE | DR [| extra columns]``.

    ``highlight`` sets the best mean of each metric column in bold."""
    extra = extra or {}
    extra_columns = list(dict.fromkeys(col for cols in extra.values() for col in cols))
    header = ["Method", *METRICS, *extra_columns]
    best = best_methods(rows) if highlight and len(rows) > 1 else {}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for method, summaries in rows.items():
        cells = [method]
        for m in METRICS:
            text = format_metric(m, summaries[m])
            cells.append(f"**{text}**" if method in best.get(m, ()) else text)
        cells += [extra.get(method, {}).get(col, "-") for col in extra_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_metrics_csv(path: str | Path, records: Iterable[Mapping], columns: tuple[str, ...] = CSV_COLUMNS) -> None:
    """CSV with ``columns`` (default: the long format of :data:`CSV_COLUMNS`, one row per metric)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: record[k] for k in columns})


def comparison_figure(path: str | Path, truth: np.ndarray, recons: Mapping[str, np.ndarray],
                      stds: Mapping[str, np.ndarray], title: str, *, indices: Iterable[int] | None = None,
                      std_max: float | None = None, row_label: str = "test image") -> None:
    """Rows = images (labelled ``row_label`` and their ``indices`` in the split, default 0, 1, ...);
    columns = ground truth, each method, then the std maps.

    All conductivity panels share one colour scale, from 0 to the largest true value shown
    (in the paper's phantom sets every image holds a 1.5 anomaly, so every figure of a run has
    the same scale); the std maps share one scale, ``std_max`` (default: a third of the
    conductivity scale, so it too is the same in every figure of a run). Values beyond a
    scale are clipped: the colourbar shows an arrow at that end and the title says so. The
    square's corners outside the disk are masked (white), not drawn as 0.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dgm_eit.errors import InputError
    from dgm_eit.figures import clip_extend, colour_map, outside_masked, save_figure

    truth = outside_masked(truth)
    n_rows = truth.shape[0]
    indices = list(range(n_rows)) if indices is None else [int(i) for i in indices]
    if len(indices) != n_rows:
        raise InputError(f"comparison figure: {len(indices)} indices for {n_rows} images")
    vmax = float(np.nanmax(truth))
    if not vmax > 0:
        raise InputError("comparison figure: the ground truth has no positive conductivity inside the disk")
    default_std = std_max is None
    std_max = vmax / 3 if default_std else float(std_max)
    if not std_max > 0:
        raise InputError(f"comparison figure: std_max must be positive, got {std_max}")
    values = [("ground truth", truth)] + [(n, outside_masked(a)) for n, a in recons.items()]
    spreads = [(f"{n} std", outside_masked(a)) for n, a in stds.items()]
    value_extend = clip_extend([a for _, a in values], 0.0, vmax)
    std_extend = clip_extend([a for _, a in spreads], 0.0, std_max)
    n_cols = len(values) + len(spreads)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols + 0.4, 1.6 * n_rows + 1.5), squeeze=False,
                             layout="constrained")
    value_map, std_map = colour_map("viridis"), colour_map("magma")
    value_image = std_image = None
    for col, (name, images) in enumerate(values + spreads):
        is_value = col < len(values)
        for row in range(n_rows):
            ax = axes[row, col]
            if is_value:
                value_image = ax.imshow(images[row], vmin=0.0, vmax=vmax, cmap=value_map)
            else:
                std_image = ax.imshow(images[row], vmin=0.0, vmax=std_max, cmap=std_map)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{row_label} {indices[row]}", fontsize=8)
    clipped = [what for what, extend in (("σ", value_extend), ("std", std_extend)) if extend != "neither"]
    rule = " (a third of the σ scale, as in every figure)" if default_std else ""
    lines = [title, f"σ scale 0-{vmax:g}" + (f"; std scale 0-{std_max:.3g}{rule}" if spreads else ""),
             "white: outside the disk" + (f"; {' and '.join(clipped)} values beyond the scale are clipped "
                                          "(arrow on the colourbar)" if clipped else "")]
    # a narrow figure (few methods) wraps the lines rather than cutting them off
    width = int(fig.get_figwidth() * 13)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=9)
    fig.colorbar(value_image, ax=axes[:, :len(values)].ravel().tolist(), location="bottom", shrink=0.6,
                 aspect=40, extend=value_extend, label="conductivity σ (background 1)")
    if std_image is not None:
        fig.colorbar(std_image, ax=axes[:, len(values):].ravel().tolist(), location="bottom", shrink=0.9,
                     aspect=20, extend=std_extend, label="per-pixel std of σ")
    save_figure(fig, path)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


# every method, sampler and abbreviation of a report, spelled out once with its reference
NAMES = "\n".join([
    "- **GN**: Gauss-Newton, absolute reconstruction from σ = 1 with a regularised update, its weight and "
    "iterations chosen on each data set's validation split (pyEIT: Liu et al., SoftwareX 7:304-308, 2018). "
    "**Kotre**: the regulariser diag(JᵀJ)^p (p = 1 Levenberg-Marquardt, p = 0 Tikhonov), after C. J. Kotre.",
    "- **CVAE**: conditional variational autoencoder, two stages after Seo et al., SIAM J. Imaging Sci. "
    "12(3):1275-1295, 2019: a VAE on images, then a regressor to its latent from the input `[cvae] condition` "
    "names (`v`: the voltages through an MLP, the paper's; `gn`: the GN image through a conv encoder). "
    "**CVAE-v (paper)** (`cvae-v`): the paper's CVAE, voltages in, whatever `[cvae] condition` says, trained "
    "as a model of its own.",
    "- **CNF**: conditional normalizing flow (conditional invertible network) after Denker et al., J. Imaging "
    "7(11):243, 2021, conditioned on the GN image; mean and std of its posterior samples.",
    "- **U-Net**: an encoder-decoder network with skip connections (Ronneberger et al., MICCAI 2015) trained to "
    "correct the GN image.",
    "- **VE SDE**: the variance-exploding stochastic differential equation of score-based diffusion (Song et "
    "al., ICLR 2021); the score prior learns its reverse on images alone. **NFE**: number of function "
    "evaluations, network calls per image.",
    "- **CSD\\***: conditional score-based diffusion as the paper (Wang, Xu and Zhou 2024) names it: the prior's "
    "reverse process started from the GN image at time t0 (chosen on validation) instead of from noise, after "
    "Song et al., ICLR 2022; the sampler is `[run] csd_sampler`. **CSD\\* plain (paper)** (`csd-plain`): the "
    "paper's CSD\\*, sampler `csd` whatever `csd_sampler` says, with the same prior. **CSD-guided**: the paper's "
    "general CSD, sampler `dps`.",
    "- Samplers of the score prior: **csd** (the GN image replaces the reverse state at t0, then the plain "
    "reverse process); **ccdf** (`[csd] mode = \"ccdf\"`: the GN image is first diffused to t0, "
    "Come-Closer-Diffuse-Faster, Chung, Sim and Ye, CVPR 2022); **dds** (csd plus, at every reverse step, a "
    "proximal Gauss-Newton step of the denoised image on the measured voltages: data consistency after the "
    "decomposed diffusion sampler, Chung, Lee and Ye, ICLR 2024); **dps** (diffusion posterior sampling: the "
    "gradient of the data misfit through the differentiable FEM at every step, Chung et al., ICLR 2023); "
    "**pc** (predictor-corrector: reverse-diffusion predictor, Langevin corrector) and **ode** (the "
    "probability-flow ODE), the unconditional samplers of Song et al. 2021.",
    "- **ens**: a seed ensemble, the pooled reconstructions of a method's models trained with different seeds.",
])

SAMPLER_TEXT = {
    "csd": "sampler `csd` (the paper's CSD*: the GN image replaces the state at t0, then the plain reverse process)",
    "dds": "sampler `dds` (CSD* with data consistency: the GN image at t0, then at every reverse step the "
           "denoised image takes a proximal Gauss-Newton step on the measured voltages before it is re-noised)",
}


def method_label(mr: MethodResult, setting: Setting) -> str:
    """A method as a table names it: with its training set where that is not the test set."""
    return mr.name if mr.train_set is None or mr.train_set == setting.data else f"{mr.name} ({mr.train_set.label})"


def _rank(c) -> str:
    return f"{c.rank}=" if c.tied_with else str(c.rank)


def _chosen(values: list) -> str:
    """One value, or the values of every seed when they differ."""
    values = list(values)
    return f"{values[0]:g}" if len(set(values)) == 1 else " / ".join(f"{v:g}" for v in values)


def remake_section(sr: SettingResult) -> str:
    """The commands that remake a table's rows (seed 0's; every seed's are in remake.sh), collapsed."""
    seeded = [mr for mr in sr.methods if mr.commands]
    if not seeded:
        return ""
    seeds = max(mr.n_seeds for mr in seeded)
    scope = (f"The row is the mean over the {seeds} seeds' files; the other seeds' commands (run directory "
             f"`seed<k>`, their own `--seed`) are in `{REMAKE_SCRIPT}`." if seeds > 1 else
             "The row's numbers are this file's.")
    lines = ["<details><summary>Commands that remake this table's rows</summary>", "",
             "Run in the output directory: each command remakes seed 0's reconstruction file of a trained method with "
             "the settings the run used (samples, sampler, the t0 and steps chosen on validation, seed, threads, "
             "device) into `remade/`; on the same machine it equals the run's own file in `recon/`, and "
             f"`dgm-eit evaluate --pred <its --out> --data <its --data>` scores it. {scope}", "", "```sh"]
    for mr in seeded:
        lines += [f"# {method_label(mr, sr.setting)}", mr.commands[0]]
    lines.append("```")
    notes = []
    if any(mr.method == GAUSS_NEWTON.key for mr in sr.methods):
        notes.append("GN needs no command: its images are the test set's own Gauss-Newton images (the data "
                     "set's `test/gn` array, made when the data set was simulated).")
    pooled = [f"{method_label(mr, sr.setting)} " + ", ".join(f"`{f}`" for f in mr.pooled_from)
              for mr in sr.methods if mr.pooled_from]
    if pooled:
        notes.append("A seed ensemble pools its method's seed files (`dgm_eit.reconstruct.pool_members`): "
                     + "; ".join(pooled) + ".")
    if notes:
        lines += ["", " ".join(notes)]
    return "\n".join(lines + ["", "</details>"])


def remake_script(result: RunResult) -> str:
    """``remake.sh``: the command of every seed's reconstruction file of every table."""
    lines = ["#!/bin/sh",
             "# Remakes every reconstruction file the tables of report.md are scored from, with the settings",
             "# the run used; run it in this directory: sh remake.sh. Each command writes remade/<file>,",
             "# equal to recon/<file> on the same machine (score one: dgm-eit evaluate --pred <its --out>",
             "# --data <its --data>). GN needs no command (the test set's own gn images); a seed ensemble",
             "# pools its method's seed files (dgm_eit.reconstruct.pool_members).",
             "set -e"]
    for sr in result.settings:
        for mr in sr.methods:
            for k, command in enumerate(mr.commands):
                lines += ["", f"# {sr.setting.title}: {method_label(mr, sr.setting)}, seed {k}", command]
    return "\n".join(lines) + "\n"


def paper_comparison(sr: SettingResult, faithful: list[MethodResult]) -> str:
    """What the paper's numbers of a table can be compared with: only the rows that run the
    paper's own algorithm (same input, same sampler); said in words when there is none."""
    s = sr.setting
    table = PAPER_RESULTS[s.paper_table]
    faithful_keys = {mr.method for mr in faithful}
    others = [method_label(mr, s) for mr in sr.methods
              if mr.method not in faithful_keys and mr.method != GAUSS_NEWTON.key]
    if not faithful:
        return (f"The paper's numbers (Table {s.paper_table}) are not comparable with these rows and are not shown: "
                "none of them runs the paper's algorithm (this profile's CVAE may read the GN image instead of "
                "the voltages, its CSD* may use the `dds` sampler, ensembles pool several models). Add "
                "`cvae-v` and `csd-plain` to `run.methods` for the paper's own variants.")
    published = [f"{mr.paper_row} MSE {table[mr.paper_row]['MSE'][0]:.4f} / SSIM {table[mr.paper_row]['SSIM'][0]:.3f}"
                 for mr in faithful]
    if "GN" in table:
        published.insert(0, f"GN MSE {table['GN']['MSE'][0]:.4f} / SSIM {table['GN']['SSIM'][0]:.3f}")
    text = (f"Paper MSE vs GN: the change the paper published for the same algorithm (Table {s.paper_table}, one "
            "training run, against its own GN), shown only beside the rows that run the paper's algorithm: "
            + ", ".join(method_label(mr, s) for mr in faithful) + ". ")
    if others:
        text += ("The other rows (" + ", ".join(others) + ") run another input, sampler or several models, so "
                 "the paper's numbers are not comparable with them. ")
    return text + f"Paper (Table {s.paper_table}, mean, one training run): " + "; ".join(dict.fromkeys(published)) + "."


def setting_section(sr: SettingResult, cfg: dict) -> str:
    """One results table of a run."""
    s = sr.setting
    run = cfg["run"]
    lines = [f"### {s.title} (paper Table {s.paper_table})", ""]
    rows, extra = {}, {}
    # the paper's numbers sit only beside rows that run the paper's algorithm (MethodResult.paper_row)
    faithful = [mr for mr in sr.methods if mr.paper_row is not None
                and paper_mse_change(s.paper_table, mr.paper_row) is not None]
    faithful_keys = {mr.method for mr in faithful}
    for mr in sr.methods:
        label = method_label(mr, sr.setting)
        rows[label] = mr.pooled()
        c = sr.comparisons.get(mr.method)
        own = c is not None and mr.method != GAUSS_NEWTON.key
        extra[label] = {"MSE vs GN [95% CI]": c.interval.format() if own else "-",
                        "wins vs GN": f"{100 * c.win_rate:.0f}%" if own else "-",
                        "rank": _rank(c) if c is not None else "-"}
        if faithful:
            paper = paper_mse_change(s.paper_table, mr.paper_row) if mr.method in faithful_keys else None
            extra[label]["paper MSE vs GN"] = format_percent(paper)
    if rows:
        n_images = len(sr.methods[0].per_seed[0]["MSE"])
        seeds = max(mr.n_seeds for mr in sr.methods)
        lines.append(metrics_table(rows, extra, highlight=True))
        lines.append("")
        spread = (f"Each metric: the mean over the {seeds} training seeds of the mean over {n_images} test images, "
                  "± the std over the seeds (GN has no seed; an ensemble pools all seeds into one model)"
                  if seeds > 1 else f"Each metric: the mean over {n_images} test images (one training seed)")
        scope = (f"resampling the {n_images} test images and the {seeds} seeds" if seeds > 1 else
                 f"resampling the {n_images} test images only: with one training seed the interval does not "
                 "cover the training seed, whose spread can be larger (run with --seeds 3)")
        lines.append(f"{spread}. MSE vs GN: change of the mean MSE against GN on the same images, with a 95% "
                     f"paired bootstrap interval ({scope}; {run['bootstrap_resamples']} resamples, bootstrap seed "
                     "= the run's --seed). Wins vs GN: the share of (seed, image) pairs with a lower MSE than "
                     "GN. Rank: 1 + the number of methods whose interval lies wholly below; = marks a method "
                     "whose interval overlaps another's (tied).")
        lines.append("")
        lines.append(paper_comparison(sr, faithful))
    if sr.gn_settings:
        lines += ["", f"GN: {describe(sr.gn_settings)}; the models that read a GN image read these."]
    for mr in sr.methods:
        if mr.sampling:
            first = mr.sampling[0]
            how = SAMPLER_TEXT.get(first.get("sampler"), first.get("sampler", "csd"))
            per_seed = " (per seed)" if mr.n_seeds > 1 else ""
            lines += ["", f"{mr.name}: {how}; t0 = {_chosen(x['t0'] for x in mr.sampling)}, "
                          f"{_chosen(x['n_steps'] for x in mr.sampling)} reverse steps{per_seed}, chosen on the "
                          f"validation split of {first['tuned_on']}."]
    for method, why in sr.missing.items():
        lines.append(f"\n*{method}: missing — {why}*")
    if sr.figure is not None:
        rel = os.path.relpath(sr.figure, sr.figure.parent.parent)
        lines += ["", f"![{s.title}]({rel})"]
    remake = remake_section(sr)
    if remake:
        lines += ["", remake]
    return "\n".join(lines)


def efficiency_section(result: RunResult) -> str:
    rows = []
    for row in result.efficiency:
        paper = PAPER_PARAMETERS.get(row.model) if row.models == 1 else None
        rows.append([row.name, row.train_set.label if row.train_set else "-", str(row.models) if row.model else "-",
                     _count(row.parameters), _count(paper) if paper else "-", _seconds(row.train_seconds),
                     _count(row.train_steps), _seconds(row.seconds_per_image), _count(row.nfe), row.device])
    text = markdown_table(["Method", "trained on", "models", "parameters", "paper parameters", "training wall time",
                           "optimiser steps", "reconstruction time / image", "NFE / image", "device"], rows)
    return text + ("\n\nA trained method's figures are those of one model (the mean over its seeds); an "
                   "ensemble's (\"ens\") are what all its models cost together: K times the parameters, "
                   "training and reconstruction. "
                   "CSD*, CSD* plain (paper) and CSD-guided share the score prior (its parameters and training "
                   "time); CVAE-v (paper) is a CVAE of its own (runs `cvae-v_<set>`). "
                   "GN has no training; its time is one Gauss-Newton solve, timed in the main process. "
                   "Reconstruction times include every sample drawn (see `[run]` *_samples), not the "
                   "validation sweep that chose CSD*'s t0 (`[run]` csd_tune_*) nor the validation images that chose "
                   "the std scale (`[run]` calibration_images).")


def beats_gn_section(result: RunResult) -> str:
    """Per table: does each method's 95% interval of the MSE change lie below 0 (yes), above it
    (no, worse) or across it (tied with GN)?"""
    words = {"better": "yes", "worse": "**no** (worse)", "tied": "**tied**"}
    lines = []
    for sr in result.settings:
        verdicts = [f"{mr.name} {words[c.interval.verdict]} {c.interval.format()}"
                    for mr in sr.methods if mr.method != GAUSS_NEWTON.key
                    for c in [sr.comparisons.get(mr.method)] if c is not None]
        if verdicts:
            lines.append(f"- {sr.setting.title}: " + ", ".join(verdicts))
    return "\n".join(lines)


def confidence(coverage: float, level: float = HEADLINE_LEVEL) -> str:
    """How std maps read whose central ``level`` intervals hold the share ``coverage`` of the truths."""
    if not math.isfinite(coverage):
        return "-"
    if coverage == level:
        return "calibrated"
    reading = ("over-confident (intervals too narrow)" if coverage < level
               else "under-confident (intervals too wide)")
    return f"slightly {reading}" if abs(coverage - level) <= SLIGHTLY else reading


def _coverage_percent(summary: Summary) -> str:
    text = f"{100 * summary.mean:.1f}%"
    return text if math.isnan(summary.std) else f"{text} ± {100 * summary.std:.1f}"


def _correlation(name: str, summary: Summary) -> str:
    return "-" if math.isnan(summary.mean) else format_metric(name, summary)


def _calibrated(result: RunResult):
    """``(setting result, method result, pooled figures)`` of every method with std maps."""
    return [(sr, mr, mr.pooled()) for sr in result.settings for mr in sr.methods if mr.calibration]


def calibration_curves(result: RunResult) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per results table (its title), per method with std maps: the observed coverage at each
    level of :data:`~dgm_eit.metrics.COVERAGE_LEVELS`, mean and std over seeds (NaN: one seed)."""
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for sr, mr, figures in _calibrated(result):
        lines = curves.setdefault(sr.setting.title, {})
        lines[mr.name] = (np.array([figures[n].mean for n in COVERAGE]), np.array([figures[n].std for n in COVERAGE]))
        if "std_scale" in figures:
            lines[f"{mr.name}{SCALED_SUFFIX}"] = (np.array([figures[n].mean for n in SCALED_COVERAGE]),
                                            np.array([figures[n].std for n in SCALED_COVERAGE]))
    return curves


def _scaled(figures: dict[str, Summary]) -> str:
    """The headline coverage of the std maps times their validation scale, and the scale."""
    if "std_scale" not in figures:
        return "-"
    scale = figures["std_scale"]
    spread = "" if math.isnan(scale.std) else f" ± {scale.std:.2f}"
    return f"{_coverage_percent(figures[coverage_name(HEADLINE_LEVEL) + '_scaled'])} (s = {scale.mean:.2f}{spread})"


def calibration_section(result: RunResult) -> str:
    """How well the std maps of the methods that have them measure their errors."""
    rows = []
    for sr, mr, figures in _calibrated(result):
        covered = figures[coverage_name(HEADLINE_LEVEL)]
        reference = (math.nan if mr.posterior_samples is None
                     else calibrated_sampler_coverage(HEADLINE_LEVEL, mr.posterior_samples))
        rows.append([f"{sr.setting.test} {sr.setting.data.label}", method_label(mr, sr.setting),
                     _coverage_percent(covered), _scaled(figures),
                     f"{100 * reference:.0f}% ({mr.posterior_samples})" if math.isfinite(reference) else "-",
                     _correlation("std_err_corr_pixels", figures["std_err_corr_pixels"]),
                     _correlation("std_err_corr_images", figures["std_err_corr_images"]),
                     confidence(covered.mean)])
    if not rows:
        return "No method of this run wrote std maps (the CNF, CSD* and every seed ensemble do)."
    level = f"{100 * HEADLINE_LEVEL:.0f}%"
    intro = (
        "The CNF, CSD* and every seed ensemble give each pixel a posterior mean and std (the std map). "
        "The reconstruction files keep only these two, so the posterior of a pixel is taken as the Gaussian "
        "N(mean, std²), and its central interval of level p is mean ± z std, z the (1 + p)/2 normal quantile "
        f"(1.645 for 90%). **{level} coverage**: the share of the pixels inside the disk, over all test images, "
        "whose true value lies in that interval (a pixel of std 0 only where its mean is exact). A calibrated "
        f"std map covers {level}; less is over-confident (the std too small), more under-confident (\"slightly\": "
        f"within {100 * SLIGHTLY:.0f} points). **std x s**: the coverage of the std maps times a scale s "
        "chosen for each seed's model on validation images (run.calibration_images of the data set that also "
        "chooses CSD*'s t0: the training anomaly count at the test noise level), the smallest s whose interval "
        f"covers {level} of their disk pixels; a temperature of the std map that leaves the correlations below "
        "unchanged (s < 1: the maps were too wide, s > 1: too narrow). Seed ensembles are shown unscaled. "
        "**calibrated sampler (n)**: what this interval covers for a "
        "sampler that draws from the true posterior when the mean and std come from the method's n samples per "
        "image, as here (Student-t with n - 1 degrees of freedom: the std of few samples is itself uncertain; "
        "for an ensemble, whose n samples come from several models, approximately). **corr pixels**: Pearson "
        "correlation of the std and the absolute error over every disk pixel of the test set; **corr images**: "
        "of each image's mean std and its RMSE over the disk, across the images; positive where the std points "
        "at the errors, - where the std is constant. Each figure: the mean over the training seeds (± the std "
        "over the seeds when there are several); an ensemble's, of its one pooled reconstruction. metrics.csv "
        "holds them per seed (`coverage10` ... `coverage95`, `std_err_corr_pixels`, `std_err_corr_images`, and "
        "with a validation scale `std_scale` and `coverage10_scaled` ... `coverage95_scaled`).")
    table = markdown_table(["test set", "Method", f"{level} coverage", f"{level} coverage, std x s",
                            "calibrated sampler (n)", "corr pixels",
                            "corr images", "reading"], rows)
    levels = ", ".join(f"{100 * p:.0f}" for p in COVERAGE_LEVELS)
    curve = (f"Observed against nominal coverage of the central intervals of level {levels}% (mean over seeds; "
             "bars: ± the std over seeds); the dashed diagonal is a calibrated std map, a line below it an "
             "over-confident one.")
    return "\n\n".join([intro, table, curve, f"![Uncertainty calibration]({CALIBRATION_FIGURE.as_posix()})"])


def calibration_figure(path: str | Path, curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                       levels: Iterable[float] = COVERAGE_LEVELS) -> None:
    """Calibration curves: one panel per results table (``curves``: title -> method -> (observed
    coverage per level of ``levels``, its std over seeds or NaN)), one line per method, in the
    same colour in every panel, and the diagonal a calibrated std map would follow."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dgm_eit.errors import InputError
    from dgm_eit.figures import save_figure

    if not curves:
        raise InputError("calibration figure: no method with std maps to draw")
    levels = np.asarray(list(levels), dtype=np.float64)
    # a method's scaled maps share its colour, dash-dotted
    methods = list(dict.fromkeys(name.removesuffix(SCALED_SUFFIX) for lines in curves.values() for name in lines))
    palette = matplotlib.colormaps["tab10"].colors
    colours = {name: palette[i % len(palette)] for i, name in enumerate(methods)}
    n_cols = min(3, len(curves))
    n_rows = -(-len(curves) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.2 * n_rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[len(curves):]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes.ravel(), curves.items()):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
        for name, (observed, spread) in lines.items():
            if len(observed) != len(levels):
                raise InputError(f"calibration figure: {name} has {len(observed)} coverages for {len(levels)} levels")
            spread = np.asarray(spread, dtype=np.float64)
            ax.errorbar(levels, observed, yerr=spread if np.isfinite(spread).all() else None, marker="o",
                        markersize=3, linewidth=1.2, capsize=2, color=colours[name.removesuffix(SCALED_SUFFIX)],
                        linestyle="-." if name.endswith(SCALED_SUFFIX) else "-", label=name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_box_aspect(1)   # square, so the calibrated diagonal runs at 45 degrees
        ax.grid(alpha=0.3)
        ax.set_xlabel("nominal coverage of the interval", fontsize=8)
        ax.set_ylabel("observed coverage (disk pixels)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(textwrap.fill(title, 40), fontsize=8)
    legend = {}   # one entry per method of any panel
    for ax in axes.ravel()[:len(curves)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(len(legend), 5, 2 * n_cols), fontsize=8)
    # one panel is narrower than the title: wrap it to the panels' width
    fig.suptitle(textwrap.fill("Calibration of the std maps: Gaussian central intervals mean ± z std", 45 * n_cols),
                 fontsize=9)
    save_figure(fig, path)


def stages_section(result: RunResult) -> str:
    rows = []
    for name, record in result.stages.items():
        status = record.get("status", "?")
        detail = record.get("message", "")
        if status == "done":
            if "seconds" in record:
                detail = _seconds(record["seconds"]) + (" (earlier run)" if record.get("reused") else "")
            elif "seconds_per_image" in record:
                detail = f"{_seconds(record['seconds_per_image'])} per image"
            else:
                detail = "reused"
        rows.append([name, status, detail.replace("|", "/").replace("\n", " ")])
    return markdown_table(["stage", "status", "time / note"], rows)


def expected_time(cfg: dict) -> str:
    return str(cfg["run"]["expected_time"])


def render_report(result: RunResult) -> str:
    """The text of ``report.md``."""
    cfg = result.cfg
    data = cfg["data"]
    # stages reused from earlier (interrupted) calls keep the time they took then
    total = sum(r.get("seconds", 0.0) for r in result.stages.values() if r.get("status") == "done")
    lines = [
        f"# dgm-eit report: profile `{cfg.get('profile', '?')}`, seed {result.seed}, "
        f"{cfg['run']['seeds']} training seed(s) per model",
        "",
        f"Images {data['image_size']} x {data['image_size']}; {data['n_train']} / {data['n_val']} / "
        f"{data['n_test']} train / validation / test samples per data set; inversion mesh h0 = "
        f"{cfg['mesh']['h0']}, simulation mesh h0 = {cfg['simulation']['h0']} "
        f"({cfg['mesh']['electrode_model']} electrodes). This call took {_seconds(result.wall_seconds)}; "
        f"the stages' own times add up to {_seconds(total)} (stages run side by side overlap; stages "
        f"reused from an earlier call count with the time they took then). Expected time of this profile: "
        f"{expected_time(cfg)}.",
        "",
        f"The study reproduced: {PAPER_CITATION}.",
        "",
        "Metrics, one implementation for every method (`dgm_eit.metrics`; README section \"Reconstruction "
        "and scores\"), on the full 0-outside-the-disk image: MSE, "
        "PSNR and SSIM with the ground truth's range R = max - min, RE = ‖x̂ - x‖₁/‖x‖₁, AE = mean |x̂ - x|, "
        "DR = (max x̂ - min x̂)/R (best at 1). SSIM: 7 x 7 uniform window, K1 0.01, K2 0.03. "
        "Bold: the best mean of each column. \"MSE vs GN\" is the relative change of the mean MSE against "
        "Gauss-Newton on the same test set with its 95% interval; \"paper MSE vs GN\" is the paper's (one "
        "training run), only beside the rows that run the paper's own algorithm. Figures share one colour scale per figure (the ground truth's range) and show the "
        "first seed's model of each method and each seed ensemble.",
    ]
    lines += ["", "## Names", "", NAMES]
    for test, (heading, _) in TESTS.items():
        sections = [sr for sr in result.settings if sr.setting.test == test]
        if not sections:
            continue
        lines += ["", f"## {heading}"]
        for sr in sections:
            lines += ["", setting_section(sr, cfg)]
    lines += ["", "## Does every generative model beat GN on MSE?", "",
              "Yes where the 95% interval of its MSE change lies wholly below 0; tied where it spans 0.", "",
              beats_gn_section(result) or "(no GN)"]
    lines += ["", "## Uncertainty calibration", "", calibration_section(result)]
    lines += ["", "## Efficiency", "", efficiency_section(result)]
    lines += ["", "## Training seeds", "", seeds_section(result)]
    lines += ["", "## Stages", "", stages_section(result)]
    failures = result.failures
    if failures:
        lines += ["", f"**{len(failures)} stage(s) did not complete**; re-run the same command to retry them."]
    return "\n".join(lines) + "\n"


def seeds_section(result: RunResult) -> str:
    """Which seed trained each model: the rule, and the seeds it gave."""
    rows = [[run, ", ".join(str(s) for s in seeds)] for run, seeds in result.training_seeds.items()]
    rule = ("Seed k of a model trained on a data set is the first 6 bytes of SHA-256(\"<--seed>/<model>/<data "
            "set>/<k>\") (`dgm_eit.runtime.training_seed`), so every model, data set and seed has its own; "
            "the same --seed gives the same seeds on every machine. Reconstructions by seed k's model draw "
            "their samples from that seed (candidate 0's where a best-of run kept another candidate).")
    chosen = {run: picks for run, picks in result.selections.items() if any(picks)}
    if chosen:
        n = max(len(p["candidates"]) for picks in chosen.values() for p in picks if p)
        rule += (f"\n\nBest of {n} (run.best_of, for {', '.join(result.cfg['run']['best_of_methods'])}): each seed's "
                 f"model is the one of {n} training runs (candidate j > 0 hashes \"<...>/<k>/candidate<j>\") with "
                 "the lowest mean MSE on its training set's validation images, reconstructed as the method draws them; "
                 "the table gives the kept seed, and the efficiency table's training time counts every candidate.")
        for row in rows:
            picks = chosen.get(row[0])
            row.append("; ".join("-" if p is None else f"{p['chosen']} of " + ", ".join(
                f"{c['val_mse']:.5f}" for c in p["candidates"]) for p in picks) if picks else "-")
        return rule + "\n\n" + markdown_table(["training run", "seeds (k = 0, 1, ...)",
                                               "kept candidate of the validation MSEs (per k)"], rows)
    return rule + "\n\n" + markdown_table(["training run", "seeds (k = 0, 1, ...)"], rows) if rows else rule


def write_outputs(result: RunResult) -> dict[str, Path]:
    """Write ``report.md``, ``metrics.csv``, ``metrics_per_sample.csv``, ``intervals.csv``,
    ``remake.sh`` and, where a method has std maps, the calibration figure; the tables' figures
    are already in place."""
    out = Path(result.out)
    paths = {"report": out / "report.md", "metrics": out / "metrics.csv",
             "per_sample": out / "metrics_per_sample.csv", "intervals": out / "intervals.csv",
             "remake": out / REMAKE_SCRIPT}
    curves = calibration_curves(result)
    if curves:
        paths["calibration"] = out / CALIBRATION_FIGURE
        calibration_figure(paths["calibration"], curves)
    write_metrics_csv(paths["metrics"], result.records())
    write_metrics_csv(paths["per_sample"], result.per_sample_records(), PER_SAMPLE_COLUMNS)
    write_metrics_csv(paths["intervals"], result.interval_records(), INTERVAL_COLUMNS)
    write_text(paths["remake"], remake_script(result))
    write_text(paths["report"], render_report(result))
    return paths
