"""Nine 2-D non-convex test functions and their seeded source -> target shift.

This is the data of the synthetic regression benchmark of the Queryable LoRA paper (Sec. 4.1 and
App. B.3, Tables 1, 2, 9, 10): a backbone is pre-trained on noisy samples of a *source* function and
then adapted to a *target* version of the same function "with shifted parameters (in particular, we
vary the coefficients on the non-linear terms in the functions and rotate the outputs)".

What the paper fixes, and what this module chooses
--------------------------------------------------
Stated by the paper (followed here):
  * the nine functions (Ackley, Dropwave, Langermann, Levy, Matyas, Michalewicz, Rastrigin, Sin-Cos,
    Styblinski-Tang), in 2-D, "drawn from" Surjanovic & Bingham's Virtual Library of Simulation
    Experiments (VLSE, sfu.ca/~ssurjano);
  * inputs uniform over a box, the *same* box for source and target;
  * additive Gaussian label noise with standard deviation 0.05 (the default of `sample_task`);
  * the target perturbs the coefficients of the non-linear terms and applies a rotation.
  (Sample sizes, 3,000 source / 1,200 target, belong to the experiment, not to this module.)

Not stated by the paper (our choices, each documented where it is made):
  * the boxes: we use VLSE's standard 2-D domains (`FunctionSpec.bounds`);
  * Sin-Cos, which VLSE does not contain and the paper does not define: see `sincos`;
  * which coefficients count as "non-linear" for each function (`FunctionSpec.shifted_params`);
  * the size and distribution of the perturbation and of the rotation angle: see `make_shift`;
  * *what* is rotated.  Sec. 4.1 says "rotate the outputs", but the output is a scalar, which has
    no rotation; we read it as a rotation of the **input** plane about the centre of the box (the
    landscape is turned), and record the angle.  See `Shift`.
  * whether labels are standardised: the paper does not say; see `target_stats`.

Conventions
-----------
Every function takes ``x`` of shape ``[..., 2]`` and returns ``[...]``; it is written in
`jax.numpy`, so it can be jitted, vmapped and differentiated (except that Ackley and Dropwave use
``sqrt(|x|^2)``, whose gradient is NaN exactly at the origin).  Its keyword arguments are its
coefficients, with VLSE's values as defaults; `FunctionSpec.shifted_params` names those the
target shift perturbs.

Usage::

    x_src, y_src = sample_task("rastrigin", 3000, seed=0)                 # source task
    shift = make_shift("rastrigin", seed=0)                              # target definition
    x_tgt, y_tgt = sample_task("rastrigin", 1200, seed=1, shift=shift)   # target task
    json.dumps(shift.to_dict())                                          # record it in results
    x_in = standardize_inputs(x_src, "rastrigin")                        # network input in [-1,1]^2
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # a jax or numpy array
ParamValue = float | tuple  # a scalar coefficient, or a (nested) tuple of floats for vector ones

PI = math.pi


def _as_float(x: Array) -> Array:
  """x as a floating jax array (integer inputs become float32)."""
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# The nine functions.  x: [..., 2] -> [...].  Defaults are the VLSE coefficients.
# --------------------------------------------------------------------------------------------------


def ackley(x: Array, a: float = 20.0, b: float = 0.2, c: float = 2 * PI) -> Array:
  """Ackley: -a exp(-b sqrt(mean_i x_i^2)) - exp(mean_i cos(c x_i)) + a + e.

  Global minimum 0 at the origin for *any* (a, b, c).
  """
  x = _as_float(x)
  r = jnp.sqrt(jnp.mean(x**2, axis=-1))  # [...]
  return -a * jnp.exp(-b * r) - jnp.exp(jnp.mean(jnp.cos(c * x), axis=-1)) + a + math.e


def dropwave(x: Array, freq: float = 12.0, decay: float = 0.5, offset: float = 2.0) -> Array:
  """Drop-Wave: -(1 + cos(freq |x|)) / (decay |x|^2 + offset).

  Global minimum -2/offset (= -1 for VLSE's values) at the origin, for any freq and decay.
  Radially symmetric about the origin.
  """
  x = _as_float(x)
  r2 = jnp.sum(x**2, axis=-1)  # [...]
  return -(1.0 + jnp.cos(freq * jnp.sqrt(r2))) / (decay * r2 + offset)


_LANGERMANN_C = (1.0, 2.0, 5.0, 2.0, 3.0)
_LANGERMANN_A = ((3.0, 5.0), (5.0, 2.0), (2.0, 1.0), (1.0, 4.0), (7.0, 9.0))


def langermann(
  x: Array,
  c: Sequence[float] = _LANGERMANN_C,
  A: Sequence[Sequence[float]] = _LANGERMANN_A,
  freq: float = PI,
  decay: float = 1.0 / PI,
) -> Array:
  """Langermann (m = 5): sum_i c_i exp(-decay s_i) cos(freq s_i),  s_i = |x - A_i|^2.

  VLSE's form, with decay = 1/pi and freq = pi.  VLSE gives no global minimum; ours is found
  numerically (see `FUNCTIONS["langermann"]`).
  """
  x = _as_float(x)
  c_arr = jnp.asarray(c, dtype=x.dtype)  # [m]
  a_arr = jnp.asarray(A, dtype=x.dtype)  # [m, 2]
  s = jnp.sum((x[..., None, :] - a_arr) ** 2, axis=-1)  # [..., m]
  return jnp.sum(c_arr * jnp.exp(-decay * s) * jnp.cos(freq * s), axis=-1)


def levy(x: Array, freq: float = PI, mid_amp: float = 10.0, last_freq: float = 2 * PI) -> Array:
  """Levy (d = 2), with w_i = 1 + (x_i - 1)/4:

      sin^2(freq w_1) + (w_1 - 1)^2 [1 + mid_amp sin^2(freq w_1 + 1)]
                      + (w_2 - 1)^2 [1 + sin^2(last_freq w_2)].

  Global minimum 0 at (1, 1) for VLSE's values (freq = pi, mid_amp = 10, last_freq = 2 pi).
  """
  x = _as_float(x)
  w = 1.0 + (x - 1.0) / 4.0  # [..., 2]
  w1, w2 = w[..., 0], w[..., 1]
  return (
    jnp.sin(freq * w1) ** 2
    + (w1 - 1.0) ** 2 * (1.0 + mid_amp * jnp.sin(freq * w1 + 1.0) ** 2)
    + (w2 - 1.0) ** 2 * (1.0 + jnp.sin(last_freq * w2) ** 2)
  )


def matyas(x: Array, quad: float = 0.26, cross: float = 0.48) -> Array:
  """Matyas: quad (x_1^2 + x_2^2) - cross x_1 x_2.  Global minimum 0 at the origin.

  Convex while quad > cross / 2 (0.26 > 0.24 for VLSE's values); a large shift can break this,
  which is harmless for regression but means the target may be a saddle.
  """
  x = _as_float(x)
  x1, x2 = x[..., 0], x[..., 1]
  return quad * (x1**2 + x2**2) - cross * x1 * x2


def michalewicz(x: Array, m: float = 10.0, freq: float = 1.0 / PI) -> Array:
  """Michalewicz (d = 2): -sum_i sin(x_i) sin^(2m)(freq * i * x_i^2),  i = 1, 2.

  VLSE uses freq = 1/pi and m = 10; sin^(2m) is computed as (sin^2)^m so that a perturbed,
  non-integer m stays real.  Global minimum -1.8013 at about (2.20, 1.57).
  """
  x = _as_float(x)
  i = jnp.arange(1, x.shape[-1] + 1, dtype=x.dtype)  # [2]: the coordinate index
  return -jnp.sum(jnp.sin(x) * (jnp.sin(freq * i * x**2) ** 2) ** m, axis=-1)


def rastrigin(x: Array, A: float = 10.0, freq: float = 2 * PI) -> Array:
  """Rastrigin: A d + sum_i (x_i^2 - A cos(freq x_i)).  Global minimum 0 at the origin for any
  (A, freq)."""
  x = _as_float(x)
  return A * x.shape[-1] + jnp.sum(x**2 - A * jnp.cos(freq * x), axis=-1)


def sincos(x: Array, amp: float = 1.0, freq1: float = 1.0, freq2: float = 1.0) -> Array:
  """Sin-Cos: amp * sin(freq1 x_1) * cos(freq2 x_2), on [-pi, pi]^2 (our definition).

  Sin-Cos is not in VLSE and the paper gives no formula, only the name.  We take the simplest
  function the name describes, the separable product sin(x_1) cos(x_2), on one full period in each
  coordinate, [-pi, pi]^2, so that the box holds whole periods and the landscape has several
  equal minima and maxima (non-convex, but smooth and regular, which is how the paper describes
  it: a "highly regular repeated landscape").  Minimum -amp, attained at (-pi/2, 0),
  (pi/2, pi) and (pi/2, -pi) for freq1 = freq2 = 1 (the last two on the box's edge).
  """
  x = _as_float(x)
  return amp * jnp.sin(freq1 * x[..., 0]) * jnp.cos(freq2 * x[..., 1])


def styblinski_tang(x: Array, quartic: float = 1.0, quad: float = 16.0, linear: float = 5.0) -> Array:
  """Styblinski-Tang: 1/2 sum_i (quartic x_i^4 - quad x_i^2 + linear x_i), summed over both
  coordinates (VLSE's form; *not* further divided by d = 2).

  Global minimum -39.16617 * 2 = -78.33233 at (-2.903534, -2.903534).
  """
  x = _as_float(x)
  return 0.5 * jnp.sum(quartic * x**4 - quad * x**2 + linear * x, axis=-1)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FunctionSpec:
  """One benchmark function and the facts about its SOURCE (unshifted) version."""

  name: str  # registry key, lowercase, e.g. "styblinski_tang"
  fn: Callable[..., Array]  # fn(x [..., 2], **params) -> [...]
  bounds: tuple[tuple[float, float], tuple[float, float]]  # ((lo_1, hi_1), (lo_2, hi_2)): the box
  default_params: Mapping[str, ParamValue]  # VLSE coefficients (the source function)
  shifted_params: tuple[str, ...]  # the coefficients of non-linear terms that `make_shift` perturbs
  minimizers: tuple[tuple[float, float], ...]  # known global minimiser(s) of the source in the box
  min_value: float  # the source's global minimum value over the box
  note: str = ""  # where the minimum comes from, or other caveats

  @property
  def lower(self) -> np.ndarray:
    """Lower corner of the box, [2]."""
    return np.array([b[0] for b in self.bounds], dtype=np.float64)

  @property
  def upper(self) -> np.ndarray:
    """Upper corner of the box, [2]."""
    return np.array([b[1] for b in self.bounds], dtype=np.float64)

  @property
  def centre(self) -> np.ndarray:
    """Centre of the box, [2]: the pivot of the target's rotation."""
    return 0.5 * (self.lower + self.upper)


def _box(lo: float, hi: float) -> tuple[tuple[float, float], tuple[float, float]]:
  return ((lo, hi), (lo, hi))


FUNCTIONS: dict[str, FunctionSpec] = {
  "ackley": FunctionSpec(
    name="ackley",
    fn=ackley,
    bounds=_box(-32.768, 32.768),
    default_params={"a": 20.0, "b": 0.2, "c": 2 * PI},
    shifted_params=("a", "b", "c"),
    minimizers=((0.0, 0.0),),
    min_value=0.0,
    note="VLSE",
  ),
  "dropwave": FunctionSpec(
    name="dropwave",
    fn=dropwave,
    bounds=_box(-5.12, 5.12),
    default_params={"freq": 12.0, "decay": 0.5, "offset": 2.0},
    shifted_params=("freq", "decay"),
    minimizers=((0.0, 0.0),),
    min_value=-1.0,
    note="VLSE. Radially symmetric about the box centre, so the target's rotation has no effect; "
    "its shift comes from freq and decay only (offset is kept so the minimum stays -1).",
  ),
  "langermann": FunctionSpec(
    name="langermann",
    fn=langermann,
    bounds=_box(0.0, 10.0),
    default_params={"c": _LANGERMANN_C, "A": _LANGERMANN_A, "freq": PI, "decay": 1.0 / PI},
    shifted_params=("c", "freq", "decay"),
    minimizers=((2.79340221, 1.5972325),),
    min_value=-4.155809291847786,
    note="VLSE definition; VLSE states no minimum. Ours: a 2001x2001 grid on [0,10]^2, then "
    "Nelder-Mead in float64. The well centres A are not shifted (the rotation moves them).",
  ),
  "levy": FunctionSpec(
    name="levy",
    fn=levy,
    bounds=_box(-10.0, 10.0),
    default_params={"freq": PI, "mid_amp": 10.0, "last_freq": 2 * PI},
    shifted_params=("freq", "mid_amp", "last_freq"),
    minimizers=((1.0, 1.0),),
    min_value=0.0,
    note="VLSE",
  ),
  "matyas": FunctionSpec(
    name="matyas",
    fn=matyas,
    bounds=_box(-10.0, 10.0),
    default_params={"quad": 0.26, "cross": 0.48},
    shifted_params=("quad", "cross"),
    minimizers=((0.0, 0.0),),
    min_value=0.0,
    note="VLSE",
  ),
  "michalewicz": FunctionSpec(
    name="michalewicz",
    fn=michalewicz,
    bounds=_box(0.0, PI),
    default_params={"m": 10.0, "freq": 1.0 / PI},
    shifted_params=("m", "freq"),
    minimizers=((2.20290552, 1.57079633),),
    min_value=-1.8013034100985532,
    note="VLSE gives -1.8013 at (2.20, 1.57); digits refined with Nelder-Mead in float64.",
  ),
  "rastrigin": FunctionSpec(
    name="rastrigin",
    fn=rastrigin,
    bounds=_box(-5.12, 5.12),
    default_params={"A": 10.0, "freq": 2 * PI},
    shifted_params=("A", "freq"),
    minimizers=((0.0, 0.0),),
    min_value=0.0,
    note="VLSE",
  ),
  "sincos": FunctionSpec(
    name="sincos",
    fn=sincos,
    bounds=_box(-PI, PI),
    default_params={"amp": 1.0, "freq1": 1.0, "freq2": 1.0},
    shifted_params=("amp", "freq1", "freq2"),
    minimizers=((-PI / 2, 0.0), (PI / 2, PI), (PI / 2, -PI)),
    min_value=-1.0,
    note="Not in VLSE and not defined by the paper: our definition, see `sincos`.",
  ),
  "styblinski_tang": FunctionSpec(
    name="styblinski_tang",
    fn=styblinski_tang,
    bounds=_box(-5.0, 5.0),
    default_params={"quartic": 1.0, "quad": 16.0, "linear": 5.0},
    shifted_params=("quartic", "quad"),
    minimizers=((-2.903534, -2.903534),),
    min_value=-78.33233140754284,
    note="VLSE (with its factor 1/2, not divided by d). VLSE quotes -39.16599 d; the exact value "
    "per coordinate is -39.16617 (Nelder-Mead in float64), so -78.33233 in 2-D. The linear "
    "term is not shifted (it is not a non-linear term).",
  ),
}

FUNCTION_NAMES: tuple[str, ...] = tuple(FUNCTIONS)

# Spellings used in the paper's tables, mapped to registry keys.
_ALIASES = {"sin_cos": "sincos", "drop_wave": "dropwave", "styblinskitang": "styblinski_tang"}


def get_spec(name: str) -> FunctionSpec:
  """The `FunctionSpec` for `name` (case-insensitive; "Sin-Cos", "Styblinski-Tang" accepted).

  Raises:
    ValueError: unknown name; the message lists the valid names.
  """
  key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
  key = _ALIASES.get(key, key)
  if key not in FUNCTIONS:
    raise ValueError(f"Unknown 2-D test function {name!r}; valid names: {', '.join(FUNCTION_NAMES)}.")
  return FUNCTIONS[key]


# --------------------------------------------------------------------------------------------------
# The source -> target shift
# --------------------------------------------------------------------------------------------------

# Our choice (the paper gives no magnitudes): at shift_scale = 1, each shifted coefficient is
# multiplied by exp(u) with |u| ~ Uniform[0.10, 0.25] and a random sign (a factor in
# [0.78, 0.90] or [1.11, 1.28]), and the input plane is rotated by |angle| ~ Uniform[15, 30] degrees
# with a random sign.  The lower bounds keep every shift clearly visible; shift_scale multiplies u
# and the angle, so shift_scale = 0 is the identity and factors stay positive at any scale.
LOG_FACTOR_RANGE: tuple[float, float] = (0.10, 0.25)
ANGLE_RANGE_DEG: tuple[float, float] = (15.0, 30.0)


def _to_jsonable(v: Any) -> Any:
  """A parameter value (float or nested tuple/array) as plain floats and lists."""
  if isinstance(v, (tuple, list, np.ndarray)):
    return [_to_jsonable(e) for e in v]
  return float(v)


def _to_param(v: Any) -> ParamValue:
  """A JSON value (float or nested list) back to an immutable parameter value."""
  if isinstance(v, (list, tuple, np.ndarray)):
    return tuple(_to_param(e) for e in v)
  return float(v)


@dataclasses.dataclass(frozen=True)
class Shift:
  """A target task: the source function with perturbed coefficients and a rotated input plane.

  The target is   f_target(x) = f(centre + R(-angle) (x - centre); params),
  with R(t) the counter-clockwise rotation by t radians and `centre` the centre of the box.  So
  the target landscape is the (re-parameterised) source landscape turned counter-clockwise by
  `angle` about the centre: a feature at p appears at centre + R(angle) (p - centre).  Inputs are
  still drawn from the same box; near its corners the target therefore shows the function just
  outside the source box (all nine functions are defined on the whole plane).
  """

  name: str  # registry key of the function
  angle: float  # rotation in radians, counter-clockwise
  params: Mapping[str, ParamValue]  # the target's full coefficient set
  seed: int | None = None  # the seed that drew it (None if built by hand)
  shift_scale: float | None = None  # the scale it was drawn at (None if built by hand)

  def evaluate(self, x: Array) -> Array:
    """The noiseless target function at x [..., 2] -> [...]."""
    return evaluate(self.name, x, shift=self)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable record (plain floats, lists, str, int, None)."""
    return {
      "name": self.name,
      "seed": None if self.seed is None else int(self.seed),
      "shift_scale": None if self.shift_scale is None else float(self.shift_scale),
      "angle": float(self.angle),
      "angle_deg": math.degrees(float(self.angle)),
      "params": {k: _to_jsonable(v) for k, v in self.params.items()},
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Shift:
    """Inverse of `to_dict` (ignores the derived "angle_deg")."""
    return cls(
      name=get_spec(d["name"]).name,
      angle=float(d["angle"]),
      params={k: _to_param(v) for k, v in d["params"].items()},
      seed=d.get("seed"),
      shift_scale=d.get("shift_scale"),
    )


def _rng_for(name: str, seed: int) -> np.random.Generator:
  """A generator that depends on (function, seed): the same seed gives unrelated shifts for
  different functions.  crc32 is used because Python's str hash is salted per process."""
  return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def make_shift(name: str, seed: int, shift_scale: float = 1.0) -> Shift:
  """Draw the target task of function `name`, deterministically from `seed`.

  Every coefficient in `FunctionSpec.shifted_params` is multiplied by exp(shift_scale * u) (vector
  coefficients, Langermann's c, element-wise), and the input is rotated about the centre of the
  box by shift_scale * angle; |u| and |angle| are uniform on `LOG_FACTOR_RANGE` and
  `ANGLE_RANGE_DEG` with random signs (our choice: the paper says which kind of change, not how
  large).  Coefficients outside `shifted_params` (e.g. Langermann's well centres A, the linear
  term of Styblinski-Tang) keep their source values.

  Args:
    name: a registry name (see `FUNCTION_NAMES`).
    seed: integer seed; the draw is a pure function of (name, seed, shift_scale).
    shift_scale: multiplies the log-factors and the angle; 0 gives the source function.

  Returns:
    A `Shift`; record it with `shift.to_dict()`.
  """
  spec = get_spec(name)
  if not (shift_scale >= 0.0 and math.isfinite(shift_scale)):
    raise ValueError(f"shift_scale={shift_scale!r} must be a finite number >= 0.")
  rng = _rng_for(spec.name, seed)

  def signed(lo: float, hi: float, size: tuple[int, ...] = ()) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=size) * rng.uniform(lo, hi, size=size)

  # Draw order is fixed (angle first, then the shifted coefficients in registry order), so a
  # given (name, seed, shift_scale) always yields the same shift.
  angle = float(shift_scale * math.radians(float(signed(*ANGLE_RANGE_DEG))))
  params: dict[str, ParamValue] = dict(spec.default_params)
  for key in spec.shifted_params:
    base = np.asarray(spec.default_params[key], dtype=np.float64)
    factor = np.exp(shift_scale * signed(*LOG_FACTOR_RANGE, size=base.shape))
    params[key] = _to_param(base * factor) if base.ndim else float(base * factor)
  return Shift(name=spec.name, angle=angle, params=params, seed=int(seed), shift_scale=float(shift_scale))


# --------------------------------------------------------------------------------------------------
# Evaluation and sampling
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> Callable[..., Array]:
  """One jitted evaluator per function: (x, params, angle) -> f(centre + R(-angle)(x - centre))."""
  spec = FUNCTIONS[name]

  def run(x: Array, params: Mapping[str, Any], angle: Array) -> Array:
    centre = jnp.asarray(spec.centre, dtype=x.dtype)  # [2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # Row-vector form of R(-angle)(x - c): (x - c) @ R(-angle)^T = (x - c) @ R(angle).
    rot = jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])])  # [2, 2]
    return spec.fn(centre + (x - centre) @ rot, **params)

  return jax.jit(run)


