"""Localized LoRA-MoE: a K_y x K_x grid of cells, E low-rank experts per cell, softmax routing.

Block-wise (macro-routing, Eq. 5-6): one global router, one gate vector g in R^E for the whole grid,
  h_i = (alpha / r) sum_e g_e sum_j B_ij^(e) A_ij^(e)T x_j.
Cell-wise (micro-routing, Eq. 7-8): an independent router per cell, gates g^(i,j) in R^E,
  h_i = (alpha / r) sum_j sum_e g_e^(i,j) B_ij^(e) A_ij^(e)T x_j.

Experts are stacked arrays, A: [E, K_y, K_x, d_in/K_x, r], B: [E, K_y, K_x, d_out/K_y, r] (axis letters in
`localmoe.grid`). Large layers apply them as one 2-D GEMM per input field and one per output segment
(`grid.field_matmuls`, `grid.segment_matmuls`; the module docstring of `localmoe.grid` says why this beats
the einsum form, and below which size the einsum form is kept). An activation router is fused into stage
1: its columns that read field x_j join that field's GEMM (cell-wise: the K_y routers of column j, Eq. 7;
block-wise: rows j of the global W_g, whose partial logits are summed over j, Eq. 5). Gates are mixed in
rank space, z = g * (A^T x_j), then B z, so no per-example d_out x d_in update is ever built: the extra
activation memory is O(batch * E * K_y * K_x * r).

Router controls (fields; the defaults give Eq. 5 / Eq. 7 exactly, see `localmoe.routing`):
  router_init          "normal" N(0, 1/F) (default), "uniform" U(-s, s), "zeros", "task_aligned" (context
                       routers only: context t starts on expert t mod E, in every cell), or a callable
  router_init_scale    std of "normal" (None -> 1/sqrt(F); MixLoRA 0.02), bound s of "uniform" (None -> 1e-3)
  router_init_margin   logit lead of expert t mod E under "task_aligned" (4.0)
  router_hard          None (soft / top-k), "straight_through" (top-1 forward, softmax gradient backward),
                       "gumbel" (straight-through Gumbel-softmax, rng "gumbel"), "gumbel_soft" (the relaxed
                       Gumbel-softmax sample); without the rng the Gumbel modes are deterministic
  router_dropout       expert dropout probability with rng "dropout" (SMEAR 0.1), renormalised; 0 = off
  temperature          softmax / Gumbel temperature; `__call__(..., temperature=T)` overrides it per call
                       (an annealed `routing.temperature_at(step, ...)`)
  temperature_schedule None, or (start, end, steps) / (start, end, steps, kind): the temperature anneals as
                       `routing.temperature_at(step, start, end, steps, kind)` (kind "exponential" by default,
                       SMEAR: (10.0, 0.5, steps)) over the `step=` given at call time; a call without `step`
                       uses `end` (the trained temperature). The trainer passes the global step
                       (`Task.takes_step`; `single_layer.layer_task` does this for an adapter with a schedule).
  The rng streams a configuration needs in training are `rng_streams` ("gumbel", "dropout"); a trainer draws
  them per step (`Task.rngs`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from localmoe import grid
from localmoe import routing
from localmoe.adapters import common


class _RoutedGrid(nn.Module):
  """Shared fields and forward pass of the two routed grids; subclasses choose the router layout."""

  d_in: int  # input width of the adapted layer
  d_out: int  # output width of the adapted layer
  k_y: int  # K_y output segments (grid rows)
  k_x: int  # K_x input fields (grid columns)
  rank: int  # r_b, rank of every expert in every cell
  num_experts: int  # E
  router_input: str = "context"  # "context": an external vector; "activation": x itself
  context_dim: int | None = None  # D, width of the context (needed for "context")
  router_bias: bool = False  # the paper's routers have no bias
  temperature: float = 1.0  # softmax temperature of the router
  top_k: int | None = None  # None: soft routing (Eq. 5/7); k: k nonzero gates
  alpha: float | None = None  # scale alpha / r; None -> 1
  a_init: common.Initializer | str = "lora"
  b_init: common.Initializer | str = "zeros"
  router_init: common.Initializer | str = "normal"  # "normal", "uniform", "zeros", "task_aligned" or a callable
  router_init_scale: float | None = None  # std of "normal" (None: 1/sqrt(F)); bound s of "uniform" (1e-3)
  router_init_margin: float = 4.0  # "task_aligned": logit of expert t mod E for context t
  router_hard: str | None = None  # None, "straight_through", "gumbel" or "gumbel_soft"
  router_dropout: float = 0.0  # expert dropout probability (rng "dropout"); 0: off
  temperature_schedule: tuple | None = None  # None, or (start, end, steps[, kind]): module docstring
  allow_overcomplete_rank: bool = False  # permit rank > cell size
  param_dtype: common.Dtype = jnp.float32  # storage dtype of the experts and the router
  dtype: common.Dtype | None = None  # compute dtype; None -> the input's dtype

  def __post_init__(self):
    common.check_dtypes(self)
    common.check_alpha(self.alpha)
    dx = grid.check_divisible(self.d_in, self.k_x, "d_in", "k_x")
    dy = grid.check_divisible(self.d_out, self.k_y, "d_out", "k_y")
    common.check_rank(self.rank, dy, dx, "grid cell", self.allow_overcomplete_rank)
    common.check_positive(self.num_experts, "num_experts")
    if self.router_input not in routing.ROUTER_INPUTS:
      raise ValueError(f"router_input={self.router_input!r} is not one of {routing.ROUTER_INPUTS}.")
    if self.router_input == "context":
      if self.context_dim is None or self.context_dim < 1:
        raise ValueError(
          f"context_dim={self.context_dim!r}: router_input='context' needs the context width "
          "(e.g. context_dim=3 for a one-hot over 3 contexts), or use "
          "router_input='activation'."
        )
    if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
      raise ValueError(
        f"top_k={self.top_k} must lie in 1..num_experts={self.num_experts} (or be None for soft routing)."
      )
    routing.check_temperature(self.temperature, "temperature")
    self._check_router_controls()
    self._check_temperature_schedule()
    super().__post_init__()

  def _check_router_controls(self):
    routing.router_initializer(self.router_init, self.router_init_scale, self.router_init_margin)
    if self.router_init == "task_aligned" and self.router_input != "context":
      raise ValueError(
        "router_init='task_aligned' starts context t on expert t mod E and needs "
        "router_input='context'; an activation router has no context index: use "
        "router_init='normal', 'uniform' or 'zeros'."
      )
    if self.router_hard is not None:
      if self.router_hard not in routing.ROUTER_HARD:
        raise ValueError(
          f"router_hard={self.router_hard!r} is not one of {routing.ROUTER_HARD} (or None for soft routing)."
        )
      if self.top_k is not None:
        raise ValueError(
          f"top_k={self.top_k} with router_hard={self.router_hard!r}: router_hard already "
          "chooses the gates (one expert, or a relaxed sample); leave top_k=None."
        )
    try:
      p = float(self.router_dropout)
    except (TypeError, ValueError):
      p = float("nan")
    if isinstance(self.router_dropout, bool) or not 0 <= p < 1:
      raise ValueError(
        f"router_dropout={self.router_dropout!r} must be a probability in [0, 1) (SMEAR uses 0.1; 0 is off)."
      )

  def _check_temperature_schedule(self):
    schedule = self.temperature_schedule
    if schedule is None:
      return
    fix = "use (start, end, steps) or (start, end, steps, kind), e.g. (10.0, 0.5, 1000), or None"
    if isinstance(schedule, str) or not isinstance(schedule, (tuple, list)) or len(schedule) not in (3, 4):
      raise ValueError(f"temperature_schedule={schedule!r}: {fix}.")
    try:
      routing.temperature_at(0, *schedule)
    except ValueError as error:
      raise ValueError(f"temperature_schedule={tuple(schedule)!r}: {error}") from None
    if self.temperature != 1.0:
      raise ValueError(
        f"temperature={self.temperature!r} with temperature_schedule={tuple(schedule)!r}: the "
        "schedule sets the temperature; leave temperature at 1.0 (or drop the schedule)."
      )

  @property
  def rng_streams(self) -> tuple[str, ...]:
    """The flax rng streams this adapter uses in training: "gumbel" (router_hard "gumbel"/"gumbel_soft")
    and "dropout" (router_dropout > 0); () when its routing is deterministic."""
    return (("gumbel",) if self.router_hard in ("gumbel", "gumbel_soft") else ()) + (
      ("dropout",) if float(self.router_dropout) > 0 else ()
    )

  def _temperature(self, temperature, step):
    """The temperature of one call: the call's own, else the schedule at `step` (its end without a step),
    else None (the field)."""
    if temperature is not None:
      return routing.check_temperature(temperature)  # refused before any compute
    if self.temperature_schedule is None:
      return None
    start, end, steps, *kind = self.temperature_schedule
    if step is None:
      return float(end)
    return routing.temperature_at(step, start, end, steps, *kind)

  # Subclasses define: router_grid, router_per_field, _router_features(), _cell_gates(gates),
  # _router_columns(kernel) and _field_logits(columns) (the activation router fused into stage 1).
  router_grid = property(lambda self: ())
  router_per_field = property(lambda self: False)

  def setup(self):
    e, cells, r = self.num_experts, (self.k_y, self.k_x), self.rank
    pd = common.resolve_dtype(self.param_dtype, "param_dtype")
    self.A = self.param("A", common.resolve_init(self.a_init, "a_init"), (e, *cells, self.d_in // self.k_x, r), pd)
    self.B = self.param("B", common.resolve_init(self.b_init, "b_init"), (e, *cells, self.d_out // self.k_y, r), pd)
    self.router = routing.Router(
      num_experts=e,
      features=self._router_features(),
      grid=self.router_grid,
      per_field=self.router_per_field,
      use_bias=self.router_bias,
      temperature=self.temperature,
      top_k=self.top_k,
      hard=self.router_hard,
      dropout=float(self.router_dropout),
      kernel_init=routing.router_initializer(self.router_init, self.router_init_scale, self.router_init_margin),
      param_dtype=pd,
      dtype=common.resolve_dtype(self.dtype, "dtype"),
    )

  def _context(self, context) -> jnp.ndarray:
    """Validates the context and returns it as float [..., D] (integer labels are one-hot encoded).

    Labels outside 0..context_dim-1 are a ValueError when concrete; traced (under jit) they give NaN
    router inputs, hence NaN outputs, never a silent uniform routing (`routing.one_hot_labels`).
    """
    if context is None:
      raise ValueError(
        f"{type(self).__name__} has router_input='context' but was called without a "
        "context: pass context=<one-hot or embedding [..., context_dim]> (or integer labels), "
        "or build it with router_input='activation'."
      )
    context = jnp.asarray(context)
    if jnp.issubdtype(context.dtype, jnp.integer):
      context = routing.one_hot_labels(
        context,
        self.context_dim,
        "context",
        "context_dim",
        f"pass ids in 0..{self.context_dim - 1}, or set context_dim to the number of tasks",
      )
    if context.shape[-1] != self.context_dim:
      raise ValueError(f"context has {context.shape[-1]} features but context_dim={self.context_dim}.")
    return context

  def route(self, x: jnp.ndarray | None, context=None, temperature=None) -> jnp.ndarray:
    """Gates from the router, in the compute dtype: [..., E] (block-wise) or [..., K_y, K_x, E] (cell-wise).

    temperature: overrides the `temperature` field for this call (e.g. `routing.temperature_at(step, ...)`).
    """
    if temperature is not None:
      temperature = routing.check_temperature(temperature)
    cd = common.compute_dtype(self.dtype, x, self.param_dtype)
    if self.router_input == "context":
      return self.router(self._context(context).astype(cd), temperature)
    if x is None:
      raise ValueError("activation routing needs x: pass gates= to materialise a fixed routing.")
    x = x.astype(cd)
    return self.router(grid.split_fields(x, self.k_x) if self.router_per_field else x, temperature)

  def __call__(
    self, x: jnp.ndarray, context=None, gates: jnp.ndarray | None = None, temperature=None, step=None
  ) -> jnp.ndarray:
    """Eq. 6 / Eq. 8. x: [..., d_in] -> Delta(x): [..., d_out] in the compute dtype.

    context: [..., D] (or integer labels [...]) for router_input="context"; ignored otherwise.
    gates: optional fixed gates that bypass the router, [..., E] (block-wise) or [..., K_y, K_x, E].
    temperature: the router temperature for this call (a float or a traced scalar); None -> the schedule at
    `step` (`temperature_schedule`), else the field.
    Training-time randomness comes from flax rngs: "gumbel" (router_hard="gumbel"/"gumbel_soft") and
    "dropout" (router_dropout > 0), e.g. `apply(v, x, c, rngs={"gumbel": k1, "dropout": k2})`.
    """
    temperature = self._temperature(temperature, step)
    cd = common.compute_dtype(self.dtype, x, self.param_dtype)
    x = x.astype(cd)
    if not grid.use_field_gemms(x.shape):  # small layer: the einsum form
      return self._einsum_forward(x, context, gates, cd, temperature)
    fused = gates is None and self.router_input == "activation"
    if fused:
      lead, x2 = x.shape[:-1], grid.flatten_tokens(x)  # x2: [N, d_in]
    else:
      lead, x2, gates = self._flat_tokens_and_gates(x, context, gates, cd, temperature)  # [N, 1|K_y, 1|K_x, E]
    e, k_y = self.num_experts, self.k_y
    weights = grid.expert_columns(self.A.astype(cd))  # [K_x, d_in/K_x, K_y*E*r]
    width = weights.shape[-1]
    if fused:  # router columns join stage 1
      weights = jnp.concatenate([weights, self._router_columns(self.router.kernel.astype(cd))], axis=-1)
    columns = grid.field_matmuls(x2, weights, routing.logit_dtype(cd) if fused else None)
    z = grid.codes_by_cell(columns[..., :width].astype(cd), k_y, e)  # [N, K_y, K_x, E, r]
    if fused:
      gates = self._cell_gates(self.router.gates(self._field_logits(columns[..., width:]), cd, temperature))
    z = z * gates[..., None]  # gate mixing in rank space
    h = grid.segment_matmuls(z, self.B.astype(cd))  # [N, d_out]
    return (common.scaling(self.alpha, self.rank) * h).reshape(*lead, self.d_out).astype(cd)

  def _flat_tokens_and_gates(self, x, context, gates, cd, temperature=None):
    """Gates from the router (or the given fixed gates) and x, broadcast to common leading axes `lead` and
    flattened: (lead, x2 [N, d_in], gates [N, 1 or K_y, 1 or K_x, E]), N = prod(lead)."""
    gates = self.route(x, context, temperature) if gates is None else jnp.asarray(gates).astype(cd)
    gates = self._cell_gates(gates)  # [..., 1 or K_y, 1 or K_x, E]
    lead = jnp.broadcast_shapes(x.shape[:-1], gates.shape[:-3])
    x2 = grid.flatten_tokens(jnp.broadcast_to(x, (*lead, self.d_in)))  # [N, d_in]
    gates = jnp.broadcast_to(gates, (*lead, *gates.shape[-3:])).reshape(x2.shape[0], *gates.shape[-3:])
    return lead, x2, gates

  def _einsum_forward(self, x, context, gates, cd, temperature=None) -> jnp.ndarray:
    """Eq. 6 / Eq. 8 as two einsums over flattened tokens, for small layers (`localmoe.grid.use_field_gemms`)."""
    lead, x2, gates = self._flat_tokens_and_gates(x, context, gates, cd, temperature)
    gates = jnp.moveaxis(gates, -1, 1)[..., None]  # [N, E, 1 or K_y, 1 or K_x, 1]
    xs = grid.split_fields(x2, self.k_x)  # [N, K_x, d_in/K_x]
    z = jnp.einsum("njd,eijdr->neijr", xs, self.A.astype(cd))  # [N, E, K_y, K_x, r]
    h = jnp.einsum("neijr,eijor->nio", z * gates, self.B.astype(cd))  # [N, K_y, d_out/K_y]
    h = grid.merge_segments(h).reshape(*lead, self.d_out)  # [..., d_out]
    return (common.scaling(self.alpha, self.rank) * h).astype(cd)

  def delta_weight(self, context=None, gates: jnp.ndarray | None = None) -> jnp.ndarray:
    """Dense Delta W [d_out, d_in] for ONE fixed routing: a single context vector/label, or fixed gates."""
    if gates is None:
      if self.router_input == "activation":
        raise ValueError(
          "activation-routed gates depend on x: pass gates= (a fixed gate) to materialise "
          "Delta W, or evaluate the adapter on x directly."
        )
      gates = self.route(None, context, self._temperature(None, None))
    cd = common.compute_dtype(self.dtype, None, self.param_dtype)
    cell_gates = self._cell_gates(jnp.asarray(gates).astype(cd))
    cell_gates = jnp.broadcast_to(cell_gates, (self.k_y, self.k_x, self.num_experts))  # [K_y, K_x, E]
    blocks = jnp.einsum("ije,eijor,eijdr->ijod", cell_gates, self.B.astype(cd), self.A.astype(cd))
    return (common.scaling(self.alpha, self.rank) * grid.assemble(blocks)).astype(cd)

  def num_params(self) -> int:
    cells = self.k_y * self.k_x
    experts = self.num_experts * cells * self.rank * (self.d_in // self.k_x + self.d_out // self.k_y)
    return experts + routing.num_router_params(
      self.num_experts, self.router_grid, self._router_features(), self.router_bias
    )


class BlockWiseLoRAMoE(_RoutedGrid):
  """Block-wise LoRA-MoE (macro-routing, Eq. 5-6): E full-grid experts, one global router.

  Router kernel W_g: [D, E] on a context (the paper's 2 x 3 in Section 3.1), or [d_in, E] on x (Eq. 5).
  """

  router_grid = property(lambda self: ())
  router_per_field = property(lambda self: False)

  def _router_features(self) -> int:
    return self.context_dim if self.router_input == "context" else self.d_in

  def _cell_gates(self, gates: jnp.ndarray) -> jnp.ndarray:
    """[..., E] -> [..., 1, 1, E]: the same gate for every cell."""
    return gates[..., None, None, :]

  def _router_columns(self, kernel: jnp.ndarray) -> jnp.ndarray:
    """W_g [d_in, E] -> [K_x, d_in/K_x, E]: the rows of W_g that read field j (Eq. 5 split by fields)."""
    return kernel.reshape(self.k_x, self.d_in // self.k_x, self.num_experts)

  def _field_logits(self, columns: jnp.ndarray) -> jnp.ndarray:
    """Per-field partial logits [N, K_x, E] -> x W_g = sum_j x_j W_g,j: [N, E]."""
    return columns.sum(axis=1)


class CellWiseLoRAMoE(_RoutedGrid):
  """Cell-wise LoRA-MoE (micro-routing, Eq. 7-8): E experts and an independent router in every cell.

  Router kernels W_g^(i,j): [K_y, K_x, D, E] on a context, or [K_y, K_x, d_in/K_x, E] on the local field
  x_j (Eq. 7), so cell (i, j)'s gate never sees another field (Lemma 1, Corollary 1).
  """

  router_grid = property(lambda self: (self.k_y, self.k_x))
  router_per_field = property(lambda self: self.router_input == "activation")

  def _router_features(self) -> int:
    return self.context_dim if self.router_input == "context" else self.d_in // self.k_x

  def _cell_gates(self, gates: jnp.ndarray) -> jnp.ndarray:
    """[..., K_y, K_x, E] unchanged; a single gate vector [E] is shared by every cell."""
    return gates[None, None, :] if gates.ndim == 1 else gates

  def _router_columns(self, kernel: jnp.ndarray) -> jnp.ndarray:
    """W_g^(i,j) [K_y, K_x, d_in/K_x, E] -> [K_x, d_in/K_x, (i, e)]: column j's K_y routers read x_j (Eq. 7)."""
    return kernel.transpose(1, 2, 0, 3).reshape(self.k_x, self.d_in // self.k_x, -1)

  def _field_logits(self, columns: jnp.ndarray) -> jnp.ndarray:
    """[N, K_x, (i, e)] -> logits [N, K_y, K_x, E]."""
    n = columns.shape[0]
    return columns.reshape(n, self.k_x, self.k_y, self.num_experts).transpose(0, 2, 1, 3)
