"""An NNX model adapted by `localmoe.nnx_inject`, as the pure functions `localmoe.train.fit` trains.

    model = nnx_inject.inject(model, spec, *example, target_modules=..., key=key)
    fn, frozen = nnx_functional.split(model)
    params = fn.init(key, frozen)                           # {"adapter": {layer path: linen params}}
    y, traces = fn.apply(params, frozen, *inputs, context=task_ids, capture_routing=True)

`split` separates the model (`nnx.split`) into its graph definition, the adapter parameters (`AdapterParam`,
trainable), the frozen parameters (`frozen`, a pure dict of arrays) and the remaining state (routing context and
rng slots, kept in the Functional). The trainable params use the linen layout of
`nnx_inject.trainable` ({"adapter": {"layers/3/attn/q_proj": {"A", "B", "router": {"kernel"}}}}), so parameter
groups written for linen models ("adapter/.*/router/.*") match them. `init` draws fresh adapter params from a
key (the same initialisers as `inject`: one key per layer, `fold_in(key, i)` in call order), so every seed of a
fit starts from its own draw; `apply` merges params and frozen state into a model inside the traced function
and calls it in a routing context. Trainable extras are not supported here (none is needed by an LM whose output
projection stays frozen); a model with them is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax

from localmoe import inject as inject_lib
from localmoe import nnx_inject


def _keys(path: str) -> list:
  return [int(p) if p.isdigit() else p for p in path.split("/")]


@dataclasses.dataclass(frozen=True, eq=False)
class Functional:
  """init / apply of one adapted NNX model (see the module docstring)."""

  graphdef: Any
  adapter: inject_lib.PerLayer  # what `inject` attached (its per-layer specs)
  layers: tuple  # the adapted layers' LayerInfo, in call order
  kernel_paths: tuple  # where each adapted layer's frozen kernel sits in `frozen`
  rest: Any = None  # the model's non-parameter state (routing slots), constant

  def init(self, key, frozen) -> dict:
    kernels = []
    for keys in self.kernel_paths:
      node = frozen
      for k in keys:
        node = node[k]
      kernels.append(node)
    return {"adapter": self.adapter.init(key, list(self.layers), kernels)}

  def model(self, params, frozen) -> nnx.Module:
    tree: dict = {}
    for path, value in params["adapter"].items():
      node = tree
      for k in _keys(path):
        node = node.setdefault(k, {})
      node["adapter"] = {"params": value}
    rest = jax.tree_util.tree_map(lambda a: a, self.rest)  # fresh Variables in the caller's trace
    return nnx.merge(self.graphdef, tree, frozen, rest)

  def apply(self, params, frozen, *args, context=None, capture_routing: bool = False, **kwargs):
    return nnx_inject.call(
      self.model(params, frozen), *args, context=context, capture_routing=capture_routing, **kwargs
    )


def split(model: nnx.Module) -> tuple[Functional, dict]:
  """(Functional, frozen pure dict) of a model adapted by `nnx_inject.inject` (the model is not changed)."""
  if nnx_inject.num_extra_params(model):
    raise ValueError(
      "the model has trainable extras (inject(..., trainable_extras=...)): nnx_functional trains "
      "adapters only; inject without trainable_extras."
    )
  # Params (frozen weights) travel as a pure dict; the rest (routing context and rng slots, empty between calls)
  # stays an nnx.State in the Functional, so variables whose value holds no array are merged back intact.
  graphdef, _, weights, rest = nnx.split(model, nnx_inject.AdapterParam, nnx.Param, ...)
  described = nnx_inject.described(model)
  layers = nnx_inject.layers(model)
  kernel_paths = tuple(tuple(_keys(layer.path)) + ("base", "kernel") for layer in layers)
  adapter = described.adapter if isinstance(described.adapter, inject_lib.PerLayer) else None
  if adapter is None:
    raise ValueError("nnx_functional needs a per-layer adapter set (inject with a spec dict or rules).")
  return Functional(graphdef, adapter, layers, kernel_paths, rest), nnx.to_pure_dict(weights)
