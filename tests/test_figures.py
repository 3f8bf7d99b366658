"""The report figures: resolution, the disk mask, named colourbars, stated clipping, one std
scale across a run, labelled test images; the KTC figure's grid with scores under their panels."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image

from dgm_eit.data.phantoms import disk_mask
from dgm_eit.errors import InputError
from dgm_eit.figures import DPI, clip_extend, outside_masked
from dgm_eit.report import comparison_figure

matplotlib.use("Agg")


@pytest.fixture
def drawn(monkeypatch):
    """The figures the functions under test close, kept for inspection."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def _circles(n: int, size: int = 16) -> np.ndarray:
    from conftest import _circle_images

    return _circle_images(np.random.default_rng(0), n, size)


def _panels(fig):
    """(axes, image) of every image panel, row by row as matplotlib keeps them."""
    return [(ax, ax.get_images()[0]) for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]


def _title_clears_the_headers(fig) -> bool:
    """Whether the figure's title sits above every column header, as saved (no new layout pass)."""
    fig.set_layout_engine("none")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bottom = fig._suptitle.get_window_extent(renderer).y0
    return all(ax.title.get_window_extent(renderer).y1 <= bottom + 0.5 for ax in fig.axes if ax.get_title())


def _colourbars(fig):
    return {im.colorbar.ax.get_xlabel() or im.colorbar.ax.get_ylabel(): im.colorbar
            for _, im in _panels(fig) if im.colorbar is not None}


def test_helpers_mask_the_outside_and_name_the_clipped_ends():
    images = outside_masked(np.ones((2, 8, 8)))
    assert np.isnan(images[:, ~disk_mask(8)]).all() and np.all(images[:, disk_mask(8)] == 1)
    assert disk_mask(8)[4, 4] and not disk_mask(8)[0, 0]
    assert clip_extend([np.array([0.2, np.nan, 1.0])], 0.0, 1.0) == "neither"
    assert clip_extend([np.array([0.5]), np.array([1.2])], 0.0, 1.0) == "max"
    assert clip_extend([np.array([-0.1, 1.1])], 0.0, 1.0) == "both"
    with pytest.raises(InputError, match="square"):
        outside_masked(np.ones((4, 5)))


def test_comparison_figure_is_paper_ready(tmp_path, drawn):
    truth = _circles(3)
    stds = {"CNF": np.full_like(truth, 0.2), "CSD*": np.full_like(truth, 0.9)}
    path = tmp_path / "fig.png"
    comparison_figure(path, truth, {"GN": truth * 0.9, "CNF": truth * 1.2}, stds, "T1: 2 anomalies, 40 dB",
                      indices=[4, 7, 9])
    fig = drawn[-1]
    assert Image.open(path).info["dpi"][0] == pytest.approx(DPI, abs=0.1) and DPI >= 150
    panels = _panels(fig)
    assert len(panels) == 3 * 5
    outside = ~disk_mask(16)
    for _, im in panels:   # the corners are masked, not drawn as a conductivity of 0
        assert np.ma.getmaskarray(im.get_array())[outside].all()
    assert [ax.get_ylabel() for ax, _ in panels if ax.get_ylabel()] == ["test image 4", "test image 7",
                                                                        "test image 9"]
    bars = _colourbars(fig)
    assert set(bars) == {"conductivity σ (background 1)", "per-pixel std of σ"}
    # the CNF overshoots 1.5 and the CSD* std exceeds the std scale: both ends say so
    assert bars["conductivity σ (background 1)"].extend == "max"
    assert bars["per-pixel std of σ"].extend == "max"
    assert "clipped" in fig._suptitle.get_text()
    # one std scale in every figure of a run: it follows the conductivity scale, not the std maps
    std_scales = {im.get_clim() for ax, im in panels if "std" in ax.get_title()}
    comparison_figure(tmp_path / "other.png", truth[:1], {"GN": truth[:1]}, {"CNF": np.full_like(truth[:1], 0.01)},
                      "T2")
    other = {im.get_clim() for ax, im in _panels(drawn[-1]) if "std" in ax.get_title()}
    assert std_scales == other == {(0.0, 0.5)}
    assert "clipped" not in drawn[-1]._suptitle.get_text()
    assert [ax.get_ylabel() for ax, _ in _panels(drawn[-1]) if ax.get_ylabel()] == ["test image 0"]
    # a narrow figure wraps its title onto more lines, still above the headers
    assert _title_clears_the_headers(fig) and _title_clears_the_headers(drawn[-1])
    comparison_figure(tmp_path / "given.png", truth[:1], {}, {"CNF": truth[:1] * 0.1}, "T", std_max=0.2,
                      row_label="phantom")
    assert {im.get_clim() for ax, im in _panels(drawn[-1]) if "std" in ax.get_title()} == {(0.0, 0.2)}
    assert [ax.get_ylabel() for ax, _ in _panels(drawn[-1]) if ax.get_ylabel()] == ["phantom 0"]
    with pytest.raises(InputError, match="2 indices for 3 images"):
        comparison_figure(tmp_path / "bad.png", truth, {}, {}, "T", indices=[0, 1])


