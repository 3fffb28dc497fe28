"""Adapting a whole Flax model: attach adapters to the nn.Dense / nn.DenseGeneral layers whose path matches.

This is PEFT's `target_modules` for flax.linen. The backbone is not rewritten: its params stay frozen and
untouched, and during `apply` a method interceptor (`nn.intercept_methods`) adds the adapter's update to the
output of each matched layer,

  y = Dense(x) + Delta_l(x)          (LoRA Eq. 1, Localized LoRA Eq. 4, LoRA-MoE Eq. 6/8, DoRA, ...)

so any linen model whose linear maps are nn.Dense or nn.DenseGeneral (or subclasses) can be adapted without
changes; linen's own `nn.MultiHeadDotProductAttention` builds query/key/value/out from DenseGeneral.

  adapted, trainable = inject(model, frozen_params, {"method": "cellwise_moe", "k_y": 4, "k_x": 4, "rank": 2,
                              "num_experts": 4, "router_input": "context", "context_dim": 3},
                              x_example, target_modules=r".*(query|key|value|out)", key=key,
                              trainable_extras=r"head")
  y = adapted.apply(frozen_params, trainable, x, context=task_ids)       # frozen params are never trained
  y, routing = adapted.apply(frozen_params, trainable, x, context=task_ids, capture_routing=True)
  aux = router_losses(routing, load_balance=0.01, z_loss=1e-3)           # add aux["aux_loss"] to the loss
  plain = adapted.merge(frozen_params, trainable, context=1)             # model.apply({"params": plain}, x)

DenseGeneral: the grid and the routers see the flattened widths, d_in = prod(in axes) and d_out =
prod(features); q/k/v map [..., d] -> [..., heads, head_dim] (d_out = heads * head_dim), the output projection
[..., heads, head_dim] -> [..., d] (d_in = heads * head_dim). The flattening order is the kernel's, so
`Delta W` of a cell is a block of `kernel.reshape(d_in, d_out).T`.

Einsum (`nn.Einsum`, Gemma-style projections): the same flattened view, d_in = prod(contracted axes) and
d_out = prod(kernel axes kept in the output), both in kernel order (`localmoe.einsum_layers`); equations that
have no such view (a kernel per batch index, a diagonal, ...) are refused naming the layer and the equation.
Which calls are adapted, their geometry and the discovery pass are `localmoe.linen_layers`. The NNX sibling
of this module is `localmoe.nnx_inject`; what both hosts share (geometry, adapter sets,
refusals, merge) is `localmoe.adapt_core`, and the router losses and diagnostics are
`localmoe.router_traces` (re-exported here as `inject.router_losses`, `inject.routing_diagnostics`).

Trainable params are {"adapter": <the adapter's params>, "extras": <frozen-model params kept trainable>}:
`trainable_extras` (PEFT's `modules_to_save`) selects frozen-model modules by path pattern (a task head, one
head per task); their params start from the frozen values, are counted separately (`num_extra_params`) and
replace the frozen ones in `apply` and `merge`.

Context: `apply(..., context=c)` hands a per-example context (one-hot or embedding [batch, D], or integer
labels [batch]) to every context-routed adapter. The router reads it once per example and its gates are
broadcast over the remaining leading axes of the layer's input (the tokens). Activation-routed adapters
route on their own input; both kinds may be mixed in one model (`PerLayer.rules`). A float context must be
[batch, D]: one float vector [n] is refused (ambiguous: n float labels, or one embedding for all examples).
Integer labels outside 0..context_dim-1 are a ValueError when they are concrete (eager calls, constants
closed over by a jitted function); traced labels cannot raise, so the outputs of their examples are NaN
(`routing.one_hot_labels`), never a silent uniform routing.

Adapters come in two kinds, both handled by an `AdapterSet` (init over all matched layers; a per-forward
`session` that returns Delta for the l-th matched call):
  * per-layer adapters (`PerLayer`): one independent module per matched layer, built from a spec for
    `localmoe.adapters.make` (d_in/d_out filled in), from (pattern, spec) rules, or from a callable.
    An adapter class with `uses_base_kernel = True` (DoRA) also receives the frozen kernel [d_in, d_out].
  * model-wide adapters (`localmoe.queryable.QueryableLoRA`): shared parameters across layers and a state
    carried from layer to layer within one forward pass (Algorithm 1).

Projection modules of the model's own class (gemma's linen `Einsum` called as `(eqn, x)`, its weights under
`nn.share_scope`): a module that is not a Flax class and holds params with ndim >= 2 in its scope is adapted
on its weights' contractions, intercepted while its `__call__` runs (`localmoe.projections`: keys, STACKED
q/k/v slices, stacked MoE experts refused by name).

Matched layers are ordered by their first call in a forward pass; that order is `adapted.layers`. `nn.remat`
layers are adapted like any other (one adapter per layer). A layer of an `nn.scan` / `nn.vmap` stack (its
kernel stored [L, ...], `LayerInfo.stack` = (L,)) gets one adapter per layer, its params stacked [L, ...]:
`apply` places them in the layer's own params scope (`STACKED_ADAPTERS`), so the stack's transform, which
slices `params` (variable_axes={"params": 0}), hands each layer its slice with its kernel. Router traces of
such a layer leave the transform only when its variable_axes also scans `TRACES` ({"params": 0, TRACES: 0};
one trace per layer), else capture_routing is an error naming the layer. `merge` gives the stacked kernel
[L, ...] with each layer's Delta W. A kernel whose layer axis does not lead, and a model-wide adapter
(QueryableLoRA) in a stack, are refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from localmoe import adapt_core
from localmoe import linen_layers
from localmoe import params as params_lib
from localmoe import projections

# The host-independent names, re-exported: `inject.LayerInfo`, `inject.PerLayer`, `inject.router_losses`, ...
from localmoe.adapt_core import (  # noqa: F401
  AdapterSet,
  LayerInfo,
  PerLayer,
  Session,
  adapter_set,
  check_key,
  check_rngs,
  merge_context,
  path_matcher,
  routes_on_activation,
  routes_on_context,
)
from localmoe.linen_layers import LINEAR_TYPES, STACKED_ADAPTERS, TRACES  # noqa: F401
from localmoe.router_traces import RouterTrace, router_losses, routing_diagnostics  # noqa: F401

# ------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
  """A frozen Flax model with adapters attached to its matched linear layers (built by `inject`)."""

  model: nn.Module  # the backbone, unchanged
  adapter: Any  # an AdapterSet (PerLayer, QueryableLoRA, ...)
  layers: tuple[LayerInfo, ...]  # matched layers in call order
  example_args: tuple[Any, ...]  # shapes used to discover the layers
  target_modules: str | tuple[str, ...]
  trainable_extras: str | tuple[str, ...] | None = None  # regex (or names) of frozen-param modules to train
  extra_paths: tuple[str, ...] = ()  # module paths selected by trainable_extras
  extra_leaves: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # (path, shape, dtype) of each extra param
  slots: tuple[projections.Slot, ...] = ()  # the layers of generic modules (`localmoe.projections`)

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(layer.path for layer in self.layers)

  def num_params(self) -> int:
    """Trainable adapter parameters (without the trainable extras)."""
    return int(self.adapter.num_params(self.layers))

  def num_extra_params(self, frozen_params) -> int:
    """Parameters of the frozen-model modules kept trainable (`trainable_extras`)."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(self.extras_of(frozen_params))))

  def context_routed_paths(self) -> tuple[str, ...]:
    """Matched layers whose adapter routes on an external context."""
    if not isinstance(self.adapter, PerLayer):
      return ()
    return tuple(l.path for l in self.layers if routes_on_context(self.adapter.module(l)))

  def extras_of(self, frozen_params) -> dict:
    """The frozen params selected by `trainable_extras`, nested like the model's params."""
    out: dict = {}
    for module_path in self.extra_paths:
      keys = module_path.split("/")
      node = out
      for key in keys[:-1]:
        node = node.setdefault(key, {})
      node[keys[-1]] = jax.tree_util.tree_map(jnp.asarray, linen_layers.tree_get(frozen_params, keys))
    return out

  def base_kernels(self, frozen_params) -> list[jnp.ndarray]:
    """Frozen kernels [d_in, d_out] (flattened for DenseGeneral) of the matched layers, in call order."""
    slots = {slot.key: slot for slot in self.slots}
    out = []
    for l in self.layers:
      slot, one = slots.get(l.path), l.unstacked()
      if slot is None:
        w = jnp.asarray(linen_layers.tree_get(frozen_params, linen_layers.path_keys(l.path) + ["kernel"]))
        out.append(adapt_core.over_stack(lambda w: adapt_core.kernel_2d(w, one), l.stack, w))
        continue
      w = jnp.asarray(linen_layers.tree_get(frozen_params, linen_layers.path_keys(slot.module_path) + [slot.param]))
      out.append(
        adapt_core.over_stack(
          lambda w, slot=slot, one=one: adapt_core.kernel_2d(w if slot.index < 0 else w[slot.index], one), l.stack, w
        )
      )  # [*stack, d_in, d_out]
    return out

  def init_adapter(self, key: jax.Array, frozen_params) -> dict:
    """Fresh trainable params {"adapter": ..., "extras": ...} (for a new seed)."""
    return {
      "adapter": self.adapter.init(key, self.layers, self.base_kernels(frozen_params)),
      "extras": self.extras_of(frozen_params),
    }

  def _with_extras(self, frozen_params, extras):
    if not extras:
      return frozen_params

    def overlay(base, new):
      if not isinstance(new, Mapping):
        return new
      merged = dict(base)
      for key, value in new.items():
        merged[key] = overlay(base[key], value)
      return merged

    return overlay(frozen_params, extras)

  def apply(self, frozen_params, trainable, *args, context=None, capture_routing: bool = False, rngs=None, **kwargs):
    """The adapted forward pass: the backbone with Delta added to every matched layer's output.

    context: per-example context for the context-routed adapters (labels [batch] or [batch, D]).
    capture_routing: also return the router traces, [RouterTrace] in call order (for `router_losses` and
      `routing_diagnostics`).
    rngs: the adapters' training-time randomness, {"gumbel": key, "dropout": key} (`routing.RNG_STREAMS`;
      router_hard="gumbel"/"gumbel_soft", router_dropout): each adapted layer draws from
      fold_in(key, its call index). None (evaluation): deterministic routing. The backbone gets no rngs.
    """
    rngs = check_rngs(rngs)
    params = self._with_extras(jax.lax.stop_gradient(frozen_params), trainable.get("extras"))
    params = self._with_stacked(params, trainable["adapter"])
    calling: list[tuple[nn.Module, str]] = []  # the matched layer being called, its traces' sow name

    def sow(trace: RouterTrace) -> None:
      marker = jnp.zeros(tuple(trace.input_lead) + (0,), jnp.float32)  # the input's leading axes, as a shape
      module, name = calling[-1]
      if not module.is_mutable_collection(linen_layers.TRACES):  # inside an nn.scan / nn.vmap that does not carry it
        raise ValueError(
          f"layer {trace.path!r} is inside an nn.scan / nn.vmap whose variable_axes lack "
          f"{linen_layers.TRACES!r}, so its router traces cannot leave the transform: add "
          f"variable_axes={{'params': 0, {linen_layers.TRACES!r}: 0}} (localmoe.inject.TRACES) to that transform, "
          "or apply without capture_routing."
        )
      module.sow(linen_layers.TRACES, name, (trace.logits, trace.gates, marker))

    if isinstance(self.adapter, PerLayer):
      session = self.adapter.session(
        trainable["adapter"], self.layers, context=context, capture=sow if capture_routing else None, rngs=rngs
      )
    elif rngs:
      raise ValueError(
        f"rngs={sorted(rngs)}: {type(self.adapter).__name__} draws no randomness; call apply without rngs."
      )
    else:
      session = self.adapter.session(trainable["adapter"], self.layers, context=context)
    index = {p: i for i, p in enumerate(self.paths)}
    matches = path_matcher(self.target_modules)
    slots = {slot.key: slot for slot in self.slots}
    generic_keys = set(slots)
    ran: set[str] = set()

    def generic_call(next_fun, args, kwargs, ctx):
      module, path = ctx.module, linen_layers.module_path(ctx.module)
      weights = linen_layers.generic_weights(ctx, generic_keys.__contains__)
      by_param: dict[str, list] = {}
      for slot in self.slots:
        if slot.module_path == path and slot.param in weights:
          by_param.setdefault(slot.param, []).append(slot)

      def handler(hit, x, w, y):
        chosen = by_param.get(hit.param, [])
        if not chosen:
          return y

        def one(key, flat, kernel):  # Delta [..., d_out] of one slot
          calling.append((module, linen_layers.trace_name(slots[key])))
          try:
            return session(index[key], flat, kernel, **self._stacked_entry(module, key, index[key]))
          finally:
            calling.pop()

        ran.update(slot.key for slot in chosen)
        return projections.delta(chosen, [self.layers[index[s.key]] for s in chosen], hit, x, w, y, one)

      weights = {name: value for name, value in weights.items() if name in by_param}
      with projections.frame(projections.Frame(path, weights, handler, owner=module)):
        return next_fun(*args, **kwargs)

    def add_delta(next_fun, args, kwargs, ctx):
      if projections.is_quiet():  # the adapters' own math
        return next_fun(*args, **kwargs)
      top = projections.top()
      if not linen_layers.is_linear_call(ctx):
        if top is not None and top.owner is ctx.module:  # a method of the module being called
          return next_fun(*args, **kwargs)
        return generic_call(next_fun, args, kwargs, ctx)
      with projections.frame(projections.Frame(owner=ctx.module)):
        y = next_fun(*args, **kwargs)
      path = linen_layers.module_path(ctx.module)
      if not matches(path):
        return y
      if path not in index:
        raise ValueError(
          f"layer {path!r} matches target_modules but was not seen when the model was "
          "injected (different input shapes or control flow?): re-run inject with inputs "
          "that reach it."
        )
      layer = self.layers[index[path]]
      x = adapt_core.flatten_input(linen_layers.call_input(args, kwargs), layer)  # [..., d_in]
      kernel = adapt_core.kernel_2d(ctx.module.get_variable("params", "kernel"), layer)  # [d_in, d_out]
      calling.append((ctx.module, "trace"))
      try:
        with projections.quiet():
          delta = session(index[path], x, kernel, **self._stacked_entry(ctx.module, path, index[path]))  # [..., d_out]
      finally:
        calling.pop()
      delta = adapt_core.output_delta(delta, layer, linen_layers.call_input(args, kwargs).ndim, y.shape)  # y's layout
      return y + delta.astype(y.dtype)

    with nn.intercept_methods(add_delta), projections.intercepting():
      if not capture_routing:
        y = linen_layers.run_model(self.model, {"params": params}, args, kwargs)
      else:
        y, state = linen_layers.run_model(self.model, {"params": params}, args, kwargs, mutable=[linen_layers.TRACES])
    missed = sorted(generic_keys - ran)
    if missed:
      raise ValueError(
        f"layer(s) {missed[:3]} are adapted but this call intercepted no contraction of their "
        "weight, so their adapters did not run (a method other than __call__, another code path, "
        "or an op localmoe.projections does not intercept): call the model as in inject."
      )
    return y if not capture_routing else (y, self._traces(state.get(linen_layers.TRACES, {})))

  def _stacked_layers(self) -> list[tuple[int, LayerInfo, list[str]]]:
    """(call index, layer, keys of the params scope that holds its weight) of every layer of a stack."""
    slots = {slot.key: slot for slot in self.slots}
    return [
      (i, l, linen_layers.path_keys(slots[l.path].module_path if l.path in slots else l.path))
      for i, l in enumerate(self.layers)
      if l.stack
    ]

  def _with_stacked(self, params, adapter_params):
    """params with every stacked layer's adapters placed in its own params scope, stacked like its kernel:
    <scope>/STACKED_ADAPTERS/<call index> = {"params": [*stack, ...], "slice": [*stack] layer numbers}; the
    stack's transform (variable_axes={"params": 0}) slices them with the kernel."""
    stacked = self._stacked_layers()
    if not stacked:
      return params
    params = dict(params)
    for i, layer, keys in stacked:
      node = params
      for key in keys:
        node[key] = dict(node[key])
        node = node[key]
      holder = dict(node.get(linen_layers.STACKED_ADAPTERS, {}))
      count = int(np.prod(layer.stack))
      holder[str(i)] = {
        "params": adapter_params[layer.path],
        "slice": jnp.arange(count, dtype=jnp.int32).reshape(layer.stack),
      }  # [*stack]
      node[linen_layers.STACKED_ADAPTERS] = holder
    return params

  def _stacked_entry(self, module: nn.Module, path: str, i: int) -> dict:
    """{} for an unstacked layer; else this call's slice of a stacked layer's adapter params (the session's
    params=, slice_index=), read from the module's params scope."""
    if not self.layers[i].stack:
      return {}
    entry = module.get_variable("params", linen_layers.STACKED_ADAPTERS) or {}
    entry = entry.get(str(i)) if isinstance(entry, Mapping) else None
    if entry is None or np.ndim(entry["slice"]) != 0:
      raise ValueError(
        f"layer {path!r} is a layer of a stack {self.layers[i].stack} but this call sees "
        f"{'no adapters' if entry is None else 'the whole stack of adapters'} in its params scope: "
        "call the model as in inject (the stack's transform with variable_axes={'params': 0})."
      )
    return {"params": entry["params"], "slice_index": entry["slice"]}

  def _traces(self, sown) -> list[RouterTrace]:
    """The sown traces as RouterTraces: layers in call order, a layer called twice gives two in a row; a
    layer of a stack gives one per layer of the stack, in stack order."""
    traces = []
    slots = {slot.key: slot for slot in self.slots}
    for layer in self.layers:
      node = sown
      slot = slots.get(layer.path)
      for key in linen_layers.path_keys(slot.module_path if slot else layer.path) + [linen_layers.trace_name(slot)]:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
      if not node:
        continue
      module = self.adapter.module(layer)
      n = len(layer.stack)
      for logits, gates, marker in node:
        if not n:
          traces.append(
            RouterTrace(
              layer.path,
              logits,
              gates,
              tuple(module.router_grid),
              getattr(module, "top_k", None),
              tuple(marker.shape[:-1]),
            )
          )
          continue
        logits = logits.reshape((-1,) + logits.shape[n:])  # [layers, *lead, R, E]
        gates = gates.reshape((-1,) + gates.shape[n:])
        for j in range(logits.shape[0]):
          traces.append(
            RouterTrace(
              layer.path,
              logits[j],
              gates[j],
              tuple(module.router_grid),
              getattr(module, "top_k", None),
              tuple(marker.shape[n:-1]),
            )
          )
    return traces

  def merge(self, frozen_params, trainable, context=None):
    """Plain params for `model.apply`: every matched kernel + Delta W (Eq. 9), extras in place.

    Static adapters merge as they are; context-routed ones at ONE fixed context (a label or a vector [D]),
    giving one merged model per context. Activation-routed adapters cannot be merged (their Delta W changes
    with every input): the error names the layer.
    """
    if not isinstance(self.adapter, PerLayer):
      raise ValueError(
        f"{type(self.adapter).__name__} routes on activations across layers: its update depends "
        "on every input, so it has no fixed Delta W to merge; apply the adapted model instead."
      )
    params = jax.tree_util.tree_map(jnp.asarray, self._with_extras(frozen_params, trainable.get("extras")))
    params = jax.tree_util.tree_map(lambda a: a, params)  # a copy we may edit
    slots = {slot.key: slot for slot in self.slots}
    groups: dict[tuple[str, str], list] = {}
    for layer in self.layers:
      slot = slots.get(layer.path)
      if slot is not None:
        groups.setdefault((slot.module_path, slot.param), []).append(
          (slot, layer, self.adapter.module(layer), trainable["adapter"][layer.path])
        )
    for (module_path, param), parts in groups.items():
      keys = linen_layers.path_keys(module_path)
      node = dict(linen_layers.tree_get(params, keys)) if keys else params
      node[param] = projections.merged_weight(jnp.asarray(node[param]), parts, context)
      if keys:
        parent = linen_layers.tree_get(params, keys[:-1]) if len(keys) > 1 else params
        parent[keys[-1]] = node
    for layer in self.layers:
      if layer.path in slots:
        continue
      keys = linen_layers.path_keys(layer.path)
      if not keys:
        raise ValueError(
          "merge needs the adapted layer to be a submodule of the model (its params under a "
          "name), not the root module itself."
        )
      node = dict(linen_layers.tree_get(params, keys))
      node["kernel"] = adapt_core.merged_kernel(
        self.adapter.module(layer), trainable["adapter"][layer.path], layer, node["kernel"], context
      )
      parent = linen_layers.tree_get(params, keys[:-1]) if len(keys) > 1 else params
      parent[keys[-1]] = node
    return params