def evaluate(
  name: str,
  x: Array,
  params: Mapping[str, ParamValue] | None = None,
  *,
  shift: Shift | None = None,
) -> Array:
  """Noiseless function value, x [..., 2] -> [...] (a jax array).

  Args:
    name: a registry name.
    x: inputs, last axis of size 2.
    params: coefficients overriding the source ones (a partial dict is fine); None -> source.
    shift: evaluate the target task instead (its rotation and params); excludes `params`.
  """
  spec = get_spec(name)
  x = _as_float(x)
  if x.ndim < 1 or x.shape[-1] != 2:
    raise ValueError(f"x must have shape [..., 2]; got {tuple(x.shape)}.")
  angle = 0.0
  if shift is not None:
    if params is not None:
      raise ValueError("Pass either params or shift, not both (a shift carries its own params).")
    if get_spec(shift.name).name != spec.name:
      raise ValueError(f"shift is for {shift.name!r}, not {spec.name!r}.")
    params, angle = shift.params, float(shift.angle)
  merged = dict(spec.default_params)
  if params is not None:
    unknown = sorted(set(params) - set(merged))
    if unknown:
      raise ValueError(f"Unknown params {unknown} for {spec.name!r}; valid: {sorted(merged)}.")
    merged.update({k: _to_param(v) for k, v in params.items()})
  # Coefficients and angle are traced arguments, so every shift of a function (and the source,
  # angle 0) shares one compilation per input shape.
  return _compiled(spec.name)(x, merged, jnp.asarray(angle, dtype=x.dtype))