def test_ktc_figure_is_a_grid_with_scores_under_their_panels(tmp_path, drawn):
    from dgm_eit.datasets import ktc2023 as ktc
    from dgm_eit.ktc.report import _figure
    from dgm_eit.ktc.segment import segment_images
    from dgm_eit.ktc.tank import public_dir

    numbers = [1, 2, 3, 4]
    truths = {n: ktc.load_truth(public_dir() / f"true{n}.mat") for n in numbers}
    small = np.stack([t[4::8, 4::8] for t in truths.values()])
    image = np.where(small == 1, 0.1, np.where(small == 2, 2.4, 1.0))   # conductive beyond the 0-2 scale
    results = {"numbers": numbers, "truths": truths, "methods": {}}
    for method in ("linear", "cnf"):
        classes = segment_images(image, 0.5, 1.5)
        results["methods"][method] = {2: {"recon": image, "classes": classes,
                                          "scores": [ktc.score(c, truths[n]) for c, n in zip(classes, numbers)]}}
    results["methods"]["cnf"][2]["recon_std"] = np.full(image.shape, 0.3)
    path = tmp_path / "figures" / "ktc_level2.png"
    _figure(path, results, 2)
    fig = drawn[-1]
    assert Image.open(path).info["dpi"][0] == pytest.approx(DPI, abs=0.1)
    grid = fig.axes[0].get_gridspec()
    assert (grid.nrows, grid.ncols) == (4, 1 + 2 + 3)   # truth; linearised image, classes; CNF image, std, classes
    panels = _panels(fig)
    headers = [ax.get_title() for ax, _ in panels if ax.get_title()]
    assert headers == ["true classes", "linearised\nimage", "linearised\nclasses", "CNF\nimage", "CNF\nstd",
                       "CNF\nclasses"]
    # each classes panel carries its own target's score right under it
    scored = [(ax.get_xlabel(), ax.get_subplotspec().rowspan.start) for ax, _ in panels if ax.get_xlabel()]
    expected = [(f"score {s:.3f}", row) for m in ("linear", "cnf")
                for row, s in enumerate(results["methods"][m][2]["scores"])]
    assert sorted(scored) == sorted(expected)
    # disk-shaped truths: the corners of the 256-px classes are masked too
    truth_panels = [im for ax, im in panels if ax.get_subplotspec().colspan.start == 0]
    assert len(truth_panels) == 4 and all(np.ma.getmaskarray(im.get_array())[0, 0] for im in truth_panels)
    bars = _colourbars(fig)
    assert {"sigma / sigma_water", "per-pixel std of sigma / sigma_water"} <= set(bars)
    assert bars["sigma / sigma_water"].extend == "max" and "clipped" in fig._suptitle.get_text()
    assert _title_clears_the_headers(fig)


def test_calibration_figure_has_a_panel_per_table_and_a_line_per_method(tmp_path, drawn):
    from matplotlib.colors import to_hex

    from dgm_eit.metrics import COVERAGE_LEVELS
    from dgm_eit.report import calibration_figure

    levels = np.array(COVERAGE_LEVELS)
    spread = np.full(len(levels), 0.02)
    curves = {"T1: 2 anomalies, 40 dB": {"CNF": (0.7 * levels, spread), "CSD*": (levels, spread)},
              "T1: 4 anomalies, 40 dB": {"CNF": (0.8 * levels, spread)},
              "T2: 2 anomalies, 25 dB": {"CSD* ens": (np.minimum(1.2 * levels, 1), np.full(len(levels), np.nan))},
              "T2: 4 anomalies, 25 dB": {"CNF": (levels, spread)}}
    path = tmp_path / "calibration.png"
    calibration_figure(path, curves)
    fig = drawn[-1]
    assert Image.open(path).info["dpi"][0] == pytest.approx(DPI, abs=0.1)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == list(curves)
    assert len(fig.axes) == 6   # a 2 x 3 grid, its last two cells hidden
    for ax, lines in zip(panels, curves.values()):
        assert ax.get_xlabel() == "nominal coverage of the interval"
        assert ax.get_ylabel() == "observed coverage (disk pixels)"
        assert (ax.get_xlim(), ax.get_ylim()) == ((0.0, 1.0), (0.0, 1.0))
        diagonal = [line for line in ax.get_lines() if line.get_label() == "calibrated"]
        assert len(diagonal) == 1
        np.testing.assert_array_equal(diagonal[0].get_xydata(), [[0, 0], [1, 1]])
        curves_drawn = {c.get_label(): c.lines[0] for c in ax.containers}   # errorbar: (data line, caps, bars)
        assert set(curves_drawn) == set(lines)
        for name, (observed, _) in lines.items():
            np.testing.assert_allclose(curves_drawn[name].get_xydata(), np.column_stack([levels, observed]))
    # one colour per method in every panel, one legend entry per method
    cnf = {to_hex(c.lines[0].get_color()) for ax in panels for c in ax.containers if c.get_label() == "CNF"}
    assert len(cnf) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["calibrated", "CNF", "CSD*", "CSD* ens"]
    with pytest.raises(InputError, match="no method"):
        calibration_figure(tmp_path / "none.png", {})
