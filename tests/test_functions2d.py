"""Tests of localmoe.data.functions2d: the nine 2-D test functions, their shift and sampling.

Reference values are written here independently of the module: literature minima (Surjanovic &
Bingham's VLSE) and plain-Python `math` implementations of each formula.
"""

from __future__ import annotations

import inspect
import json
import math

import jax
import numpy as np
import pytest

from localmoe.data import functions2d as f2d

NAMES = list(f2d.FUNCTION_NAMES)
PI = math.pi


# ------------------------------------------------------------------------------------------------
# Independent references: plain Python, one point at a time, VLSE constants written out.
# ------------------------------------------------------------------------------------------------

LANG_C = [1.0, 2.0, 5.0, 2.0, 3.0]
LANG_A = [[3.0, 5.0], [5.0, 2.0], [2.0, 1.0], [1.0, 4.0], [7.0, 9.0]]


def ref_langermann(x1: float, x2: float, c=LANG_C, A=LANG_A) -> float:
  total = 0.0
  for i in range(5):
    s = (x1 - A[i][0]) ** 2 + (x2 - A[i][1]) ** 2
    total += c[i] * math.exp(-s / PI) * math.cos(PI * s)
  return total


def ref_value(name: str, x1: float, x2: float) -> float:
  if name == "ackley":
    return (
      -20 * math.exp(-0.2 * math.sqrt((x1**2 + x2**2) / 2))
      - math.exp((math.cos(2 * PI * x1) + math.cos(2 * PI * x2)) / 2)
      + 20
      + math.e
    )
  if name == "dropwave":
    r2 = x1**2 + x2**2
    return -(1 + math.cos(12 * math.sqrt(r2))) / (0.5 * r2 + 2)
  if name == "langermann":
    return ref_langermann(x1, x2)
  if name == "levy":
    w1, w2 = 1 + (x1 - 1) / 4, 1 + (x2 - 1) / 4
    return (
      math.sin(PI * w1) ** 2
      + (w1 - 1) ** 2 * (1 + 10 * math.sin(PI * w1 + 1) ** 2)
      + (w2 - 1) ** 2 * (1 + math.sin(2 * PI * w2) ** 2)
    )
  if name == "matyas":
    return 0.26 * (x1**2 + x2**2) - 0.48 * x1 * x2
  if name == "michalewicz":
    return -(math.sin(x1) * math.sin(x1**2 / PI) ** 20 + math.sin(x2) * math.sin(2 * x2**2 / PI) ** 20)
  if name == "rastrigin":
    return 20 + x1**2 - 10 * math.cos(2 * PI * x1) + x2**2 - 10 * math.cos(2 * PI * x2)
  if name == "sincos":
    return math.sin(x1) * math.cos(x2)
  if name == "styblinski_tang":
    return 0.5 * sum(t**4 - 16 * t**2 + 5 * t for t in (x1, x2))
  raise KeyError(name)


# Literature minima (VLSE) and where they are; Langermann has none in VLSE, so its value is checked
# against the plain-Python reference at the stated minimiser instead; Sin-Cos's is ours (-1).
LITERATURE_MIN = {
  "ackley": (0.0, (0.0, 0.0), 1e-5),
  "dropwave": (-1.0, (0.0, 0.0), 1e-5),
  "levy": (0.0, (1.0, 1.0), 1e-5),
  "matyas": (0.0, (0.0, 0.0), 1e-6),
  "michalewicz": (-1.8013, (2.20, 1.57), 1e-4),
  "rastrigin": (0.0, (0.0, 0.0), 1e-5),
  "sincos": (-1.0, (-PI / 2, 0.0), 1e-6),
  "styblinski_tang": (-78.332, (-2.903534, -2.903534), 1e-3),
}


