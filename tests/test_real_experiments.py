"""Logic of the real-data experiments: California field scaling, MNIST quadrants and degradation targets,
the truncated-SVD approximations of Table I. Tiny synthetic arrays only (no data download, no training)."""

import ml_collections
import numpy as np
import pytest

from experiments import california_housing as cal
from experiments import mnist_approximation as approx
from experiments import mnist_degradation as deg
from localmoe import targets

pytestmark = pytest.mark.slow  # every test here launches processes or trains end to end

# --- California Housing ---------------------------------------------------------------------------------


def test_field_order_puts_demographics_then_property():
  names = ["MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude", "Longitude"]
  order = cal.field_order(names)
  assert [names[i] for i in order] == [
    "MedInc",
    "HouseAge",
    "Population",
    "AveOccup",
    "AveRooms",
    "AveBedrms",
    "Latitude",
    "Longitude",
  ]


@pytest.mark.parametrize("scaling", cal.SCALINGS)
def test_scaling_is_fieldwise(scaling):
  rng = np.random.default_rng(0)
  fit = rng.standard_normal((500, 8)) * np.arange(1, 9) + 10 * np.arange(8)
  x = rng.standard_normal((50, 8)) * 3
  out = cal.scale_fields(fit, x, [4, 4], scaling, clip_z=5.0)
  # A field's output depends only on that field: changing field 2 (in the data and the fit set) leaves field 1.
  fit2, x2 = fit.copy(), x.copy()
  fit2[:, 4:] *= 7.0
  x2[:, 4:] += 100.0
  np.testing.assert_allclose(cal.scale_fields(fit2, x2, [4, 4], scaling, 5.0)[:, :4], out[:, :4], rtol=1e-6)
  if scaling == "standard":
    z = cal.scale_fields(fit, fit, [4, 4], scaling)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)


def test_clip_caps_extreme_rows():
  fit = np.concatenate([np.random.default_rng(1).standard_normal((999, 8)), np.full((1, 8), 1000.0)])
  z = cal.scale_fields(fit, fit, [4, 4], "clip", clip_z=3.0)
  assert np.abs(z).max() == pytest.approx(3.0)
  assert np.abs(cal.scale_fields(fit, fit, [4, 4], "standard")).max() > 30


# --- MNIST sensor degradation ---------------------------------------------------------------------------


def test_quadrants_round_trip_and_known_pixels():
  images = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
  x = deg.to_quadrants(images)
  assert x.shape == (3, 784)
  np.testing.assert_array_equal(deg.from_quadrants(x), images)
  img = np.zeros((1, 28, 28), np.float32)
  img[0, 14, 0] = 1.0  # first pixel of quadrant 3 (bottom-left)
  img[0, 0, 14] = 2.0  # first pixel of quadrant 2 (top-right)
  img[0, 27, 27] = 3.0  # last pixel of quadrant 4 (bottom-right)
  img[0, 1, 2] = 4.0  # quadrant 1, row 1, column 2
  x = deg.to_quadrants(img)[0]
  assert x[2 * 196] == 1.0 and x[196] == 2.0 and x[783] == 3.0 and x[14 + 2] == 4.0
  assert np.count_nonzero(x) == 4


def test_degrade_zeroes_quadrant_4_of_context_1_only():
  x = np.ones((4, 784), np.float32)
  ctx = np.array([0, 1, 0, 1])
  out = deg.degrade(x, ctx)
  assert np.all(out[ctx == 0] == 1)
  assert np.all(out[ctx == 1, 588:] == 0) and np.all(out[ctx == 1, :588] == 1)
  assert np.all(x == 1)  # the input is not modified in place


def test_context_targets_topologies_and_never_read_x4():
  masks = deg.context_masks(deg.parse_cells("1-3,3-1,2-1,4-3"))
  assert {tuple(c + 1) for c in np.argwhere(masks[0])} == {(1, 4), (2, 3), (3, 2), (4, 1)}
  assert {tuple(c + 1) for c in np.argwhere(masks[1])} == {(1, 3), (3, 1), (2, 1), (4, 3)}
  assert not masks[1][:, 3].any() and not np.diag(masks[1]).any()
  rng = np.random.default_rng(0)
  w = targets.block_targets(rng, masks, 784, 784, "gaussian", 1.0)  # [2, 784, 784]
  assert np.all(w[1][:, 588:] == 0)  # context 1 never reads x4
  assert np.any(w[0][:, 588:] != 0)
  x = rng.random((6, 784)).astype(np.float32)
  ctx = np.array([0, 1, 0, 1, 1, 0])
  y = deg.apply_targets(w, deg.degrade(x, ctx), ctx)
  x_changed = x.copy()
  x_changed[:, 588:] = 5.0  # a different x4
  y_changed = deg.apply_targets(w, deg.degrade(x_changed, ctx), ctx)
  np.testing.assert_allclose(y_changed[ctx == 1], y[ctx == 1], rtol=1e-5)  # unaffected by x4
  assert not np.allclose(y_changed[ctx == 0], y[ctx == 0])
  np.testing.assert_allclose(y[0], w[0] @ x[0], rtol=1e-4, atol=1e-5)


def test_degraded_cells_reading_x4_are_rejected():
  from configs import mnist_degradation as config_module

  config = config_module.get_config("quick")
  config.data.degraded_cells = "1-4,3-1"
  with pytest.raises(ValueError, match="degraded_cells"):
    deg.validate(config)


# --- Table I: truncated-SVD approximations ---------------------------------------------------------------


def _direct(matrix, k, rank, diagonal_only):
  """Reference: numpy SVD of every block, written out with explicit slices."""
  out = np.zeros_like(matrix)
  b = matrix.shape[0] // k
  for i in range(k):
    for j in range(k):
      if diagonal_only and i != j:
        continue
      u, s, vt = np.linalg.svd(matrix[i * b : (i + 1) * b, j * b : (j + 1) * b])
      out[i * b : (i + 1) * b, j * b : (j + 1) * b] = u[:, :rank] @ np.diag(s[:rank]) @ vt[:rank]
  return np.linalg.norm(matrix - out) / np.linalg.norm(matrix)


@pytest.mark.parametrize(
  "name,k,rank,diagonal_only", [("lora", 1, 2, False), ("melora", 2, 2, True), ("localized_lora", 2, 1, False)]
)
def test_approximation_errors_match_direct_svd(name, k, rank, diagonal_only):
  image = np.random.default_rng(3).random((8, 8))
  spec = {
    "lora": ml_collections.ConfigDict(dict(rank=rank)),
    "melora": ml_collections.ConfigDict(dict(num_blocks=k, rank=rank)),
    "localized_lora": ml_collections.ConfigDict(dict(k=k, rank=rank)),
  }[name]
  error = approx.relative_error(image, approx.approximate(name, spec, image))
  assert error == pytest.approx(_direct(image, k, rank, diagonal_only), rel=1e-10)


def test_approximation_budget_is_224_at_the_papers_settings():
  from configs import mnist_approximation as config_module

  config = config_module.get_config()
  for name in approx.METHODS:
    assert approx.method_params(name, config.methods[name], 28, 28) == 224
