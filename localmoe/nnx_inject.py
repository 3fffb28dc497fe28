"""Adapting a Flax NNX model: localmoe adapters on its nnx.Linear / nnx.LinearGeneral / nnx.Einsum layers.

The NNX sibling of `localmoe.inject` (same target_modules, adapter specs, context, router losses, merge and
adapter files). The model's code is not edited: every matched layer is replaced, in place, by an
`AdaptedLayer` that holds the original layer (`.base`, as `nnx.LoRA` holds `base_module`) and an NNX
`Adapter` (both in `localmoe.nnx_layer`, with the routing-state variables), and adds the adapter's update to
the layer's output,

  y = layer(x) + Delta(x)        (LoRA Eq. 1, Localized LoRA Eq. 4, LoRA-MoE Eq. 6/8, DoRA, MELoRA, ...)

so `nnx.MultiHeadAttention` (query/key/value/out are nnx.LinearGeneral) and Gemma-style einsum projections
take the same grid adapters as linen's Dense layers: LinearGeneral and Einsum are seen through their
flattened widths (d_in = prod(contracted axes), d_out = prod(features); `localmoe.einsum_layers`).

  model = nnx_inject.inject(model, {"method": "cellwise_moe", "k_y": 4, "k_x": 4, "rank": 2, "num_experts": 4,
                                    "router_input": "context", "context_dim": 3},
                            x_example, target_modules=r"attn/(query|key|value|out)", key=key,
                            trainable_extras="head")
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx_inject.AdapterParam)   # adapters + extras only
  with nnx_inject.routing_context(model, task_ids) as routing:    # the context of this forward pass
    y = model(x)                                                 # the model's own __call__, unchanged
  aux = inject.router_losses(routing, load_balance=0.01)         # RouterTrace records, as for linen
  plain = nnx_inject.merge(model, context=1)                     # a plain NNX model for task 1 (Eq. 9)

Parameters. Adapter parameters are `AdapterParam`, a subclass of `nnx.LoRAParam` (so of `nnx.Param`): an
`nnx.Optimizer(model, tx, wrt=AdapterParam)` or `nnx.grad(..., argnums=nnx.DiffState(0, AdapterParam))` trains
exactly what `inject` made trainable, and the frozen weights (plain `nnx.Param`) get no gradient. Params
selected by `trainable_extras` (PEFT's `modules_to_save`, a regex over module paths) become `ExtraParam`, a
subclass of `AdapterParam`, so the same filter trains them; `nnx.All(AdapterParam, nnx.Not(ExtraParam))`
selects the adapters alone. Adapters keep float32 params and compute in the input's dtype, as in linen.

Context. `routing_context(model, c)` stores the per-example context (labels [batch], or one-hot / embedding
[batch, D]) in a `RoutingContext` variable of every adapted layer for the calls made inside the block, and
yields the list that collects the layers' `RouterTrace`s (call order). Because the context is model state,
a model passed into `nnx.jit` / `nnx.grad` carries it across the transform (a new context retraces nothing
and is never baked in as a constant). Enter the block where the model is called (inside the jitted function
when the losses need the traces). A context-routed layer called outside such a block is one error naming it.

Projection modules of the model's own class (tunix's `Einsum` with a param `w`, MaxText's `DenseGeneral` on
`lax.dot_general`): a module that is not a Flax class and holds params with ndim >= 2 directly is wrapped by
an `AdaptedLayer` too, which runs it inside the interception of its weights' contractions and passes the
model's attribute reads (`.shape`, `.einsum_str`) through to it (`localmoe.projections`: keys, STACKED
q/k/v slices, stacked MoE experts refused by name).

Stacks. A layer of an `nnx.vmap`-built stack run by `nnx.scan` / `nnx.vmap` (its kernel [L, ...],
`LayerInfo.stack` = (L,)) gets one adapter per layer: the `AdaptedLayer`'s adapter params are stacked
[L, ...] and its routing state (`RoutingContext`, `RoutingRngs`) is copied per layer, so the transform that
slices the stacked module's state hands each layer its adapter with its kernel, and the context reaches
every layer. Router traces cannot leave the transform: a routed layer of a stack is called inside
`routing_context(model, c, capture=False)` (collecting is an error naming the layer). `merge` gives the
stacked kernel [L, ...] with each layer's Delta W; a kernel whose layer axis does not lead is refused by name.
The model-wide Queryable LoRA (a state carried from layer to layer) is linen-only.

Router traces: each adapted layer keeps its call's logits and gates as model state (`RouterTraceState`), so that
traces made inside `nnx.remat` leave the transform; `routing_context` yields them in call order and resets them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any, Iterator, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from localmoe import adapt_core
from localmoe import inject as inject_lib
from localmoe import params as params_lib
from localmoe import nnx_layer
from localmoe import projections

# The layer-level names, re-exported: `nnx_inject.AdapterParam`, `nnx_inject.AdaptedLayer`, ...
from localmoe.nnx_layer import (  # noqa: F401
  NNX_LINEAR_TYPES,
  AdaptedLayer,
  Adapter,
  AdapterParam,
  ExtraParam,
  RouterTraceState,
  RoutingContext,
  RoutingRngs,
)


def _adapted(model: nnx.Module) -> list[tuple[tuple, AdaptedLayer]]:
  """(path, AdaptedLayer) of every adapted layer, in call order (unseen ones last)."""
  found = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, AdaptedLayer)]
  return sorted(found, key=lambda item: (item[1].index < 0, item[1].index))


def entries(model: nnx.Module) -> list[tuple[int, adapt_core.LayerInfo, Adapter, Any, AdaptedLayer]]:
  """(call index, geometry, adapter, generic slot or None, wrapper) of every adapted projection, call order."""
  out = [(*entry, wrapper) for _, wrapper in _adapted(model) for entry in wrapper.entries()]
  return sorted(out, key=lambda item: item[0])


def _own_weights(module: nnx.Module) -> dict[str, Any]:
  """The frozen nnx.Params (ndim >= 2) a module holds directly, by attribute name."""
  return {
    k: v.get_value()
    for k, v in vars(module).items()
    if isinstance(v, nnx.Param) and not isinstance(v, AdapterParam) and getattr(v.get_value(), "ndim", 0) >= 2
  }


def _generic_wanted(module: nnx.Module, path: str, matches) -> tuple[str, ...]:
  """The matched weights of a generic module (`localmoe.projections`), else ()."""
  if isinstance(module, (AdaptedLayer, Adapter, *NNX_LINEAR_TYPES)) or projections.is_builtin(module):
    return ()
  if not callable(getattr(type(module), "__call__", None)):
    return ()
  return tuple(projections.wanted(path, _own_weights(module), matches))


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  if not path:
    raise ValueError(
      "the root module itself matches target_modules: adapt a model that holds the layer as "
      "a submodule (e.g. a wrapper with the layer as an attribute)."
    )
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) or not hasattr(parent, str(key)) else getattr(parent, key)
  key = path[-1]
  if isinstance(key, int) or not hasattr(parent, str(key)):
    parent[key] = new
  else:
    setattr(parent, key, new)


def _candidates(model: nnx.Module, target_modules) -> list[tuple[tuple, nnx.Module, tuple[str, ...]]]:
  """Matched NNX linear layers and generic modules (not already adapted), stacks refused: (path, module,
  the generic module's matched weight names or ()), deepest first (a nested candidate is wrapped first)."""
  matches = adapt_core.path_matcher(target_modules)
  modules = list(nnx.iter_modules(model))
  inside = [path for path, module in modules if isinstance(module, AdaptedLayer)]
  found = []
  for path, module in modules:
    adapted = isinstance(module, AdaptedLayer)
    name = nnx_layer.path_str(path)
    wanted = () if adapted or isinstance(module, NNX_LINEAR_TYPES) else _generic_wanted(module, name, matches)
    if adapted:
      hit = matches(name) or (module.generic and _generic_wanted(module.base, name, matches))
    else:
      hit = (isinstance(module, NNX_LINEAR_TYPES) and matches(name)) or bool(wanted)
    if not hit:
      continue
    if adapted or any(path[: len(p)] == p for p in inside):
      raise ValueError(
        f"layer {nnx_layer.path_str(path if adapted else path[:-1])!r} is already adapted: inject a model "
        "once (merge it first to adapt the merged model again)."
      )
    if not wanted:
      nnx_layer.kernel_stack(module, name)
    found.append((path, module, wanted))
  return sorted(found, key=lambda item: -len(item[0]))


def _wrap_all(
  model: nnx.Module, candidates, injection: nnx_layer.Injection, stacks: Mapping[str, tuple[int, ...]] | None = None
) -> list[AdaptedLayer]:
  """Wraps every candidate; stacks: {path: leading layer axes} of the stacked ones (None: discovery wrappers)."""
  wrappers = []
  for path, module, wanted in candidates:  # deepest first
    name = nnx_layer.path_str(path)
    wrapper = AdaptedLayer(module, name, injection, wanted, None if stacks is None else stacks.get(name, ()))
    _replace(model, path, wrapper)
    wrappers.append(wrapper)
  return wrappers


def find_layers(
  model: nnx.Module,
  example_args: Sequence[Any],
  target_modules: str | Sequence[str],
  example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[adapt_core.LayerInfo, ...]:
  """The matched layers, in order of their first call (a shape-only pass on a copy of the model):
  nnx.Linear / LinearGeneral / Einsum, and the projections of generic modules (`localmoe.projections`)."""
  return _discover(model, example_args, target_modules, example_kwargs)[0]


def _discover(
  model: nnx.Module,
  example_args: Sequence[Any],
  target_modules: str | Sequence[str],
  example_kwargs: Mapping[str, Any] | None = None,
):
  """(layers in call order, {key: Slot} of the generic ones, error texts of matched generic weights that
  cannot be adapted, paths of the generic modules called)."""
  copy = nnx.clone(model)
  target = target_modules if isinstance(target_modules, str) else tuple(target_modules)
  wrappers = _wrap_all(copy, _candidates(copy, target_modules), nnx_layer.Injection(None, target, None))
  graphdef, state = nnx.split(copy)
  nnx_layer.STATE.probe, nnx_layer.STATE.slots, nnx_layer.STATE.problems, nnx_layer.STATE.called = {}, {}, [], set()
  try:
    with projections.intercepting():
      jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*example_args, **(example_kwargs or {})), state)
    infos, slots = dict(nnx_layer.STATE.probe), dict(nnx_layer.STATE.slots)
    problems, called = list(nnx_layer.STATE.problems), set(nnx_layer.STATE.called)
  except (ValueError, TypeError) as error:
    generic = [w.path for w in wrappers if w.generic]
    if not generic or str(error).startswith("layer "):  # no generic layer, or localmoe's own words
      raise
    raise ValueError(
      f"the model's example call failed once its generic layer(s) {generic[:3]} were wrapped "
      f"({type(error).__name__}: {str(error)[:200]}): the wrapper must be called like the module it "
      "replaces; leave it out of target_modules."
    ) from error
  finally:
    nnx_layer.STATE.probe = None
  bases = {w.path: w.base for w in wrappers}
  for path, info in infos.items():  # a layer of a stack: its kernel's leading layer axes
    slot = slots.get(path)
    if slot is None:
      stack = nnx_layer.kernel_stack(bases[path], path)
    else:
      stored = getattr(bases[slot.module_path], slot.param).get_value().shape
      stack = adapt_core.stack_of(path, stored, slot.shape, nnx_layer.STACK_TRANSFORM, nnx_layer.STACK_FIX)
    infos[path] = dataclasses.replace(info, stack=stack)
  return tuple(infos.values()), slots, problems, called


