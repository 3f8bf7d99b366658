"""``report.md``, ``scores.csv`` and the figure of a KTC study directory."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from dgm_eit.errors import InputError
from dgm_eit.files import atomic_path, write_text
from dgm_eit.ktc import nuisance
from dgm_eit.ktc.physics import recorded_linear_model
from dgm_eit.ktc.simulate import extra_image_factors
from dgm_eit.methods import get_method
from dgm_eit.models import MODELS
from dgm_eit.stats import order_agreement, rank_agreement

LEADERBOARD = ("all-background prediction 6.70 / 21; official linearised baseline + Otsu 10.31; "
               "1st place (post-processing UNet, Bremen/UCL) 15.24 (all 7 levels of the hidden evaluation "
               "targets, not the public ones scored here)")


def _name(key: str) -> str:
    return get_method(key).name


def _listed(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


def _sampled(cfg: dict, results: dict) -> str:
    """The sentence on the sampling methods: how many samples each image is the mean of."""
    counts = [(_name(m), get_method(m).n_samples(cfg["run"])) for m in results["methods"] if get_method(m).seeded]
    counts = [(name, n) for name, n in counts if n and n > 1]
    if not counts:
        return ""
    verb = "gives" if len(counts) == 1 else "give"
    return (f" {_listed([name for name, _ in counts])} {verb} the mean of {_listed([str(n) for _, n in counts])} "
            "samples, and their std maps are in the figure.")


# the columns of a study's scores.csv (also read and repacked by dgm_eit.ktc.bundle)
SCORE_COLUMNS = ("method", "seed", "level", "target", "score")


def _scores_csv(results: dict) -> str:
    """One row per method, seed, level and target (``seed`` is ``-`` for the methods without one);
    scores only: the same study gives the same bytes (times are in ``timings.json``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for method, runs in results["seeds"].items():
        for k, per_level in enumerate(runs):
            seed = k if get_method(method).seeded else "-"
            for level, r in per_level.items():
                for n, s in zip(results["numbers"], r["scores"]):
                    writer.writerow([method, seed, level, n, f"{s:.6f}"])
    return buf.getvalue()


def _seconds_per_image(results: dict) -> dict:
    """Per method and level, the mean over its seeds."""
    return {method: {str(level): float(np.mean([per_level[level]["seconds_per_image"] for per_level in runs]))
                     for level in runs[0]}
            for method, runs in results["seeds"].items()}


def _totals(runs: list[dict], levels) -> tuple[list[float], list[float]]:
    """Per level the mean over seeds of the summed target scores, and each seed's total."""
    sums = np.array([[sum(per_level[k]["scores"]) for k in levels] for per_level in runs])
    return sums.mean(axis=0).tolist(), sums.sum(axis=1).tolist()


def _figure(path: Path, results: dict, level: int) -> None:
    """One row per public target; the true classes, then per method its image (sigma /
    sigma_water), its std map where it samples, and its classes with their challenge score
    inside the panel. Images share one scale (0-2, water 1), std maps another; every panel
    shows the tank's disk (white outside, grey outline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    from dgm_eit.figures import CLASS_NAMES, class_colour_map, clip_extend, colour_map, outside_masked, save_figure

    numbers = results["numbers"]
    methods = {m: per_level[level] for m, per_level in results["methods"].items()}
    class_map = class_colour_map()
    columns = [("true classes", None, "truth")]
    for m, data in methods.items():
        columns.append((f"{_name(m)}\nimage", m, "recon"))
        if "recon_std" in data:
            columns.append((f"{_name(m)}\nstd", m, "recon_std"))
        columns.append((f"{_name(m)}\nclasses", m, "classes"))
    images = [data["recon"] for data in methods.values()]
    stds = [data["recon_std"] for data in methods.values() if "recon_std" in data]
    image_extend = clip_extend([outside_masked(a) for a in images], 0.0, 2.0)
    std_max = max([float(np.nanmax(outside_masked(a))) for a in stds] + [1e-6])
    fig, axes = plt.subplots(len(numbers), len(columns), figsize=(1.05 * len(columns) + 2.6, 1.35 * len(numbers) + 0.9),
                             squeeze=False, layout="constrained")
    drawn = {}
    for c, (label, m, key) in enumerate(columns):
        for r, n in enumerate(numbers):
            ax = axes[r, c]
            if key == "truth":
                drawn["classes"] = ax.imshow(outside_masked(results["truths"][n]), vmin=-0.5, vmax=2.5, cmap=class_map)
            elif key == "classes":
                ax.imshow(outside_masked(methods[m]["classes"][r]), vmin=-0.5, vmax=2.5, cmap=class_map)
                ax.set_xlabel(f"score {methods[m]['scores'][r]:.3f}", fontsize=8, labelpad=2)
            elif key == "recon_std":
                drawn["std"] = ax.imshow(outside_masked(methods[m][key][r]), vmin=0.0, vmax=std_max,
                                         cmap=colour_map("magma"))
            else:
                drawn["image"] = ax.imshow(outside_masked(methods[m][key][r]), vmin=0.0, vmax=2.0,
                                           cmap=colour_map("RdBu_r"))
            size = ax.get_images()[0].get_array().shape[-1]
            ax.add_patch(Circle(((size - 1) / 2, (size - 1) / 2), size / 2, fill=False, color="0.6", lw=0.6))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"target {n}", fontsize=9)
    dropped = f"electrodes 1-{2 * (level - 1)} removed" if level > 1 else "all 32 electrodes"
    clipped = "; image values beyond 0-2 are clipped (arrow on the colourbar)" if image_extend != "neither" else ""
    fig.suptitle(f"KTC2023 public targets, level {level} ({dropped}); classes scored against the true classes "
                 f"(challenge score under each panel, at most 1)\nimages: sigma / sigma_water, water 1, one scale "
                 f"0-2{clipped}; white: outside the tank", fontsize=9)
    bar = fig.colorbar(drawn["classes"], ax=axes, location="right", shrink=0.5, aspect=15, pad=0.01, ticks=[0, 1, 2])
    bar.ax.set_yticklabels(CLASS_NAMES, fontsize=8)
    # made last, placed nearest the panels: image scale, then std, then classes
    if "std" in drawn:
        fig.colorbar(drawn["std"], ax=axes, location="right", shrink=0.8, aspect=25, pad=0.01,
                     label="per-pixel std of sigma / sigma_water")
    fig.colorbar(drawn["image"], ax=axes, location="right", shrink=0.8, aspect=25, pad=0.01, extend=image_extend,
                 label="sigma / sigma_water")
    save_figure(fig, path)


def _agreement(val: dict, real: dict, pairs: dict | None = None) -> list[str]:
    """How well the simulated validation ranks the methods as the real targets do: the rank
    correlation, and which of the pairs that validation separates (``pairs``: paired intervals
    of the score differences, :func:`dgm_eit.ktc.study.validation_pairs`) the targets order alike."""
    try:
        rho = rank_agreement(val, real)
    except InputError:   # fewer than 3 methods, or a score that ties them all: no order to compare
        return []

    def order(scores: dict) -> str:
        return " > ".join(_name(m) for m in sorted(scores, key=lambda m: -scores[m]))

    def listed(which: list) -> str:
        return _listed([f"{_name(a)} vs {_name(b)}" for a, b in which])

    text = (f"**Sim-to-real agreement:** over the {len(val)} methods, the validation score and the real targets' "
            f"total have a Spearman rank correlation of {rho:.2f} (1: the same order). "
            f"Validation orders them {order(val)}; the targets {order(real)}.")
    if pairs:
        split = order_agreement(pairs, real)
        separated = len(split["agree"]) + len(split["disagree"])
        text += (f" Of the {len(pairs)} pairs of methods, validation separates {separated} (the paired 95% interval "
                 "of their score difference, over the same images and the seeds, excludes 0), and the targets' "
                 f"totals order {len(split['agree'])} of them the same way")
        text += f"; not {listed(split['disagree'])}." if split["disagree"] else "."
        if split["tied"]:
            text += f" Validation cannot order {listed(split['tied'])}."
    return ["", text + " The targets only check this: no choice is made on them."]


def write_report(out: Path, cfg: dict, methods, chosen: dict, results: dict, manifest: dict) -> dict:
    out = Path(out)
    levels = sorted({level for per_level in results["methods"].values() for level in per_level})
    numbers = results["numbers"]
    write_text(out / "scores.csv", _scores_csv(results))
    figure_level = int(cfg["run"]["figure_level"]) if int(cfg["run"]["figure_level"]) in levels else levels[0]
    figure = out / "figures" / f"ktc_level{figure_level}.png"
    _figure(figure, results, figure_level)

    lin = methods.linear_settings
    names = [_name(m) for m in results["methods"] if not get_method(m).ensemble]
    trained = [_name(m) for m in results["methods"] if get_method(m).seeded]
    lines = [f"# KTC2023 water tank: {_listed(names)} on the four public targets", "",
             f"`dgm-eit run --profile {cfg.get('profile', 'ktc')} --seed {manifest['seed']}`. Scores are the "
             "challenge's (per target: mean SSIM of the conductive and the resistive maps, at most 1; "
             f"{len(numbers)} targets per level, so at most {len(numbers)} per level).", "",
             "**Nothing here was tuned on the real targets.** Every method's settings (the linearised step's prior, "
             "GN's iteration count, a sampler's t0) and its segmentation thresholds were chosen on simulated validation "
             f"data (the first {cfg['run']['tune_images']} validation images of `data/ktc.h5`) by the same score; "
             "the real targets are only scored.", "",
             "## Scores (sum over the targets, per level)", ""]
    seeds = int(cfg["run"]["seeds"])
    head = "| method | " + " | ".join(f"level {k}" for k in levels) + " | total | val score [95% CI] |"
    lines += [head, "|---" * (len(levels) + 3) + "|"]
    for m, runs in results["seeds"].items():
        sums, totals = _totals(runs, levels)
        total = f"**{np.mean(totals):.2f}**" + (f" ± {np.std(totals, ddof=1):.2f}" if len(totals) > 1 else "")
        iv = manifest["val_intervals"][m]
        lines.append(f"| {_name(m)} | " + " | ".join(f"{s:.2f}" for s in sums) + f" | {total} | "
                     f"{iv.change:.3f} [{iv.low:.3f}, {iv.high:.3f}] |")
    default, why = manifest["default"]
    spread = (f"{_listed(trained)} were each trained {seeds} times (seeds from `dgm_eit.runtime.training_seed`): "
              "their level scores are the mean over the seeds, their total the mean ± std over the seeds; "
              "\"ens\" rows are the seed ensembles (every seed's samples pooled, thresholds chosen on validation)."
              if seeds > 1 else "One training seed per model: the scores do not show how much another training "
                                 "run would move them (`--seeds 3` measures it).")
    lines += ["", spread + " The validation score is the mean challenge score on the simulated validation "
              "images (for a trained method over its seeds too), with a 95% bootstrap interval over the images "
              f"(and the seeds; {manifest['resamples']} resamples, bootstrap seed 0).", "",
              f"**Default method of `dgm-eit ktc`: {_name(default)}** — {why}."]
    lines += _agreement({m: manifest["val_intervals"][m].change for m in results["seeds"]},
                        {m: float(np.mean(_totals(runs, levels)[1])) for m, runs in results["seeds"].items()},
                        manifest.get("val_pairs"))
    lines += ["", f"Maximum {len(numbers)} per level, {len(numbers) * len(levels)} in total. For orientation, the "
              "organisers' linearised baseline scores 2.99 / 4 on these targets at level 1 (our count). Leaderboard "
              f"(hidden targets): {LEADERBOARD}.", "", f"## Level {levels[0]}, per target", ""]
    lines += ["| method | " + " | ".join(f"target {n}" for n in numbers) + " | s per image |",
              "|---" * (len(numbers) + 2) + "|"]
    for m, runs in results["seeds"].items():
        for k, per_level in enumerate(runs):
            r = per_level[levels[0]]
            name = f"{_name(m)} seed {k}" if get_method(m).seeded and len(runs) > 1 else _name(m)
            lines.append(f"| {name} | " + " | ".join(f"{s:.3f}" for s in r["scores"])
                         + f" | {r['seconds_per_image']:.3f} |")
    lines += ["", "## Settings, all chosen on simulated validation data", ""]
    if lin:
        lines.append(f"- {lin['tank']}.")
    lines.append(f"- {nuisance.describe(cfg['tank'])}.")
    if lin.get("tuned"):
        lines.append(f"- Linearised step (every model's conditioning image): Gaussian smoothness prior, std "
                     f"{lin['prior_std']:g}, correlation length {lin['corr_length']:g} m, chosen on "
                     f"{lin['tuned_on']} from {len(lin['candidates'])} candidates (val score {lin['val_score']:.3f}).")
    extra = extra_image_factors(cfg)
    if extra and lin.get("prior_std"):
        priors = ", ".join(f"({lin['prior_std'] * a:g}, {lin['corr_length'] * b:g} m)" for a, b in extra)
        models = sorted({get_method(m).model for m in results["methods"]} - {None})
        readers = [name for name in models if MODELS[name].reads_extra(cfg[name])]
        lines.append(f"- The same step at {len(extra)} other priors (std, correlation length: {priors}; "
                     "`linear.extra_images`, set a priori): input channels of "
                     + (", ".join(f"`{name}`" for name in readers) or "no model of the study") + " (`inputs`).")
    lines += ["", "| method | own settings | low / high threshold | val score | val resistive | val conductive |",
              "|---|---|---|---|---|---|"]
    for m in results["methods"]:
        records = chosen[m]["seeds"] if get_method(m).seeded else [chosen[m]]
        for k, c in enumerate(records):
            own = ", ".join(f"{key} = {c[key]:.3g}" for key in ("iterations", "prior_std", "t0", "n_steps", "dc_weight")
                            if key in c) or ("each seed's own" if "members" in c else "-")
            name = f"{_name(m)} seed {k}" if get_method(m).seeded and len(records) > 1 else _name(m)
            lines.append(f"| {name} | {own} | {c['low']:g} / {c['high']:g} | {c['score']:.3f} | "
                         f"{c['resistive']:.3f} | {c['conductive']:.3f} |")
    lm = recorded_linear_model({m: chosen[m] for m in results["methods"]})
    if lm is not None:
        users = _listed([_name(m) for m in results["methods"] if get_method(m).seeded and recorded_linear_model({m: chosen[m]})])
        lines += ["", f"{users} samples with a data-consistency step at every reverse step (`dds`): the linearised model "
                  f"in the models' representation, dv ~ {lm['gain']:.3g} J (x - 1), fitted on {lm['n_samples']} training "
                  f"samples; its error, {lm['error_scale']:.3g} x the linearised step's error std (RMS), weights the data term."]
    lines += ["", "Segmentation (every method): the relative-conductivity image is upsampled bilinearly to 256 x 256 "
              "(water outside the disk); below `low` is resistive, above `high` conductive. The models reconstruct "
              f"sigma / sigma_water clipped to [0, 2] (plastic ~0, water 1, metal 2).{_sampled(cfg, results)}", "",
              f"![level {figure_level}](figures/{figure.name})", "", "## Time", ""]
    for name, seconds in manifest["timings"].items():
        lines.append(f"- {name}: {seconds / 60:.1f} min")
    lines += ["", "Stages already done (data, training, `methods.json`) are reused and count as ~0 here.", "",
              "Submissions in the challenge's format: `submissions/<method>/level_<L>/<n>.mat`; score them with "
              "`dgm-eit ktc-score --pred DIR --truth TRUTH_DIR`. Per-target scores: `scores.csv`."]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    with atomic_path(out / "timings.json") as tmp:
        Path(tmp).write_text(json.dumps({**{k: v for k, v in manifest.items()
                                            if k not in ("val_intervals", "val_pairs")},
                                         "seconds_per_image": _seconds_per_image(results)}, indent=2))
    return {"report": out / "report.md", "scores": out / "scores.csv", "figure": figure}
