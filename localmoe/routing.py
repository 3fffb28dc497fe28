"""Routers of Localized LoRA-MoE (paper Eq. 5 and 7) and their diagnostics.

A router maps a router input u to gates over E experts:

  g = Softmax(W_g u / T)                       soft routing, Eq. 5 / Eq. 7 (default)
  g = Softmax over the top-k logits, else 0    top-k routing (exactly k nonzero gates, renormalised)

The router input is either an external context vector (one-hot or an embedding, which is what the paper's
experiments use: W_g is E x D, no bias) or the activations themselves (the whole x for block-wise routing,
Eq. 5, the local field x_j for cell-wise routing, Eq. 7).

A `Router` owns a grid of independent routers: `grid=()` is one global router (block-wise, Eq. 5);
`grid=(K_y, K_x)` is one router per cell (cell-wise, Eq. 7). Its kernel has shape [*grid, F, E].

Every call sows, into the `intermediates` collection, the router logits and gates flattened to
[tokens, routers, E], so that auxiliary losses and diagnostics below can be computed by the trainer
(`module.apply(..., mutable=["intermediates"])`, then `collect_router_outputs`); an adapted model's
losses are `router_traces.router_losses` (one API for both hosts). The paper lists the lack
of load balancing and routing diagnostics as a limitation; these fill that gap.

Router controls (all off by default, so Eq. 5 / Eq. 7 hold unchanged):

  kernel init    `router_initializer`: "normal" N(0, 1/F) (the default; or N(0, std^2)), "uniform"
                 U(-s, s) (Poly/MHR: s = 1e-3), "zeros" (uniform gates), "task_aligned" (context routers:
                 row t of W_g holds `margin` at column t mod E, so one-hot context t starts on expert t mod E).
  hard routing   `hard="straight_through"`: the forward pass uses the top-1 one-hot of g, the backward pass
                 the gradient of the soft g (hard + g - stop_gradient(g)), so W_g still trains.
                 `hard="gumbel"`: the same on a Gumbel-perturbed sample, g = Softmax((W_g u + G) / T) with
                 G ~ Gumbel(0, 1) (straight-through Gumbel-softmax, SMEAR's setting); `hard="gumbel_soft"`
                 keeps the relaxed sample g itself. The noise needs the flax rng collection "gumbel"; without
                 it (evaluation) "gumbel" is the deterministic argmax one-hot and "gumbel_soft" the softmax.
                 The trainer draws "gumbel" and "dropout" per step for a task that declares them
                 (`train.Task.rngs`; `single_layer.layer_task` does for an adapter's `rng_streams`).
  temperature    T divides the logits (with Gumbel noise: the Gumbel-softmax temperature); a real number > 0
                 and finite (`check_temperature`). A schedule over training steps is `temperature_at(step,
                 ...)`, passed at call time (`temperature=`, which overrides the field), or set on a routed
                 adapter as `temperature_schedule=(start, end, steps[, kind])` (a config's adapter spec), which
                 the adapter evaluates at the `step=` the trainer passes (`train.Task.takes_step`).
  expert dropout `dropout=p`: with the rng collection "dropout", every expert of every gate vector is dropped
                 with probability p and the gates renormalise over the kept experts (SMEAR: p = 0.1); without
                 that rng (evaluation) nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jnp.ndarray]

ROUTER_INPUTS = ("context", "activation")


def router_kernel_init(key, shape, dtype=jnp.float32):
  """N(0, 1/F) on a kernel [*grid, F, E]: unit-scale logits for unit-scale router inputs."""
  fan_in = shape[-2]
  return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)


ROUTER_INITS = ("normal", "uniform", "zeros", "task_aligned")
ROUTER_HARD = ("straight_through", "gumbel", "gumbel_soft")
UNIFORM_ROUTER_SCALE = 1e-3  # Poly/MHR's U(-1e-3, 1e-3)


def _positive_float(value, field: str, fix: str) -> float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
    raise ValueError(f"{field}={value!r} must be a finite number > 0: {fix}.")
  return number


def check_temperature(value, field: str = "temperature"):
  """A router temperature: a real number > 0 and finite, or a traced scalar (e.g. `temperature_at`).

  Returns it unchanged (a Python float for a concrete number). A concrete value that is 0, negative or
  non-finite is a ValueError (T = 0 gives NaN gates, T < 0 inverts the routing, T = inf makes every gate
  uniform); a string, a bool or an array with more than one element is a TypeError (an array would
  broadcast over the experts). A traced value cannot be checked for its sign: only its shape () and real
  dtype are.
  """
  fix = "pass a real number > 0 such as 1.0, or an annealed routing.temperature_at(step, ...)"
  if isinstance(value, jax.core.Tracer):
    if (
      value.shape != ()
      or not jnp.issubdtype(value.dtype, jnp.number)
      or jnp.issubdtype(value.dtype, jnp.complexfloating)
    ):
      raise TypeError(
        f"{field} is a traced {value.dtype} array of shape {value.shape}: {fix} (one scalar for every expert)."
      )
    return value
  if isinstance(value, (bool, np.bool_, str, bytes)) or not isinstance(
    value, (int, float, np.integer, np.floating, np.ndarray, jax.Array)
  ):
    raise TypeError(f"{field}={value!r} is not a number: {fix}.")
  if isinstance(value, (np.ndarray, jax.Array)):
    if (
      np.shape(value) != ()
      or not np.issubdtype(np.asarray(value).dtype, np.number)
      or np.issubdtype(np.asarray(value).dtype, np.complexfloating)
      or np.asarray(value).dtype == bool
    ):
      raise TypeError(
        f"{field} is an array of shape {np.shape(value)} and dtype {np.asarray(value).dtype}: {fix} "
        "(one scalar for every expert)."
      )
  number = float(value)
  if not (math.isfinite(number) and number > 0):
    raise ValueError(f"{field}={number!r} must be finite and > 0: {fix}.")
  return value if isinstance(value, (np.ndarray, jax.Array)) else number


def router_initializer(kind: str | Initializer, scale: float | None = None, margin: float = 4.0) -> Initializer:
  """The router kernel initialiser [*grid, F, E] named by `kind` (a callable is returned unchanged).

    "normal"        N(0, 1/F) when scale is None (`router_kernel_init`, the default), else N(0, scale^2)
                    (MixLoRA / MoLoRA: scale = 0.02)
    "uniform"       U(-s, s), s = scale or 1e-3 (Poly / MHR)
    "zeros"         W_g = 0: every gate starts at 1/E
    "task_aligned"  row t of every router's W_g is `margin` at column t mod E and 0 elsewhere, so a one-hot
                    context t gets logit m = margin on expert t mod E, gate e^m / (e^m + E - 1) (the oracle start)

  Errors name the adapter fields `router_init`, `router_init_scale` and `router_init_margin`. A field that
  `kind` does not read is refused rather than ignored: `scale` with "zeros", "task_aligned" or a callable,
  and a `margin` other than the default 4.0 with anything but "task_aligned".
  """
  if not callable(kind) and kind not in ROUTER_INITS:
    raise ValueError(
      f"router_init={kind!r} is not a known router initialiser; use one of {ROUTER_INITS} "
      "or pass a callable (key, shape, dtype) -> array."
    )
  name = "a callable" if callable(kind) else repr(kind)
  if scale is not None and (callable(kind) or kind not in ("normal", "uniform")):
    raise ValueError(
      f"router_init_scale={scale!r} has no effect with router_init={name}: it sets the std of "
      "'normal' or the bound of 'uniform'; remove it (None) or use one of those."
    )
  if margin != 4.0 and kind != "task_aligned":
    raise ValueError(
      f"router_init_margin={margin!r} has no effect with router_init={name}: it sets the lead of "
      "'task_aligned'; remove it (4.0, the default) or use router_init='task_aligned'."
    )
  if callable(kind):
    return kind
  if scale is not None:
    scale = _positive_float(
      scale,
      "router_init_scale",
      "the std of 'normal' or the bound s of 'uniform', or None for the default (1/sqrt(F), resp. 1e-3)",
    )
  margin = _positive_float(
    margin,
    "router_init_margin",
    "the logit lead of expert t mod E for context t (e.g. 4.0); use router_init='zeros' for no lead",
  )
  if kind == "normal":
    if scale is None:
      return router_kernel_init
    return lambda key, shape, dtype=jnp.float32: scale * jax.random.normal(key, shape, dtype)
  if kind == "uniform":
    bound = UNIFORM_ROUTER_SCALE if scale is None else scale
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  if kind == "zeros":
    return lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)

  def task_aligned(key, shape, dtype=jnp.float32):
    del key
    features, experts = shape[-2:]
    rows = margin * jax.nn.one_hot(jnp.arange(features) % experts, experts, dtype=dtype)  # [F, E]
    return jnp.broadcast_to(rows, shape).astype(dtype)  # [*grid, F, E]

  return task_aligned


def temperature_at(step, start: float, end: float, steps: int, kind: str = "exponential") -> jnp.ndarray:
  """Annealed router temperature at training `step` (traceable; constant `end` after `steps`).

    exponential  T = start * (end / start) ** (step / steps)        (SMEAR: 10 -> 0.5)
    linear       T = start + (end - start) * step / steps

  Pass the result at call time, `adapter.apply(params, x, context, temperature=T)`; step may be a traced
  integer (the trainer's step counter).
  """
  if kind not in ("exponential", "linear"):
    raise ValueError(f"kind={kind!r} is not a temperature schedule; use 'exponential' or 'linear'.")
  start = _positive_float(start, "start", "the temperature at step 0")
  end = _positive_float(end, "end", "the temperature after `steps` steps")
  if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps={steps!r} must be a positive integer (the length of the anneal).")
  steps = int(steps)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)  # []
  if kind == "exponential":
    return start * (end / start) ** frac
  return start + (end - start) * frac


def straight_through(soft: jnp.ndarray) -> jnp.ndarray:
  """Top-1 one-hot of `soft` [..., E] in the forward pass, the gradient of `soft` in the backward pass.

  hard + (soft - stop_gradient(soft)): the bracket is exactly 0, so the forward value is exactly one-hot.
  """
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  return hard + (soft - jax.lax.stop_gradient(soft))


def drop_experts(key: jax.Array, logits: jnp.ndarray, rate: float) -> jnp.ndarray:
  """Expert dropout on logits [..., E]: each expert of each gate vector is dropped with probability `rate`
  (its logit set to -inf, so the softmax renormalises over the kept experts). A gate vector that would lose
  every expert keeps them all."""
  keep = jax.random.bernoulli(key, 1.0 - rate, logits.shape)  # [..., E]
  keep = jnp.where(keep.any(axis=-1, keepdims=True), keep, True)
  return jnp.where(keep, logits, -jnp.inf)


def gates_from_logits(logits: jnp.ndarray, top_k: int | None) -> jnp.ndarray:
  """Softmax gates, or exactly `top_k` nonzero gates renormalised over the top-k logits.

  logits: [..., E] -> gates [..., E]. Ties are broken by expert index (lax.top_k), so the number of
  nonzero gates is always exactly k. With k = E this equals the soft softmax.
  """
  num_experts = logits.shape[-1]
  if top_k is None or top_k == num_experts:
    return jax.nn.softmax(logits, axis=-1)
  _, index = jax.lax.top_k(logits, top_k)  # [..., k]
  keep = jax.nn.one_hot(index, num_experts, dtype=bool).any(axis=-2)  # [..., E]
  masked = jnp.where(keep, logits, -jnp.inf)
  return jax.nn.softmax(masked, axis=-1)


def one_hot_labels(labels: jnp.ndarray, num: int, field: str, num_field: str, fix: str) -> jnp.ndarray:
  """Integer labels [...] -> one-hot float32 [..., num], refusing labels outside 0..num-1.

  `jax.nn.one_hot` maps such a label to a zero row, which a bias-free router (the paper's W_g u) turns into
  exactly uniform gates: a silent wrong routing. Concrete labels (eager calls, and constants closed over by
  a jitted function) are checked here: a ValueError names `field`, the bad labels, `num_field` (the field
  that sets `num`) and `fix`. Traced labels (arguments of a jitted function) cannot raise on their values,
  so there the row of an out-of-range label is NaN: the outputs that depend on it are NaN, which a training
  loop's divergence guard flags, instead of a plausible uniform routing. In-range labels give the same
  one-hot rows either way.
  """
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    bad = values[(values < 0) | (values >= num)]
    if bad.size:
      shown = ", ".join(str(v) for v in np.unique(bad)[:5])
      raise ValueError(f"{field} holds ids [{shown}] outside 0..{num - 1} ({num_field}={num}): {fix}.")
    return jax.nn.one_hot(labels, num)
  onehot = jax.nn.one_hot(labels, num)  # [..., num]
  valid = (labels >= 0) & (labels < num)
  return jnp.where(valid[..., None], onehot, jnp.nan)


class Router(nn.Module):
  """A grid of independent linear softmax routers (Eq. 5 with `grid=()`, Eq. 7 with `grid=(K_y, K_x)`).

  Input u:
    per_field=False: [..., F], shared by every router in the grid (a context vector, or the whole x).
    per_field=True:  [..., K_x, F], router (i, j) reads field j only (cell-wise activation routing, Eq. 7).
  Output: gates [..., *grid, E] in the compute dtype.

  Dtypes: the logit matmul takes its operands in the compute dtype (`dtype`, else u's dtype) and
  accumulates and returns float32 logits (`preferred_element_type`); bias, temperature, softmax / top-k
  and the sown logits and gates stay float32, for a stable softmax and stable auxiliary losses under
  bfloat16. Only the returned gates are cast to the compute dtype.

  `logits` and `gates` are the two halves of `__call__`, for adapters that compute the logit matmul
  themselves (fused with their own first GEMM): `gates(u @ kernel)` equals `__call__(u)`.

  Hard routing (`hard`), Gumbel noise (rng "gumbel") and expert dropout (`dropout`, rng "dropout") act on
  the logits after bias and temperature, as described in the module docstring.
  """

  num_experts: int  # E
  features: int  # F, width of the router input u (D, d_in or d_in/K_x)
  grid: tuple[int, ...] = ()  # () global router; (K_y, K_x) one router per cell
  per_field: bool = False  # router (i, j) reads u[..., j, :] (needs grid=(K_y, K_x))
  use_bias: bool = False  # the paper's routers have no bias
  temperature: float = 1.0  # logits are divided by this before the softmax
  top_k: int | None = None  # None: soft routing; k: exactly k nonzero gates
  kernel_init: Initializer = router_kernel_init
  hard: str | None = None  # None, or one of ROUTER_HARD (module docstring); needs top_k=None
  dropout: float = 0.0  # expert dropout probability (rng "dropout"); 0: off
  param_dtype: Any = jnp.float32  # storage dtype of the kernel and bias
  dtype: Any = None  # compute dtype of the logit matmul; None -> u's dtype

  def __post_init__(self):
    check_temperature(self.temperature)
    super().__post_init__()

  def setup(self):
    pd = jnp.dtype(self.param_dtype)
    self.kernel = self.param("kernel", self.kernel_init, (*self.grid, self.features, self.num_experts), pd)
    if self.use_bias:
      self.bias = self.param("bias", nn.initializers.zeros, (*self.grid, self.num_experts), pd)

  def __call__(self, u: jnp.ndarray, temperature=None) -> jnp.ndarray:
    """u [..., F] (or [..., K_x, F] per field) -> gates [..., *grid, E]; `temperature` overrides the field."""
    return self.gates(self.logits(u), u.dtype if self.dtype is None else self.dtype, temperature)

  def logits(self, u: jnp.ndarray) -> jnp.ndarray:
    """The raw logits u W_g (before bias and temperature), float32: [..., *grid, E]."""
    if u.shape[-1] != self.features:
      raise ValueError(
        f"the router input has {u.shape[-1]} features but the router was built with features={self.features}."
      )
    cd = jnp.dtype(u.dtype if self.dtype is None else self.dtype)
    u, kernel, acc = u.astype(cd), self.kernel.astype(cd), logit_dtype(cd)
    if not self.grid:
      return jnp.einsum("...c,ce->...e", u, kernel, preferred_element_type=acc)  # [..., E]
    if self.per_field:
      return jnp.einsum("...jd,ijde->...ije", u, kernel, preferred_element_type=acc)  # [..., K_y, K_x, E]
    return jnp.einsum("...c,ijce->...ije", u, kernel, preferred_element_type=acc)  # [..., K_y, K_x, E]

  def gates(self, logits: jnp.ndarray, dtype: Any, temperature=None) -> jnp.ndarray:
    """Raw logits [..., *grid, E] -> gates [..., *grid, E] in `dtype`; sows logits and gates (float32).

    temperature: overrides the field for this call (a float or a traced scalar, e.g. `temperature_at`),
    checked by `check_temperature`. The sown logits are the clean W_g u / T (before expert dropout and
    Gumbel noise); the sown gates are the ones used.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if self.use_bias:
      logits = logits + self.bias.astype(logits.dtype)
    temperature = self.temperature if temperature is None else check_temperature(temperature)
    logits = logits / temperature
    mixed = logits
    if self.dropout > 0 and self.has_rng("dropout"):
      mixed = drop_experts(self.make_rng("dropout"), mixed, self.dropout)
    if self.hard in ("gumbel", "gumbel_soft") and self.has_rng("gumbel"):
      noise = jax.random.gumbel(self.make_rng("gumbel"), mixed.shape, mixed.dtype)  # [..., *grid, E]
      mixed = mixed + noise / jnp.asarray(temperature, mixed.dtype)  # (W_g u + G) / T
    gates = gates_from_logits(mixed, self.top_k)
    if self.hard in ("straight_through", "gumbel"):
      gates = straight_through(gates)
    routers = math.prod(self.grid)
    self.sow("intermediates", "router_logits", logits.reshape(-1, routers, self.num_experts))
    self.sow("intermediates", "router_gates", gates.reshape(-1, routers, self.num_experts))
    return gates.astype(dtype)


RNG_STREAMS = ("gumbel", "dropout")  # the flax rng streams routers draw from in training


def rng_streams(modules) -> tuple[str, ...]:
  """The rng streams (of RNG_STREAMS, in that order) that any of `modules` (adapters, or one adapter) uses in
  training (their `rng_streams`): what a `train.Task` over them declares as `rngs`; () when every routing is
  deterministic. For adapters injected into a model, pass the per-layer modules."""
  modules = [modules] if isinstance(modules, nn.Module) else list(modules)
  used = {name for module in modules for name in getattr(module, "rng_streams", ())}
  return tuple(name for name in RNG_STREAMS if name in used)


def logit_dtype(compute_dtype: Any) -> jnp.dtype:
  """Router logits are float32, or wider when the computation is (float64)."""
  return jnp.promote_types(compute_dtype, jnp.float32)


def num_router_params(num_experts: int, grid: Sequence[int], features: int, use_bias: bool) -> int:
  """Parameters of a router grid: prod(grid) * (F * E [+ E])."""
  return math.prod(grid) * num_experts * (features + int(use_bias))


# ---------------------------------------------------------------------------------------------------------
# Auxiliary losses and diagnostics. All take router outputs flattened to [tokens, routers, E].
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RouterOutputs:
  """Logits and gates of one router grid, each [tokens, routers, E]."""

  logits: jnp.ndarray
  gates: jnp.ndarray


def collect_router_outputs(intermediates: Any) -> list[RouterOutputs]:
  """Finds every router's sown logits/gates in an `intermediates` collection (any nesting)."""
  found: list[RouterOutputs] = []

  def visit(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      if "router_logits" in tree and "router_gates" in tree:
        for logits, gates in zip(tree["router_logits"], tree["router_gates"]):
          found.append(RouterOutputs(logits, gates))
      for key, value in tree.items():
        if key not in ("router_logits", "router_gates"):
          visit(value)

  visit(intermediates)
  return found


def _dispatch_fraction(gates: jnp.ndarray, top_k: int) -> jnp.ndarray:
  """Indicator of the top-k experts per token/router, divided by k: [N, R, E], sums to 1 over E."""
  _, index = jax.lax.top_k(gates, top_k)
  return jax.nn.one_hot(index, gates.shape[-1]).sum(axis=-2) / top_k


def load_balancing_loss(
  gates: jnp.ndarray, top_k: int = 1, per_router: bool = True, weights: jnp.ndarray | None = None
) -> jnp.ndarray:
  """Switch-Transformer load-balancing loss, E * sum_e f_e * P_e (minimum 1 at uniform use).

  gates: [N, R, E]. f_e is the fraction of tokens dispatched to expert e (top-k indicator / k), P_e the
  mean gate probability. per_router=True computes the loss for every router (cell) over its tokens and
  averages over routers; per_router=False pools all tokens of all routers into one global balance.
  weights: optional [N] token weights (e.g. an attention mask: padding rows weigh 0); f_e and P_e become
  weighted means. All-zero weights count no token and give a loss of 0 (not 0 / 0).
  """
  num_experts = gates.shape[-1]
  if weights is not None:
    if not per_router:  # one router over all (token, router) rows
      weights = jnp.repeat(weights, gates.shape[1])
      gates = gates.reshape(-1, 1, num_experts)
    return _weighted_balance(gates, top_k, weights)
  dispatch = _dispatch_fraction(gates, top_k)
  if per_router:
    f = dispatch.mean(axis=0)  # [R, E]
    p = gates.mean(axis=0)  # [R, E]
    return (num_experts * (f * p).sum(-1)).mean()
  f = dispatch.reshape(-1, num_experts).mean(axis=0)  # [E]
  p = gates.reshape(-1, num_experts).mean(axis=0)  # [E]
  return num_experts * (f * p).sum()


def _weight_total(weights: jnp.ndarray) -> jnp.ndarray:
  """sum(weights), or 1 where it is 0 (every weighted numerator is then 0, so the mean is 0, not NaN)."""
  total = jnp.sum(weights)
  return jnp.where(total > 0, total, jnp.ones_like(total))


def _weighted_balance(gates: jnp.ndarray, top_k: int, weights: jnp.ndarray) -> jnp.ndarray:
  """E * sum_e f_e P_e per router, averaged over routers, rows of gates [N, R, E] weighted by weights [N]."""
  num_experts = gates.shape[-1]
  dispatch = _dispatch_fraction(gates, top_k)  # [N, R, E]
  total = _weight_total(weights)
  f = jnp.einsum("n,nre->re", weights, dispatch) / total
  p = jnp.einsum("n,nre->re", weights, gates) / total
  return (num_experts * (f * p).sum(-1)).mean()


def router_z_loss(logits: jnp.ndarray, weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """ST-MoE router z-loss: mean over tokens and routers of logsumexp(logits)^2.

  logits: [N, R, E]; weights: optional [N] token weights (a weighted mean over tokens; all-zero weights
  give 0).
  """
  if weights is None:
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  z = jax.nn.logsumexp(logits, -1) ** 2  # [N, R]
  return jnp.sum(weights[:, None] * z) / (_weight_total(weights) * logits.shape[1])


def expert_usage(gates: jnp.ndarray) -> jnp.ndarray:
  """Mean gate per router and expert over tokens: [N, R, E] -> [R, E] (rows sum to 1)."""
  return gates.mean(axis=0)


def token_entropy(gates: jnp.ndarray) -> jnp.ndarray:
  """Gate entropy (nats) of every token and router: [N, R, E] -> [N, R] (0 log 0 = 0)."""
  safe = jnp.where(gates > 0, gates, 1.0)
  return -(gates * jnp.log(safe)).sum(-1)


def routing_entropy(gates: jnp.ndarray) -> jnp.ndarray:
  """Mean per-token gate entropy (nats) per router: [N, R, E] -> [R]. 0 = hard routing, log E = uniform."""
  return token_entropy(gates).mean(0)


def group_usage(gates: jnp.ndarray, group_weights: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Expert usage and routing entropy per group: gates [N, R, E], group_weights [N, G] (a token's weight in
  each group, e.g. one-hot task ids times a mask) -> (usage [G, R, E], entropy [G, R]), weighted means over
  each group's tokens; a group without tokens gets 0."""
  count = jnp.maximum(group_weights.sum(0), 1e-9)  # [G]
  usage = jnp.einsum("ng,nre->gre", group_weights, gates) / count[:, None, None]
  entropy = jnp.einsum("ng,nr->gr", group_weights, token_entropy(gates)) / count[:, None]
  return usage, entropy


def usage_entropy(gates: jnp.ndarray) -> jnp.ndarray:
  """Entropy of each router's mean expert usage: [N, R, E] -> [R]. Low values flag expert collapse."""
  usage = expert_usage(gates)
  safe = jnp.where(usage > 0, usage, 1.0)
  return -(usage * jnp.log(safe)).sum(-1)


def gate_entropy(gates: jnp.ndarray) -> jnp.ndarray:
  """Mean gate entropy in nats over every gate vector: [..., E] -> []. 0 = hard routing, log E = uniform."""
  safe = jnp.where(gates > 0, gates, 1.0)
  return -(gates * jnp.log(safe)).sum(-1).mean()


def task_separation(usage: jnp.ndarray) -> jnp.ndarray:
  """How differently tasks use the experts: the total variation 0.5 sum_e |u_a,e - u_b,e| between two tasks'
  mean gates, averaged over task pairs a < b and routers; 0 = every task routed alike, 1 = disjoint experts.

  usage: [..., tasks, routers, E] -> [...]. On the multi-task experiment's usage [entries, layers, tasks,
  routers, E], `task_separation(usage).mean(-1)` is the per-entry separation (averaged over layers too).
  """
  tasks = usage.shape[-3]
  if tasks < 2:
    raise ValueError(
      f"task_separation needs usage [..., tasks, routers, E] with at least 2 tasks; got shape {tuple(usage.shape)}."
    )
  diff = usage[..., :, None, :, :] - usage[..., None, :, :, :]  # [..., T, T, R, E]
  tv = 0.5 * jnp.abs(diff).sum(-1)  # [..., T, T, R], 0 on the diagonal
  return tv.sum(axis=(-3, -2)).mean(-1) / (tasks * (tasks - 1))


def _check_gates(gates: jnp.ndarray, fix: str) -> jnp.ndarray:
  """Gates [..., E] as float32, refusing what is not a gate vector (concrete values): a non-finite or
  negative entry, or a row that does not sum to 1 (tolerance 1e-3 in float32, 2e-2 in 16-bit dtypes).
  Traced gates cannot be refused: their invalid rows become NaN, which the outputs then carry."""
  gates = jnp.asarray(gates)
  if not jnp.issubdtype(gates.dtype, jnp.floating) or gates.ndim < 2:
    raise ValueError(
      f"gates has dtype {gates.dtype} and shape {gates.shape}: pass float gates [tokens, ..., E] "
      f"(softmax outputs), {fix}."
    )
  tol = 2e-2 if jnp.finfo(gates.dtype).bits <= 16 else 1e-3
  values = gates.astype(jnp.float32)
  if isinstance(values, jax.core.Tracer):
    valid = jnp.all(jnp.isfinite(values) & (values >= 0), -1) & (jnp.abs(values.sum(-1) - 1) <= tol)
    return jnp.where(valid[..., None], values, jnp.nan)
  host = np.asarray(values)
  sums = host.sum(-1)
  if not np.all(np.isfinite(host)) or (host < 0).any() or np.abs(sums - 1).max(initial=0.0) > tol:
    worst = (
      "non-finite entries"
      if not np.all(np.isfinite(host))
      else (
        f"a negative entry ({host.min():.3g})"
        if (host < 0).any()
        else f"a row summing to {sums.reshape(-1)[np.argmax(np.abs(sums - 1).reshape(-1))]:.4g}"
      )
    )
    raise ValueError(
      f"gates has {worst}: gate vectors are non-negative and sum to 1 over the last axis (E experts); {fix}."
    )
  return values


def gate_diagnostics(
  gates: jnp.ndarray, groups: jnp.ndarray | None = None, num_groups: int | None = None
) -> dict[str, jnp.ndarray]:
  """Router diagnostics of one batch of gates (e.g. at initialisation): mean entropy and task separation.

  gates: [N, *routers, E] (tokens first; stack layers on the router axes, e.g. [N, layers * routers, E]);
  groups: integer group (task) ids [N], num_groups: their count G. Returns
    "entropy_nats":     [], `gate_entropy` over every token and router,
    "task_separation":  [] (with groups), `task_separation` of the per-group mean gates [G, routers, E],
                        over the pairs of groups that have tokens (NaN with fewer than two such groups).
  Refused with a ValueError naming the argument (as `localmoe.inject.routing_diagnostics` does): gates
  that are not gate vectors (logits, negative entries, rows not summing to 1), float group ids, ids outside
  0..num_groups-1, num_groups that is not a positive integer, groups of another length than the tokens.
  Under jit (traced values) the invalid gate rows and out-of-range ids give NaN outputs instead.
  """
  gates = _check_gates(gates, "e.g. the router_gates of `collect_router_outputs`, not its logits")
  out = {"entropy_nats": gate_entropy(gates)}
  if groups is None:
    return out
  if num_groups is None:
    raise ValueError("gate_diagnostics(groups=...) needs num_groups, the number of groups (tasks).")
  if isinstance(num_groups, (bool, np.bool_)) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
    raise ValueError(f"num_groups={num_groups!r} must be a positive integer: the number of groups (e.g. tasks).")
  num_groups = int(num_groups)
  groups = jnp.asarray(groups)
  if not jnp.issubdtype(groups.dtype, jnp.integer):
    raise ValueError(
      f"groups has dtype {groups.dtype}: pass integer group ids [N] (e.g. task ids; float ids: "
      "groups.astype(jnp.int32))."
    )
  if groups.size != gates.shape[0]:
    raise ValueError(
      f"groups has {groups.size} ids but gates has {gates.shape[0]} tokens: pass one group id per token, shape (N,)."
    )
  flat = gates.reshape(gates.shape[0], -1, gates.shape[-1])  # [N, R, E]
  onehot = one_hot_labels(
    groups.reshape(-1),
    num_groups,
    "groups",
    "num_groups",
    "pass num_groups = the number of groups (ids run 0..num_groups-1)",
  )  # [N, G]
  count = onehot.sum(0)  # [G]
  usage = jnp.einsum("ng,nre->gre", onehot, flat) / jnp.maximum(count, 1)[:, None, None]  # [G, R, E]
  tv = 0.5 * jnp.abs(usage[:, None] - usage[None]).sum(-1).mean(-1)  # [G, G]
  present = count > 0
  pairs = present[:, None] & present[None, :] & ~jnp.eye(num_groups, dtype=bool)  # [G, G]
  out["task_separation"] = jnp.where(pairs.any(), (tv * pairs).sum() / jnp.maximum(pairs.sum(), 1), jnp.nan)
  return out
