"""Router traces of an adapted model's forward pass, and the router losses and diagnostics computed from them.

Both hosts (`localmoe.inject` for linen, `localmoe.nnx_inject` for NNX) record one `RouterTrace` per routed
layer call; `router_losses` (Switch load balance, ST-MoE z-loss) and `routing_diagnostics` (expert usage and
entropy per group) read them, optionally weighted by a mask (e.g. the attention mask).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from localmoe import routing


@dataclasses.dataclass(frozen=True)
class RouterTrace:
  """What one routed layer's router produced in a forward pass (`apply(..., capture_routing=True)`).

  logits, gates: [*lead, routers, E], lead = the batch axes the router ran on: [batch] for a context
  router (one routing per example), the layer's leading axes (e.g. [batch, tokens]) for an activation router.
  routers = 1 (block-wise) or K_y * K_x (cell-wise, row-major over the grid).
  """

  path: str
  logits: jnp.ndarray
  gates: jnp.ndarray
  grid: tuple[int, ...]  # () block-wise, (K_y, K_x) cell-wise
  top_k: int | None
  input_lead: tuple[int, ...] | None = None  # the layer input's leading axes, e.g. (batch, tokens); None: lead


def router_losses(
  traces: Sequence[RouterTrace], load_balance: float = 0.0, z_loss: float = 0.0, mask: jnp.ndarray | None = None
) -> dict[str, jnp.ndarray]:
  """Switch load-balance and ST-MoE z-losses summed over every routed layer, and their weighted sum.

  Balance: per cell for cell-wise routers (each cell's router balanced over its tokens), global for
  block-wise (one router); with top_k routing the dispatch fraction counts the k chosen experts, with soft
  routing the top-1 (`routing.load_balancing_loss`, `routing.router_z_loss`, token-weighted). mask:
  optional [batch, ...] weights that broadcast onto each routed layer's input leading axes (e.g. the
  attention mask [batch, tokens], so padding tokens do not count); context routers run once per example,
  and an example counts if any of its entries is nonzero. A mask with more axes than a layer's input, or
  of another batch, is a ValueError naming the layer. An all-zero mask counts no token: both losses are 0
  (with zero gradient), not NaN.
  Returns {"aux_loss": load_balance * balance + z_loss * z, "load_balance": balance, "router_z": z}.
  """
  balance = jnp.zeros((), jnp.float32)
  z = jnp.zeros((), jnp.float32)
  for trace in traces:
    gates, logits, weights = _flat(trace, mask)
    balance = balance + routing.load_balancing_loss(gates, trace.top_k or 1, True, weights)
    z = z + routing.router_z_loss(logits, weights)
  return {"aux_loss": load_balance * balance + z_loss * z, "load_balance": balance, "router_z": z}


def _flat(trace: RouterTrace, mask):
  """gates, logits [N, R, E] in float32 and per-row weights [N]."""
  lead = trace.gates.shape[:-2]
  gates = trace.gates.astype(jnp.float32).reshape(-1, *trace.gates.shape[-2:])
  logits = trace.logits.astype(jnp.float32).reshape(-1, *trace.logits.shape[-2:])
  if mask is None:
    weights = jnp.ones(gates.shape[0], jnp.float32)
  else:
    m = jnp.asarray(mask, jnp.float32)
    _check_mask(m.shape, trace)
    if m.ndim > len(lead):  # a per-example router: an example counts if it has any token
      m = m.reshape(m.shape[: len(lead)] + (-1,)).max(-1)
    weights = jnp.broadcast_to(m.reshape(m.shape + (1,) * (len(lead) - m.ndim)), lead).reshape(-1)
  return gates, logits, weights


def _check_mask(shape: tuple[int, ...], trace: RouterTrace) -> None:
  """The mask must broadcast onto the layer input's leading axes, aligned from the batch axis."""
  lead = tuple(trace.gates.shape[:-2] if trace.input_lead is None else trace.input_lead)
  if len(shape) > len(lead) or any(m not in (1, n) for m, n in zip(shape, lead)):
    raise ValueError(
      f"mask has shape {tuple(shape)} but layer {trace.path!r} routes inputs with leading axes "
      f"{lead}: pass weights [batch, ...] of this batch that broadcast onto them (e.g. the "
      "attention mask [batch, tokens]), without extra axes."
    )


def routing_diagnostics(
  traces: Sequence[RouterTrace], groups: jnp.ndarray | None = None, num_groups: int = 1, mask: jnp.ndarray | None = None
) -> dict[str, jnp.ndarray]:
  """Per-layer expert usage and routing entropy, optionally per group (e.g. per task).

  groups: integer labels [batch] (one per example); num_groups: their count. Returns
    "usage":   [layers, groups, routers, E], mean gate per router and expert (rows sum to 1 where a group
               has examples, 0 where it has none),
    "entropy": [layers, groups, routers], mean per-token gate entropy in nats (0 = hard routing),
  with layers in call order of the routed layers (`routing.group_usage`). All routed layers must have the
  same routers and E. Group ids outside 0..num_groups-1 are a ValueError when concrete; traced (under jit)
  they make the usage and entropy NaN (`routing.one_hot_labels`), never silently dropped.
  """
  if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
    raise ValueError(f"num_groups={num_groups!r} must be a positive integer: the number of groups (e.g. tasks).")
  if groups is not None and not jnp.issubdtype(jnp.asarray(groups).dtype, jnp.integer):
    raise ValueError(
      f"groups has dtype {jnp.asarray(groups).dtype}: pass integer group ids [batch] "
      "(e.g. task ids; float ids: groups.astype(jnp.int32))."
    )
  usage, entropy = [], []
  for trace in traces:
    gates, _, weights = _flat(trace, mask)
    if groups is None:
      onehot = jnp.ones((gates.shape[0], 1), jnp.float32)
    else:
      lead = trace.gates.shape[:-2]
      if np.shape(groups) != tuple(lead[:1]):
        raise ValueError(
          f"groups has shape {np.shape(groups)} but layer {trace.path!r} routed a batch of "
          f"{lead[0]}: pass one group id per example, shape ({lead[0]},)."
        )
      g = jnp.asarray(groups).reshape(lead[:1] + (1,) * (len(lead) - 1))
      onehot = routing.one_hot_labels(
        jnp.broadcast_to(g, lead).reshape(-1),
        num_groups,
        "groups",
        "num_groups",
        "pass num_groups = the number of groups (ids run 0..num_groups-1)",
      )  # [N, G]
    w = onehot * weights[:, None]  # [N, G]
    u, ent = routing.group_usage(gates, w)
    usage.append(u)
    entropy.append(ent)
  if not usage:
    return {}
  shapes = {u.shape for u in usage}
  if len(shapes) > 1:
    raise ValueError(f"routing_diagnostics stacks layers of one router layout; got usage shapes {sorted(shapes)}.")
  return {"usage": jnp.stack(usage), "entropy": jnp.stack(entropy)}