def linear_paths(model: nnx.Module, *example_args) -> list[str]:
  """Every nnx.Linear / LinearGeneral / Einsum path and generic projection key of `model`, in call order (to
  write target_modules)."""
  return [layer.path for layer in find_layers(model, example_args, ".*")]


def _param_holders(model: nnx.Module) -> list[tuple[str, nnx.Module, list[str]]]:
  """(module path, module, names of its own nnx.Param attributes) for modules outside the adapted layers."""
  out = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, (AdaptedLayer, Adapter)):
      continue
    names = [k for k, v in vars(module).items() if isinstance(v, nnx.Param) and not isinstance(v, AdapterParam)]
    if names:
      out.append((nnx_layer.path_str(path), module, names))
  return out


def _retype(module: nnx.Module, name: str, cls) -> None:
  var = getattr(module, name)
  setattr(module, name, cls.from_metadata(var.get_value(), var.get_metadata()))


def inject(
  model: nnx.Module,
  adapter,
  *example_args,
  target_modules: str | Sequence[str],
  key: jax.Array,
  trainable_extras: str | Sequence[str] | None = None,
  example_kwargs: Mapping[str, Any] | None = None,
) -> nnx.Module:
  """Attaches `adapter` to every nnx.Linear / LinearGeneral / Einsum matching `target_modules`, in place.

  Args:
    model: any nnx.Module; its matched layers are replaced by `AdaptedLayer`s (the original at `.base`).
    adapter: a spec dict for `localmoe.adapters.make`, a list of (pattern, spec) rules (first full match wins),
      or an `inject.PerLayer`; the same as for `localmoe.inject.inject`.
    *example_args: inputs of the right shapes, for one shape-only pass that finds the layers' geometry.
    target_modules: a regex over the whole "/"-joined module path, or a list of names matched as path
      suffixes (PEFT's semantics, `inject.path_matcher`); NNX paths are attribute names and list indices
      ("attn/query", "blocks/0/ffn").
    key: PRNG key of the adapters' initialisation (the same key and layer order as linen's inject give the
      same adapter params).
    trainable_extras: a regex over module paths (or a list of module names, as target_modules) whose own
      params become `ExtraParam` (trainable).
    example_kwargs: keyword inputs of the model for the discovery pass.

  Returns: the same `model`, adapted. Its adapter params are `AdapterParam`s.
  """
  adapter = adapt_core.adapter_set(adapter)
  if not isinstance(adapter, adapt_core.PerLayer):
    raise ValueError(
      f"{type(adapter).__name__} carries a state from layer to layer within one forward pass, "
      "which nnx_inject does not thread through an NNX model: use a per-layer method (lora, dora, "
      "melora, localized_lora, blockwise_moe, cellwise_moe, per_task_lora), or localmoe.inject on "
      "a linen model."
    )
  adapt_core.check_key(key)
  candidates = _candidates(model, target_modules)
  earlier = [w.path for _, w in _adapted(model)]
  if earlier:
    raise ValueError(
      f"{type(model).__name__} already holds adapters on {earlier[:3]} (an earlier inject): a "
      "second inject into other layers is not supported; inject every layer in one call "
      "(one target_modules regex, per-layer specs as (pattern, spec) rules), or merge first "
      "(nnx_inject.merge(model)) and inject the merged model."
    )
  if not candidates:
    raise adapt_core.no_match_error(
      target_modules,
      "nnx.Linear / nnx.LinearGeneral / nnx.Einsum / projection",
      model,
      "localmoe.nnx_inject.linear_paths(model, *inputs)",
    )
  layers, slots, problems, called = _discover(model, example_args, target_modules, example_kwargs)
  if problems:
    raise projections.refusal(problems)
  extras = []
  if trainable_extras is not None:
    holders = _param_holders(model)
    selected = adapt_core.select_extras(
      trainable_extras, [p for p, _, _ in holders], [nnx_layer.path_str(path) for path, _, _ in candidates]
    )
    extras = [(p, m, names) for p, m, names in holders if p in selected]
    trainable_extras = trainable_extras if isinstance(trainable_extras, str) else tuple(trainable_extras)
  by_path = {layer.path: (i, layer) for i, layer in enumerate(layers)}
  unreached = [
    nnx_layer.path_str(path)
    for path, _, wanted in candidates
    if nnx_layer.path_str(path) not in (called if wanted else by_path)
  ]
  if unreached:
    raise ValueError(
      f"layer(s) {unreached[:3]} match target_modules={target_modules!r} but the example call "
      "never reached them, so their input shapes are unknown: pass example inputs (and "
      "example_kwargs) that reach them, or narrow target_modules."
    )
  modules = dict((nnx_layer.path_str(p), m) for p, m, _ in candidates)
  stacks: dict[str, tuple[int, ...]] = {}
  for layer in layers:  # a wrapper's stack: its layer's, or all its projections'
    owner = slots[layer.path].module_path if layer.path in slots else layer.path
    if stacks.setdefault(owner, layer.stack) != layer.stack:
      raise ValueError(
        f"layer {layer.path!r} is stacked {layer.stack} but another weight of {owner!r} is stacked "
        f"{stacks[owner]}: one module's adapters must share one stack; leave one out of "
        "target_modules."
      )
  kernels = []
  for layer in layers:  # [*stack, d_in, d_out] each
    slot, one = slots.get(layer.path), layer.unstacked()
    if slot is None:
      w = modules[layer.path].kernel.get_value()
      kernels.append(adapt_core.over_stack(lambda w: adapt_core.kernel_2d(w, one), layer.stack, w))
      continue
    w = getattr(modules[slot.module_path], slot.param).get_value()
    kernels.append(
      adapt_core.over_stack(
        lambda w, slot=slot, one=one: adapt_core.kernel_2d(w if slot.index < 0 else w[slot.index], one), layer.stack, w
      )
    )
  params = adapter.init(key, layers, kernels)
  try:
    rules = json.dumps(adapter.to_json())
  except ValueError:
    rules = None  # a callable build: usable, not savable
  target = target_modules if isinstance(target_modules, str) else tuple(target_modules)
  injection = nnx_layer.Injection(rules, target, trainable_extras)
  for wrapper in _wrap_all(model, candidates, injection, stacks):
    if wrapper.generic:
      mine = [(by_path[key][0], slot) for key, slot in slots.items() if slot.module_path == wrapper.path]
      mine.sort(key=lambda item: item[0])
      wrapper.slots = tuple(slot for _, slot in mine)
      wrapper.indices = tuple(i for i, _ in mine)
      wrapper.infos = tuple(by_path[slot.key][1] for slot in wrapper.slots)
      wrapper.index = min(wrapper.indices, default=-1)
      wrapper.adapters = nnx.List([Adapter(adapter.module(info), params=params[info.path]) for info in wrapper.infos])
    elif wrapper.path in by_path:
      wrapper.index, wrapper.layer = by_path[wrapper.path]
      wrapper.adapter = Adapter(adapter.module(wrapper.layer), params=params[wrapper.path])
  for _, module, names in extras:
    for name in names:
      _retype(module, name, ExtraParam)
  return model


