"""Context topologies and SVD block targets (paper Eq. 12-15, 19-20)."""

import numpy as np
import pytest

from localmoe import targets


def test_topologies_match_the_paper():
  bd = targets.topology_mask("block_diagonal", 4)
  cb = targets.topology_mask("checkerboard", 4)
  us = targets.topology_mask("upper_shift", 4)
  np.testing.assert_array_equal(bd, np.eye(4, dtype=bool))
  # Eq. 14 (1-indexed): (1,2),(1,4),(2,1),(2,3),(3,2),(3,4),(4,1),(4,3).
  np.testing.assert_array_equal(
    cb, targets.cells_mask([(1, 2), (1, 4), (2, 1), (2, 3), (3, 2), (3, 4), (4, 1), (4, 3)], 4)
  )
  np.testing.assert_array_equal(us, targets.cells_mask([(1, 2), (2, 3), (3, 4)], 4))
  np.testing.assert_array_equal(targets.topology_mask("off_diagonal", 2), ~np.eye(2, dtype=bool))
  np.testing.assert_array_equal(
    targets.topology_mask("anti_diagonal", 4), targets.cells_mask([(1, 4), (2, 3), (3, 2), (4, 1)], 4)
  )


@pytest.mark.parametrize("spectrum", targets.SPECTRA)
def test_block_targets_are_zero_exactly_off_topology(spectrum):
  masks = np.stack([targets.topology_mask(n, 4) for n in ("block_diagonal", "checkerboard", "upper_shift")])
  w = targets.block_targets(np.random.default_rng(0), masks, 64, 64, spectrum)
  assert w.shape == (3, 64, 64)
  blocks = w.reshape(3, 4, 16, 4, 16).transpose(0, 1, 3, 2, 4)  # [D, i, j, 16, 16]
  norms = np.linalg.norm(blocks, axis=(-2, -1))
  assert np.all(norms[~masks] == 0.0)
  assert np.all(norms[masks] > 0.5)
  # Mean-square singular value 1: ||block||_F^2 ~= 16 (exactly for flat/decaying).
  if spectrum != "gaussian":
    np.testing.assert_allclose(norms[masks] ** 2, 16.0, rtol=1e-4)


def test_independent_versus_shared_blocks():
  masks = np.stack([targets.topology_mask(n, 4) for n in ("checkerboard", "upper_shift")])
  rng = lambda: np.random.default_rng(1)
  indep = targets.block_targets(rng(), masks, 64, 64, "flat", share_blocks=False)
  shared = targets.block_targets(rng(), masks, 64, 64, "flat", share_blocks=True)
  # Cell (1, 2) is active in both contexts: same block only when shared.
  np.testing.assert_array_equal(shared[0, :16, 16:32], shared[1, :16, 16:32])
  assert not np.allclose(indep[0, :16, 16:32], indep[1, :16, 16:32])


def test_svd_block_has_the_requested_singular_values():
  s = targets.spectrum("decaying", 16)
  block = targets.svd_block(np.random.default_rng(0), 16, 16, s, 0.5)
  np.testing.assert_allclose(np.linalg.svd(block, compute_uv=False), 0.5 * np.sort(s)[::-1], rtol=1e-6)


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match="topology='diagonal' is not known"):
    targets.topology_mask("diagonal", 4)
  with pytest.raises(ValueError, match="spectrum='power'"):
    targets.spectrum("power", 4)