def sample_task(
  name: str,
  n: int,
  seed: int,
  shift: Shift | None = None,
  noise_sd: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
  """Noisy regression samples: x ~ Uniform(box) and y = f(x) + noise_sd * N(0, 1).

  Args:
    name: a registry name.
    n: number of samples.
    seed: seed of the inputs and the noise.  Use different seeds for the source and the target
      draws, otherwise both share the same x.
    shift: None for the source task; a `Shift` (from `make_shift`) for the target task.  Target
      inputs come from the same box as the source, as in the paper.
    noise_sd: label-noise standard deviation (the paper's 0.05).

  Returns:
    (x float32 [n, 2], y float32 [n]), as numpy arrays.
  """
  spec = get_spec(name)
  if n < 0:
    raise ValueError(f"n={n} must be >= 0.")
  if noise_sd < 0:
    raise ValueError(f"noise_sd={noise_sd} must be >= 0.")
  rng = np.random.default_rng(int(seed))
  x = rng.uniform(spec.lower, spec.upper, size=(n, 2)).astype(np.float32)  # [n, 2]
  noise = rng.standard_normal(n)  # [n]
  y = np.asarray(evaluate(spec.name, x, shift=shift), dtype=np.float64) + noise_sd * noise
  return x, y.astype(np.float32)


def standardize_inputs(x: Array, name: str) -> Array:
  """Map the function's box affinely onto [-1, 1]^2 (per coordinate).  Works on numpy or jax."""
  spec = get_spec(name)
  return 2.0 * (x - spec.lower.astype(np.float32)) / (spec.upper - spec.lower).astype(np.float32) - 1.0


def unstandardize_inputs(z: Array, name: str) -> Array:
  """Inverse of `standardize_inputs`: [-1, 1]^2 back to the function's box."""
  spec = get_spec(name)
  return spec.lower.astype(np.float32) + 0.5 * (z + 1.0) * (spec.upper - spec.lower).astype(np.float32)


def target_stats(name: str, shift: Shift | None = None, n: int = 65_536, seed: int = 0) -> tuple[float, float]:
  """Mean and standard deviation of the noiseless function over its box (Monte Carlo, n points).

  Label scales differ by orders of magnitude across the nine functions (Drop-Wave lies in
  [-1, 0], Styblinski-Tang reaches ~250), so a caller that wants comparable losses can
  standardise labels as (y - mean) / std.  The paper does not say whether it did.  This module
  returns raw labels and leaves the choice to the caller; if labels are standardised, use the
  SOURCE statistics for both source and target (shift=None), so the target shift stays visible
  in the same units and target MSEs are comparable to the source's.

  Returns:
    (mean, std) as Python floats; deterministic in (name, shift, n, seed).
  """
  spec = get_spec(name)
  rng = np.random.default_rng(int(seed))
  x = rng.uniform(spec.lower, spec.upper, size=(n, 2)).astype(np.float32)
  y = np.asarray(evaluate(spec.name, x, shift=shift), dtype=np.float64)
  return float(y.mean()), float(y.std())


__all__ = [
  "FUNCTIONS",
  "FUNCTION_NAMES",
  "FunctionSpec",
  "Shift",
  "evaluate",
  "get_spec",
  "make_shift",
  "sample_task",
  "standardize_inputs",
  "target_stats",
  "unstandardize_inputs",
]