# ------------------------------------------------------------------------------------------- using the model


@contextlib.contextmanager
def routing_context(model: nnx.Module, context=None, rngs=None, capture: bool = True) -> Iterator[list]:
  """Within the block, calls of `model` route on `context` (labels [batch], or one-hot/embedding [batch, D]).

  rngs: the adapters' training-time randomness for the calls in the block, {"gumbel": key, "dropout": key}
  (router_hard="gumbel"/"gumbel_soft", router_dropout), as linen's `adapted.apply(..., rngs=...)`: each
  adapted layer draws from fold_in(key, its call index), so linen and NNX draw the same noise. The keys are
  model state (`RoutingRngs`), so a jitted step takes a new key per step without retracing. None: no noise
  (evaluation routes deterministically).
  Yields the sequence (read like a list) of every routed layer's `inject.RouterTrace` (logits and gates, call
  order; kept as each layer's `RouterTraceState` while the block runs, so traces made inside nnx.remat leave it),
  for `inject.router_losses` and `inject.routing_diagnostics`. context=None only collects traces.
  capture=False: collect no traces (the list stays empty); needed for the routed layers of an nnx.vmap /
  nnx.scan stack, whose traces cannot leave the stack's transform (collecting them is an error naming the layer).
  """
  rngs = adapt_core.check_rngs(rngs) or {}
  wrappers = [w for _, w in _adapted(model)]
  before = [(w.context.get_value(), w.rngs.get_value()) for w in wrappers]
  value = nnx_layer.no_context() if context is None else jnp.asarray(context)
  for w in wrappers:  # a stack's wrapper: one copy per layer, sliced with it
    w.context.set_value(jnp.broadcast_to(value, w.stack + value.shape) if w.stack else value)
    w.rngs.set_value(
      {name: jnp.broadcast_to(key, w.stack + key.shape) for name, key in rngs.items()} if w.stack else dict(rngs)
    )
  traces = nnx_layer.TraceSink({w.path: w for w in wrappers})
  nnx_layer.trace_sinks().append(traces if capture else None)
  try:
    yield traces
  finally:
    nnx_layer.trace_sinks().pop()
    traces.settle()  # read from the layers' state before it is reset
    for w, (old, old_rngs) in zip(wrappers, before):
      w.context.set_value(old)
      w.rngs.set_value(old_rngs)
      w.traces.set_value(())