def _grid(name: str, k: int = 601) -> np.ndarray:
  spec = f2d.FUNCTIONS[name]
  g1 = np.linspace(*spec.bounds[0], k)
  g2 = np.linspace(*spec.bounds[1], k)
  return np.stack(np.meshgrid(g1, g2, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Definitions and minima
# ------------------------------------------------------------------------------------------------


# name -> ((lo, hi) of each coordinate: VLSE's domain (ours for sincos), coefficients the shift perturbs).
EXPECTED_REGISTRY = {
  "ackley": ((-32.768, 32.768), {"a", "b", "c"}),
  "dropwave": ((-5.12, 5.12), {"freq", "decay"}),
  "langermann": ((0.0, 10.0), {"c", "freq", "decay"}),
  "levy": ((-10.0, 10.0), {"freq", "mid_amp", "last_freq"}),
  "matyas": ((-10.0, 10.0), {"quad", "cross"}),
  "michalewicz": ((0.0, PI), {"m", "freq"}),
  "rastrigin": ((-5.12, 5.12), {"A", "freq"}),
  "sincos": ((-PI, PI), {"amp", "freq1", "freq2"}),
  "styblinski_tang": ((-5.0, 5.0), {"quartic", "quad"}),
}


def test_registry_names_domains_and_shifted_coefficients():
  assert NAMES == list(EXPECTED_REGISTRY)
  for name, spec in f2d.FUNCTIONS.items():
    box, shifted = EXPECTED_REGISTRY[name]
    assert spec.name == name
    assert spec.bounds == (box, box)
    assert set(spec.shifted_params) == shifted
    # The registry's source coefficients are the function's own keyword defaults.
    defaults = {k: p.default for k, p in inspect.signature(spec.fn).parameters.items() if k != "x"}
    assert defaults == dict(spec.default_params)


@pytest.mark.parametrize("name", NAMES)
def test_matches_plain_python_formula(name):
  spec = f2d.FUNCTIONS[name]
  rng = np.random.default_rng(0)
  pts = rng.uniform(spec.lower, spec.upper, size=(64, 2))
  got = np.asarray(f2d.evaluate(name, pts.astype(np.float32)), dtype=np.float64)
  want = np.array([ref_value(name, float(a), float(b)) for a, b in pts.astype(np.float32)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_minimum_value_at_minimiser(name):
  spec = f2d.FUNCTIONS[name]
  for m in spec.minimizers:
    value = float(f2d.evaluate(name, np.array(m, dtype=np.float32)))
    assert value == pytest.approx(spec.min_value, abs=1e-4 * max(1.0, abs(spec.min_value)))
  if name == "langermann":
    # No literature value: compare with the independent loop at the stated minimiser.
    assert spec.min_value == pytest.approx(ref_langermann(*spec.minimizers[0]), abs=1e-9)
  else:
    lit_value, lit_point, tol = LITERATURE_MIN[name]
    assert spec.min_value == pytest.approx(lit_value, abs=tol)
    assert any(np.allclose(m, lit_point, atol=5e-3) for m in spec.minimizers)
    at_lit_point = float(f2d.evaluate(name, np.array(lit_point, np.float32)))
    assert at_lit_point == pytest.approx(lit_value, abs=10 * tol)


@pytest.mark.parametrize("name", NAMES)
def test_minimum_is_global_on_dense_grid(name):
  spec = f2d.FUNCTIONS[name]
  values = np.asarray(f2d.evaluate(name, _grid(name)))
  assert np.all(np.isfinite(values))
  tol = 1e-4 * max(1.0, abs(spec.min_value))
  assert values.min() >= spec.min_value - tol
  for m in spec.minimizers:
    assert np.all(spec.lower <= np.array(m)) and np.all(np.array(m) <= spec.upper)


def test_langermann_against_plain_python_loop():
  for p in [(2.0, 1.0), (7.5, 3.3), (0.0, 10.0), (4.2, 8.8)]:
    got = float(f2d.evaluate("langermann", np.array(p, np.float32)))
    assert got == pytest.approx(ref_langermann(*p), abs=1e-5)
  # A partial params override reaches the formula: doubled c doubles the value.
  c2 = [2 * c for c in LANG_C]
  got = float(f2d.evaluate("langermann", np.array([7.5, 3.3], np.float32), params={"c": c2}))
  assert got == pytest.approx(ref_langermann(7.5, 3.3, c=c2), abs=1e-5)


def test_names_and_errors():
  with pytest.raises(ValueError, match="rastrigin"):
    f2d.evaluate("rosenbrock", np.zeros(2))
  with pytest.raises(ValueError, match="styblinski_tang"):
    f2d.make_shift("nope", 0)
  assert f2d.get_spec("Sin-Cos").name == "sincos"
  assert f2d.get_spec("Styblinski-Tang").name == "styblinski_tang"
  with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
    f2d.evaluate("ackley", np.zeros((4, 3)))
  with pytest.raises(ValueError, match="Unknown params"):
    f2d.evaluate("ackley", np.zeros(2), params={"d": 1.0})
  with pytest.raises(ValueError, match="shift_scale"):
    f2d.make_shift("ackley", 0, shift_scale=-1.0)


def test_vectorised_and_jittable():
  x = np.random.default_rng(1).uniform(-5, 5, size=(3, 4, 2)).astype(np.float32)
  y = f2d.evaluate("levy", x)
  assert y.shape == (3, 4)
  y_jit = jax.jit(lambda z: f2d.evaluate("levy", z))(x)
  np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Shift
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shift_is_deterministic_and_seed_dependent(name):
  a, b, c = f2d.make_shift(name, 7), f2d.make_shift(name, 7), f2d.make_shift(name, 8)
  assert a.to_dict() == b.to_dict()
  assert a.angle != c.angle
  for k in f2d.FUNCTIONS[name].shifted_params:
    assert not np.allclose(a.params[k], c.params[k])


def test_same_seed_gives_unrelated_shifts_across_functions():
  angles = {f2d.make_shift(name, 0).angle for name in NAMES}
  assert len(angles) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shifted_function_differs_from_source(name):
  spec = f2d.FUNCTIONS[name]
  shift = f2d.make_shift(name, 0)
  x = _grid(name, 101)
  source = np.asarray(f2d.evaluate(name, x))
  target = np.asarray(shift.evaluate(x))
  assert np.mean(np.abs(target - source)) > 0.05 * source.std()
  # Only the named coefficients move, each by a factor within exp(+-[0.10, 0.25]).
  for k, v in spec.default_params.items():
    ratio = np.asarray(shift.params[k], dtype=np.float64) / np.asarray(v, dtype=np.float64)
    if k in spec.shifted_params:
      assert np.all(np.abs(np.log(ratio)) >= 0.10 - 1e-12)
      assert np.all(np.abs(np.log(ratio)) <= 0.25 + 1e-12)
      assert len(np.unique(ratio)) == ratio.size  # vector coefficients move element-wise
    else:
      np.testing.assert_array_equal(ratio, 1.0)
  assert math.radians(15) - 1e-12 <= abs(shift.angle) <= math.radians(30) + 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_zero_shift_scale_is_the_source(name):
  shift = f2d.make_shift(name, 3, shift_scale=0.0)
  assert shift.angle == 0.0
  x = _grid(name, 101)
  np.testing.assert_allclose(np.asarray(shift.evaluate(x)), np.asarray(f2d.evaluate(name, x)), rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_rotation_convention(name):
  """A pure rotation turns the landscape counter-clockwise about the box centre."""
  spec = f2d.FUNCTIONS[name]
  angle = 0.4
  shift = f2d.Shift(name=name, angle=angle, params=dict(spec.default_params))
  p = np.random.default_rng(2).uniform(spec.lower, spec.upper, size=(64, 2))
  rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
  q = spec.centre + (p - spec.centre) @ rot.T  # where the feature at p moves to
  scale = max(1.0, float(np.abs(np.asarray(f2d.evaluate(name, p))).max()))
  np.testing.assert_allclose(
    np.asarray(shift.evaluate(q.astype(np.float32))),
    np.asarray(f2d.evaluate(name, p.astype(np.float32))),
    atol=2e-3 * scale,
  )
  # The rotation alone changes every function except the radially symmetric Drop-Wave.
  rotated, source = np.asarray(shift.evaluate(p)), np.asarray(f2d.evaluate(name, p))
  changed = not np.allclose(rotated, source, atol=1e-3 * scale)
  assert changed == (name != "dropwave")


def test_shift_json_round_trip():
  shift = f2d.make_shift("langermann", 11, shift_scale=0.5)
  record = json.loads(json.dumps(shift.to_dict()))
  assert record["name"] == "langermann" and record["seed"] == 11 and record["shift_scale"] == 0.5
  back = f2d.Shift.from_dict(record)
  assert back.to_dict() == shift.to_dict()
  x = _grid("langermann", 101)
  np.testing.assert_array_equal(np.asarray(back.evaluate(x)), np.asarray(shift.evaluate(x)))


# ------------------------------------------------------------------------------------------------
# Sampling and scaling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_sample_task_shapes_bounds_and_determinism(name):
  spec = f2d.FUNCTIONS[name]
  x, y = f2d.sample_task(name, 500, seed=0)
  assert x.shape == (500, 2) and y.shape == (500,)
  assert x.dtype == np.float32 and y.dtype == np.float32
  assert np.all(x >= spec.lower.astype(np.float32)) and np.all(x <= spec.upper.astype(np.float32))
  # Uniform over the box: both coordinates spread over most of it.
  span = (x.max(0) - x.min(0)) / (spec.upper - spec.lower)
  assert np.all(span > 0.9)
  x2, y2 = f2d.sample_task(name, 500, seed=0)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  x3, _ = f2d.sample_task(name, 500, seed=1)
  assert not np.array_equal(x, x3)


def test_sample_task_noise_level():
  x, y = f2d.sample_task("rastrigin", 20_000, seed=5, noise_sd=0.05)
  resid = y.astype(np.float64) - np.asarray(f2d.evaluate("rastrigin", x), dtype=np.float64)
  assert resid.std() == pytest.approx(0.05, rel=0.05)
  assert abs(resid.mean()) < 0.003
  x0, y0 = f2d.sample_task("rastrigin", 500, seed=5, noise_sd=0.0)
  np.testing.assert_allclose(y0, np.asarray(f2d.evaluate("rastrigin", x0)), rtol=1e-6, atol=1e-6)


def test_sample_task_target_uses_shift():
  shift = f2d.make_shift("levy", 1)
  x, y = f2d.sample_task("levy", 500, seed=2, shift=shift, noise_sd=0.0)
  np.testing.assert_allclose(y, np.asarray(shift.evaluate(x)), rtol=1e-5, atol=1e-5)
  assert not np.allclose(y, np.asarray(f2d.evaluate("levy", x)), atol=0.1)
  with pytest.raises(ValueError, match="shift is for"):
    f2d.sample_task("ackley", 10, seed=0, shift=shift)


@pytest.mark.parametrize("name", NAMES)
def test_standardize_inputs(name):
  spec = f2d.FUNCTIONS[name]
  corners = np.stack([spec.lower, spec.upper]).astype(np.float32)
  np.testing.assert_allclose(f2d.standardize_inputs(corners, name), [[-1, -1], [1, 1]], atol=1e-6)
  centre = spec.centre.astype(np.float32)
  np.testing.assert_allclose(f2d.standardize_inputs(centre, name), [0, 0], atol=1e-6)
  x, _ = f2d.sample_task(name, 500, seed=0)
  z = f2d.standardize_inputs(x, name)
  assert np.all(np.abs(z) <= 1.0 + 1e-6)
  np.testing.assert_allclose(f2d.unstandardize_inputs(z, name), x, rtol=1e-5, atol=1e-5)


def test_target_stats():
  mean, std = f2d.target_stats("sincos")
  assert (mean, std) == f2d.target_stats("sincos")
  # sin(x1) cos(x2) over whole periods: mean 0, variance 1/2 * 1/2.
  assert mean == pytest.approx(0.0, abs=0.01)
  assert std == pytest.approx(0.5, abs=0.01)
