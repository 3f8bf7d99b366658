import numpy as np
import pytest
import torch

from dgm_eit.errors import InputError
from dgm_eit.physics import EITOperator, ForwardModel, PixelGrid, disk_mesh, make_protocol

ADJ = make_protocol("adjacent", 16)


@pytest.fixture(scope="module")
def small():
    mesh = disk_mesh(16, 0.2)
    return mesh, ForwardModel(mesh, ADJ), PixelGrid(mesh, 12)


def test_grid_geometry_and_constant_images(small):
    mesh, _, grid = small
    assert grid.inside.shape == (12, 12)
    # y is up: row 0 is the top, column 0 the left
    assert grid.y[0, 0] > 0 > grid.y[-1, 0] and grid.x[0, 0] < 0 < grid.x[0, -1]
    img = grid.to_image(np.full(mesh.n_elements, 2.5))
    np.testing.assert_array_equal(img, np.where(grid.inside, 2.5, 0.0))
    np.testing.assert_allclose(grid.to_elements(np.full((12, 12), 1.7)), 1.7, rtol=1e-12)
    # matrices have the documented shapes and row sums
    assert grid.image_matrix.shape == (144, mesh.n_elements)
    np.testing.assert_allclose(np.asarray(grid.element_matrix.sum(axis=1)).ravel(), 1.0)


def test_grid_round_trip_of_a_smooth_field_and_batches():
    mesh = disk_mesh(16, 0.1)
    grid = PixelGrid(mesh, 64)
    c = mesh.centroids
    values = 1 + 0.3 * c[:, 0] - 0.2 * c[:, 1] ** 2
    img = grid.to_image(values)
    back = grid.to_elements(img)
    assert np.abs(back - values).max() < 0.05
    batch = np.stack([values, 2 * values])[None]  # (1, 2, m)
    out = grid.to_image(batch)
    assert out.shape == (1, 2, 64, 64)
    np.testing.assert_allclose(out[0, 1], 2 * img)
    assert grid.to_elements(out).shape == (1, 2, mesh.n_elements)
    with pytest.raises(InputError, match="trailing shape"):
        grid.to_elements(np.ones((32, 32)))
    with pytest.raises(InputError, match="last dimension"):
        grid.to_image(np.ones(5))


def test_every_element_gets_a_value_even_when_smaller_than_a_pixel():
    mesh = disk_mesh(16, 0.05)
    grid = PixelGrid(mesh, 8)  # pixels far larger than the boundary elements
    weights = grid.element_matrix
    assert np.all(np.diff(weights.indptr) > 0)
    img = np.where(grid.inside, np.arange(64).reshape(8, 8), 0.0)
    vals = grid.to_elements(img)
    assert vals.min() >= img[grid.inside].min() and vals.max() <= img[grid.inside].max()


def test_operator_matches_forward_model_for_images_and_elements(small):
    mesh, fm, grid = small
    op = EITOperator(fm, grid)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0.5, 2.0, (3, 12, 12)).astype(np.float32))
    v = op(images)
    assert v.shape == (3, 208) and v.dtype == torch.float32
    sigma = grid.to_elements(images.double().numpy())
    np.testing.assert_allclose(v.double().numpy(), fm.forward(sigma), rtol=1e-5)
    np.testing.assert_allclose(op(images[:, None]).numpy(), v.numpy())
    # a module cast to another dtype (e.g. with the rest of a model) still works
    np.testing.assert_allclose(op.to(torch.float32)(images).numpy(), v.numpy())
    elements = torch.from_numpy(sigma)
    np.testing.assert_allclose(op(elements).numpy(), fm.forward(sigma), rtol=1e-12)
    with pytest.raises(InputError, match="shape"):
        op(torch.ones(2, 5, 5))
    with pytest.raises(InputError, match="positive"):
        op(-torch.ones(1, 12, 12))


def test_gradcheck_through_images_and_elements(small):
    mesh, fm, grid = small
    op = EITOperator(fm, grid)
    rng = np.random.default_rng(1)
    images = torch.tensor(rng.uniform(0.5, 2.0, (2, 12, 12)), requires_grad=True)
    weights = torch.tensor(rng.normal(size=(2, 208)))
    # project onto a few random measurement combinations to keep gradcheck cheap
    assert torch.autograd.gradcheck(lambda x: (op(x) * weights).sum(dim=1), (images,), eps=1e-6, atol=1e-8, rtol=1e-5)
    sigma = torch.tensor(rng.uniform(0.5, 2.0, (1, mesh.n_elements)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: op(s)[:, ::17], (sigma,), eps=1e-6, atol=1e-8, rtol=1e-5)


def test_gradient_of_data_misfit_points_downhill(small):
    mesh, fm, grid = small
    op = EITOperator(fm, grid)
    truth = torch.ones(1, 12, 12, dtype=torch.float64)
    truth[:, 3:6, 3:6] = 2.0
    v_obs = op(truth).detach()
    x = torch.ones(1, 12, 12, dtype=torch.float64, requires_grad=True)
    loss = ((op(x) - v_obs) ** 2).sum()
    loss.backward()
    with torch.no_grad():
        step = x - 1e-3 / x.grad.abs().max() * x.grad
        assert ((op(step) - v_obs) ** 2).sum() < loss


def test_min_sigma_clamps_and_blocks_the_gradient(small):
    mesh, fm, grid = small
    op = EITOperator(fm, min_sigma=0.1)
    s = torch.ones(1, mesh.n_elements, dtype=torch.float64)
    s[0, :5] = -1.0
    s.requires_grad_(True)
    v = op(s)
    clamped = torch.ones(1, mesh.n_elements, dtype=torch.float64)
    clamped[0, :5] = 0.1
    np.testing.assert_allclose(v.detach().numpy(), op(clamped).numpy())
    v.sum().backward()
    assert torch.all(s.grad[0, :5] == 0) and torch.any(s.grad[0, 5:] != 0)


def test_grid_must_belong_to_the_forward_model_mesh(small):
    _, fm, _ = small
    with pytest.raises(InputError, match="different mesh"):
        EITOperator(fm, PixelGrid(disk_mesh(16, 0.1), 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operator_on_cuda_returns_cuda_tensors_and_gradients(small):
    mesh, fm, grid = small
    op = EITOperator(fm, grid).to("cuda")
    x = torch.full((2, 12, 12), 1.2, device="cuda", requires_grad=True)
    v = op(x)
    assert v.device.type == "cuda" and v.shape == (2, 208)
    v.square().sum().backward()
    assert x.grad.device.type == "cuda" and torch.isfinite(x.grad).all()
    np.testing.assert_allclose(v.detach().cpu().numpy(), op.cpu()(x.detach().cpu()).numpy(), rtol=1e-5)


def test_models_from_config():
    from dgm_eit.config import load_config
    from dgm_eit.physics import forward_model_from_config, operator_from_config

    cfg = load_config("smoke", ["simulation.h0=0.08"])
    coarse = forward_model_from_config(cfg)
    fine = forward_model_from_config(cfg, "simulation")
    assert coarse.mesh is disk_mesh(16, cfg["mesh"]["h0"]) and fine.mesh is disk_mesh(16, 0.08)
    assert fine.n_meas == coarse.n_meas == 208
    op = operator_from_config(cfg, image_size=16)
    assert op.grid.shape == (16, 16) and op.fm.mesh is coarse.mesh
    assert op(torch.ones(2, 16, 16, dtype=torch.float64)).shape == (2, 208)
    with pytest.raises(InputError, match="no \\[nope\\] section"):
        forward_model_from_config(cfg, "nope")