def call(model: nnx.Module, *args, context=None, capture_routing: bool = False, rngs=None, **kwargs):
  """model(*args, **kwargs) with a routing context, as linen's `adapted.apply(..., context=c, rngs=...)`.

  capture_routing: also return the RouterTraces, [RouterTrace] in call order.
  rngs: {"gumbel": key, "dropout": key} for the adapters (`routing_context`).
  """
  with routing_context(model, context, rngs, capture=capture_routing) as traces:
    y = model(*args, **kwargs)
  return (y, traces) if capture_routing else y


def layers(model: nnx.Module) -> tuple[adapt_core.LayerInfo, ...]:
  """The adapted layers' geometry, in call order."""
  return tuple(info for _, info, _, _, _ in entries(model))


def num_params(model: nnx.Module) -> int:
  """Trainable adapter parameters (without the trainable extras); equals linen's `adapted.num_params()`."""
  return sum(adapter.num_params() * math.prod(info.stack) for _, info, adapter, _, _ in entries(model))


def _extras(model: nnx.Module) -> dict[str, dict[str, Any]]:
  """{module path: {name: ExtraParam}} of the trainable extras."""
  out = {}
  for path, module in nnx.iter_modules(model):
    names = {k: v for k, v in vars(module).items() if isinstance(v, ExtraParam)}
    if names:
      out[nnx_layer.path_str(path)] = names
  return out