def find_layers(
  model: nn.Module,
  params,
  example_args: Sequence[Any],
  target_modules: str | Sequence[str],
  example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[LayerInfo, ...]:
  """The matched layers, in order of their first call (shape-only pass): nn.Dense / nn.DenseGeneral /
  nn.Einsum, and the projections of generic modules (`localmoe.projections`; keys as paths).

  A matched layer inside nn.scan / nn.vmap (its kernel in `params` stored [*stack, ...], more axes than the
  layer sees) has `LayerInfo.stack`; a stack axis that is not leading is an error naming the layer.
  """
  return linen_layers.discover(model, params, example_args, target_modules, example_kwargs)[0]


def inject(
  model: nn.Module,
  params,
  adapter,
  *example_args,
  target_modules: str | Sequence[str],
  key: jax.Array,
  trainable_extras: str | Sequence[str] | None = None,
  example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[AdaptedModel, dict]:
  """Freezes `params` and attaches `adapter` to every nn.Dense / nn.DenseGeneral matching `target_modules`.

  Args:
    model: any flax.linen model; its linear maps must be nn.Dense / nn.DenseGeneral (or subclasses).
    params: the pretrained `params` collection (frozen: `apply` stops their gradient).
    adapter: an `AdapterSet`, a spec dict for `localmoe.adapters.make` (wrapped in `PerLayer`), or a list of
      (pattern, spec) rules (per-layer specs; first full match wins).
    *example_args: inputs of the right shapes (e.g. jnp.zeros((1, 2))), used to discover the layers.
    target_modules: a regex that must match the whole path ("hidden_\\d+", ".*attn/(query|value)"), or a
      list of layer names matched as path suffixes (PEFT's list semantics).
    key: PRNG key for the adapter's initialisation.
    trainable_extras: a regex over module paths of `params` (e.g. "head" or "heads/task_\\d+"), or a list of
      module names matched as path suffixes (["head"], as target_modules), whose params stay trainable
      (PEFT's `modules_to_save`), counted separately from the adapters.
    example_kwargs: keyword inputs of the model for the discovery pass (e.g. {"attention_mask": ...}).

  Returns:
    (adapted, trainable): call `adapted.apply(params, trainable, *inputs, context=...)`; `trainable` is
    {"adapter": adapter params, "extras": the selected frozen params}; `adapted.paths` lists the layers.
  """
  check_key(key)
  adapter = adapter_set(adapter)
  layers, slots, problems = linen_layers.discover(model, params, example_args, target_modules, example_kwargs)
  if problems:
    raise projections.refusal(problems)
  stacked = [layer for layer in layers if layer.stack]
  if stacked and not isinstance(adapter, PerLayer):
    raise ValueError(
      f"layer(s) {[l.path for l in stacked[:3]]} are layers of a scan / vmap stack (kernel "
      f"[{', '.join(map(str, stacked[0].stack))}, ...]) and {type(adapter).__name__} carries a state from layer to layer, which cannot be sliced "
      "with the stack: use a per-layer method (lora, dora, localized_lora, blockwise_moe, "
      "cellwise_moe, ...), or unroll the stack (a Python loop over layers)."
    )
  matches = path_matcher(target_modules)
  reached = {l.path for l in layers} | {slot.module_path for slot in slots}
  unreached = [
    p
    for p, leaf in params_lib.leaf_paths(params)
    if p.endswith("/kernel")
    and np.ndim(leaf) >= 2
    and matches(p[: -len("/kernel")])
    and p[: -len("/kernel")] not in reached
  ]
  if unreached:
    raise ValueError(
      f"layer(s) {[p[: -len('/kernel')] for p in unreached[:3]]} match target_modules="
      f"{target_modules!r} (their params hold a kernel) but no traced call of the model reached "
      "them: pass example inputs (and example_kwargs) that reach them, remove an nn.jit on a "
      "submodule's method (its cached trace skips the adapters; jit the adapted step instead), "
      "or narrow target_modules."
    )
  if not layers:
    raise adapt_core.no_match_error(
      target_modules,
      "nn.Dense / nn.DenseGeneral / nn.Einsum / projection",
      model,
      "localmoe.inject.dense_paths(model, params, *inputs)",
    )
  again = {layer.path for layer in find_layers(model, params, example_args, target_modules, example_kwargs)}
  skipped = [layer.path for layer in layers if layer.path not in again]
  if skipped:
    raise ValueError(
      f"layer(s) {skipped[:3]} matched target_modules in the first traced call but a second "
      "call did not reach them: a transform caches their trace without the adapters (an nn.jit "
      "on a submodule's method), so their adapters would never run; remove that nn.jit (jit the "
      "adapted step instead) or leave them out of target_modules."
    )
  extra_paths: tuple[str, ...] = ()
  if trainable_extras is not None:
    extra_paths = adapt_core.select_extras(
      trainable_extras, linen_layers.module_paths(params), [l.path for l in layers]
    )
    trainable_extras = trainable_extras if isinstance(trainable_extras, str) else tuple(trainable_extras)
  target = target_modules if isinstance(target_modules, str) else tuple(target_modules)
  adapted = AdaptedModel(
    model=model,
    adapter=adapter,
    layers=layers,
    example_args=tuple(example_args),
    target_modules=target,
    trainable_extras=trainable_extras,
    extra_paths=extra_paths,
    slots=slots,
  )
  trainable = adapted.init_adapter(key, params)
  leaves = tuple(
    (f"extras/{path}", tuple(np.shape(leaf)), jnp.dtype(leaf.dtype).name)
    for path, leaf in params_lib.leaf_paths(trainable["extras"])
  )
  return dataclasses.replace(adapted, extra_leaves=leaves), trainable


def dense_paths(model: nn.Module, params, *example_args) -> list[str]:
  """Every nn.Dense / nn.DenseGeneral / nn.Einsum path and generic projection key of `model` (`localmoe.
  projections`), in call order (to write a target_modules pattern)."""
  return [layer.path for layer in find_layers(model, params, example_args, ".*")]