def num_extra_params(model: nnx.Module) -> int:
  return int(sum(v.get_value().size for names in _extras(model).values() for v in names.values()))


def trainable(model: nnx.Module) -> dict:
  """The trainable arrays in linen's layout, {"adapter": {layer path: params}, "extras": {nested params}}."""
  adapter = {info.path: a.linen_params() for _, info, a, _, _ in entries(model)}
  extras: dict = {}
  for path, names in _extras(model).items():
    node = extras
    for key in path.split("/"):
      node = node.setdefault(key, {})
    node.update({k: v.get_value() for k, v in names.items()})
  return {"adapter": adapter, "extras": extras}


def merge(model: nnx.Module, context=None) -> nnx.Module:
  """A plain copy of `model`: every adapted kernel + Delta W (Eq. 9), the adapters removed, extras as Params.

  Static adapters and DoRA merge as they are; context-routed ones at ONE fixed context (a label or a [D]
  vector): one merged model per context. Activation-routed adapters cannot be merged: the error names the
  layer. `model` itself is left unchanged.
  """
  merged = nnx.clone(model)
  for path, wrapper in sorted(_adapted(merged), key=lambda item: -len(item[0])):  # nested ones first
    if wrapper.generic:
      groups: dict[str, list] = {}
      for _, info, adapter, slot in wrapper.entries():
        groups.setdefault(slot.param, []).append((slot, info, adapter.definition, adapter.linen_params()))
      for param, parts in groups.items():
        weight = getattr(wrapper.base, param)
        weight.set_value(projections.merged_weight(weight.get_value(), parts, context, "nnx"))
    elif wrapper.adapter is not None:
      kernel = wrapper.base.kernel
      kernel.set_value(
        adapt_core.merged_kernel(
          wrapper.adapter.definition, wrapper.adapter.linen_params(), wrapper.layer, kernel.get_value(), context, "nnx"
        )
      )
    _replace(merged, path, wrapper.base)
  for path, module in list(nnx.iter_modules(merged)):
    for name in [k for k, v in vars(module).items() if isinstance(v, ExtraParam)]:
      _retype(module, name, nnx.Param)
  return merged


# ------------------------------------------------------------------------------------------- adapter files


def described(model: nnx.Module) -> inject_lib.AdaptedModel:
  """The adapted NNX model as `inject.AdaptedModel` metadata (no backbone): what `adapter_io` writes."""
  wrappers = [w for _, w in _adapted(model)]
  if not wrappers:
    raise ValueError(f"{type(model).__name__} has no adapted layer: run localmoe.nnx_inject.inject first.")
  injection = wrappers[0].injection
  if injection.rules is None:
    raise ValueError(
      "an adapter built by a callable cannot be saved: build it from a spec dict (or (pattern, "
      "spec) rules) so adapter_config.json can describe it."
    )
  rules = json.loads(injection.rules)
  adapter = adapt_core.adapter_set([tuple(r) for r in rules] if isinstance(rules, list) else rules)
  extras = trainable(model)["extras"]
  leaves = tuple(
    (f"extras/{path}", tuple(leaf.shape), jnp.dtype(leaf.dtype).name) for path, leaf in params_lib.leaf_paths(extras)
  )
  return inject_lib.AdaptedModel(
    model=None,
    adapter=adapter,
    layers=layers(model),
    example_args=(),
    target_modules=injection.target_modules,
    trainable_extras=injection.trainable_extras,
    extra_paths=tuple(_extras(model)),
    extra_leaves=leaves,
  )  # shapes/dtypes save_adapter checks


def save_adapter(directory: str, model: nnx.Module) -> None:
  """Writes the adapter of an adapted NNX model in `localmoe.adapter_io`'s format (loadable by linen, too)."""
  from localmoe import adapter_io  # pylint: disable=g-import-not-at-top

  adapter_io.save_adapter(directory, described(model), trainable(model))


def load_adapter(
  directory: str, model: nnx.Module, *example_args, example_kwargs: Mapping[str, Any] | None = None
) -> nnx.Module:
  """Injects the saved adapter (from a linen or an NNX model) into `model`, in place, with the saved arrays.

  As strict as `adapter_io.load_adapter`, and every check runs before the model is changed: the model's
  matched layers must equal the saved ones, path by path and shape by shape, and the file must hold exactly
  the adapter's tensors and trainable extras, each of the shape and dtype the model needs (a float16 or
  int32 tensor for float32 params is refused, not cast); otherwise a ValueError names the layer or tensor.
  """
  from localmoe import adapter_io  # pylint: disable=g-import-not-at-top

  config = adapter_io.read_config(directory)
  adapter, target = adapter_io.spec_and_target(config)
  found = {layer.path: layer for layer in find_layers(model, example_args, target, example_kwargs)}
  adapter_io.check_layers(config, found, target)
  weights_path, arrays = adapter_io.read_tensors(directory)
  trial = inject(
    nnx.clone(model),
    adapter,
    *example_args,
    target_modules=target,
    key=jax.random.PRNGKey(0),
    trainable_extras=config.get("trainable_extras"),
    example_kwargs=example_kwargs,
  )
  adapter_io.check_tensors(weights_path, arrays, dict(_trainable_variables(trial)), config.get("trainable_extras"))
  inject(
    model,
    adapter,
    *example_args,
    target_modules=target,
    key=jax.random.PRNGKey(0),
    trainable_extras=config.get("trainable_extras"),
    example_kwargs=example_kwargs,
  )
  for name, var in _trainable_variables(model):
    var.set_value(jnp.asarray(arrays[name]))
  return model


def _trainable_variables(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
  """("adapter/<layer>/<param path>" or "extras/<module>/<name>", variable) for every trainable array."""
  for _, info, adapter, _, _ in entries(model):
    for key_path, var in jax.tree_util.tree_flatten_with_path(
      adapter.params, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )[0]:
      yield "/".join(["adapter", info.path] + [str(k.key) for k in key_path]), var
  for path, names in _extras(model).items():
    for name, var in names.items():
      yield f"extras/{path}/{name}", var
