"""The NNX adapted layer: a matched layer with its adapter(s), y = base(x) + Delta(x) (Eq. 9), and its state.

`localmoe.nnx_inject` finds the layers, wraps each in an `AdaptedLayer` and owns the model-level API (inject,
routing_context, merge, adapter files); this module holds what one wrapped layer is: the parameter and
routing-state variable types (`AdapterParam`, `RoutingContext`, `RoutingRngs`), the NNX `Adapter` around a
linen adapter definition, the layer's call (built-in linear layers and generic projection modules,
`localmoe.projections`), and the geometry of a built-in layer (`geometry`, `kernel_stack`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import threading
from typing import Any, Mapping, Sequence

import flax.errors
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from localmoe import adapt_core
from localmoe import adapters as adapters_lib
from localmoe import einsum_layers
from localmoe import projections

NNX_LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


class AdapterParam(nnx.LoRAParam):
  """A localmoe adapter parameter (A, B, routers, DoRA's magnitude): `wrt=AdapterParam` trains them."""


class ExtraParam(AdapterParam):
  """A frozen-model parameter kept trainable by `trainable_extras` (a task head); trained with the adapters."""


class RoutingContext(nnx.Variable):
  """The per-example routing context of the current forward pass (labels [batch] or [batch, D]).

  Shape (0,) means "no context": set by `routing_context`, never trained.
  """


class RoutingRngs(nnx.Variable):
  """The adapters' training-time rng keys of the current forward pass, {stream: key} ({}: deterministic).

  Set by `routing_context(model, c, rngs={"gumbel": key, "dropout": key})`, never trained.
  """


class RouterTraceState(nnx.Variable):
  """The router logits and gates of the current forward pass, ((logits, gates), ...) per call of the layer.

  Kept as model state, not in a Python list, so that traces made inside nnx.remat (or another lifted transform)
  leave it as that transform's state output; `routing_context` reads them after the call and resets them.
  """


class TraceSink(collections.abc.Sequence):
  """The RouterTraces `routing_context` yields, in call order, read from each layer's `RouterTraceState`.

  Reads like a list. A trace is written to its layer's state (so that it leaves nnx.remat); where that state
  cannot be written (a raw `jax.lax` loop body around the call, whose trace level is not the model's), the
  trace is kept here as it is, as a Python list would.
  """

  def __init__(self, layers: Mapping[str, "AdaptedLayer"]):
    self._layers = dict(layers)
    self._entries: list[tuple[str, int, Any]] = []  # (layer path, index in its state or -1, the trace)

  def record(self, layer: "AdaptedLayer", trace) -> None:
    stored = layer.traces.get_value()
    try:
      layer.traces.set_value(stored + ((trace.logits, trace.gates),))
    except flax.errors.TraceContextError:  # kept as it is: valid at this trace level only
      self._entries.append((layer.path, -1, trace))
      return
    self._entries.append((layer.path, len(stored), dataclasses.replace(trace, logits=None, gates=None)))

  def _resolved(self, entry):
    path, index, trace = entry
    if index < 0 or trace.logits is not None:
      return trace
    logits, gates = self._layers[path].traces.get_value()[index]
    return dataclasses.replace(trace, logits=logits, gates=gates)

  def settle(self) -> None:
    """Reads every trace from the layers' state now, before it is reset (a call that raised midway may have
    left the state of some calls unwritten: those are dropped)."""
    stored = {path: len(layer.traces.get_value()) for path, layer in self._layers.items()}
    self._entries = [(p, i, self._resolved((p, i, t))) for p, i, t in self._entries if i < 0 or i < stored.get(p, 0)]

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self._resolved(e) for e in self._entries[index]]
    return self._resolved(self._entries[index])

  def __eq__(self, other) -> bool:  # compares as the list of its traces
    return list(self) == list(other) if isinstance(other, (list, tuple, TraceSink)) else NotImplemented

  __hash__ = None

  def __repr__(self) -> str:
    return repr(list(self))


def no_context(stack: tuple[int, ...] = ()) -> jnp.ndarray:
  return jnp.zeros(tuple(stack) + (0,), jnp.int32)


def variable_values(tree):
  """A tree of nnx Variables -> the same tree of arrays."""
  return jax.tree_util.tree_map(lambda v: v.get_value(), tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


# ------------------------------------------------------------------------------------------- NNX adapters


class Adapter(nnx.Module):
  """A localmoe adapter as an NNX module: the linen definition (`definition`, static) and its params.

  Adapter(spec or linen adapter, d_in=, d_out=, rngs=nnx.Rngs(0)) holds the same parameters as the linen
  module's `init` (as `AdapterParam`s, nested as in linen: A, B, router/kernel, ...) and computes the same
  Delta(x) [..., d_out] from x [..., d_in] (Eq. 1, 4, 6, 8), with the same parameter count (`num_params`).
  DoRA also needs the frozen kernel W0 [d_in, d_out] (`kernel=`), at construction and at every call.
  """

  def __init__(
    self,
    adapter: Mapping[str, Any] | nn.Module,
    d_in: int | None = None,
    d_out: int | None = None,
    *,
    rngs: nnx.Rngs | None = None,
    kernel: jnp.ndarray | None = None,
    params: Any = None,
  ):
    if isinstance(adapter, nn.Module):
      definition = adapter
    else:
      sizes = {k: v for k, v in (("d_in", d_in), ("d_out", d_out)) if v is not None}
      definition = adapters_lib.make(adapter, **sizes)
    if params is None:
      if rngs is None:
        raise ValueError("Adapter needs rngs=nnx.Rngs(<seed>) to initialise its parameters (or params=).")
      info = adapt_core.LayerInfo("adapter", definition.d_in, definition.d_out)
      params = adapt_core.PerLayer(lambda layer: definition).init(rngs.params(), [info], [kernel])["adapter"]
    self.definition = definition  # the linen module: static and hashable
    self.params = nnx.data(jax.tree_util.tree_map(AdapterParam, params))

  def linen_params(self) -> dict:
    """The params as the linen module's `params` collection (arrays)."""
    return variable_values(self.params)

  def __call__(self, x: jnp.ndarray, context=None, gates=None, kernel: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [..., d_in] -> Delta(x) [..., d_out]; context [..., D] or labels [...] for context routers."""
    extra = {"kernel": kernel} if getattr(self.definition, "uses_base_kernel", False) else {}
    return self.definition.apply({"params": self.linen_params()}, x, context=context, gates=gates, **extra)

  def delta_weight(self, context=None, gates=None, kernel: jnp.ndarray | None = None) -> jnp.ndarray:
    """Dense Delta W [d_out, d_in] for one fixed routing (a single context or fixed gates; Eq. 9)."""
    if hasattr(type(self.definition), "delta_weight"):
      return adapters_lib.delta_weight(self.definition, {"params": self.linen_params()}, context, gates)
    info = adapt_core.LayerInfo("adapter", self.definition.d_in, self.definition.d_out)
    return adapt_core.delta_2d(self.definition, self.linen_params(), info, kernel, context).T  # DoRA

  def num_params(self) -> int:
    return int(self.definition.num_params())


# ------------------------------------------------------------------------------------------- adapted layers


@dataclasses.dataclass(frozen=True)
class Injection:
  """What `inject` was asked (static, hashable): for adapter files and error messages."""

  rules: str | None  # PerLayer.to_json() as JSON; None for a callable build
  target_modules: str | tuple[str, ...]
  trainable_extras: str | tuple[str, ...] | None


STATE = threading.local()  # .probe: {path: LayerInfo} or None; .captures: [TraceSink or None]
# .slots: {key: Slot}, .problems: [str], .called: {paths} (probe)


def discovery() -> dict | None:
  return getattr(STATE, "probe", None)


def trace_sinks() -> list:
  if not hasattr(STATE, "captures"):
    STATE.captures = []
  return STATE.captures


class AdaptedLayer(nnx.Module):
  """A matched layer with its adapter: y = base(x) + Delta(x) (Eq. 9), Delta from the flattened x [..., d_in].

  A generic module (`localmoe.projections`: not a Flax class, own params with ndim >= 2) is wrapped the same
  way with one adapter per projection (`slots`): its call runs inside the interception of its weights'
  contractions, and attribute reads the model makes (`.shape`, `.einsum_str`, ...) pass through to `.base`.
  """

  def __init__(
    self,
    base: nnx.Module,
    path: str,
    injection: Injection,
    wanted: tuple[str, ...] = (),
    stack: tuple[int, ...] | None = (),
  ):
    """stack: the leading layer axes of a layer of an nnx.vmap / nnx.scan stack (its kernel [*stack, ...]),
    () for a plain layer, None for the discovery pass (no routing state: nothing to slice)."""
    self.base = base  # the original nnx.Linear / LinearGeneral / Einsum (frozen)
    self.path = path  # "/"-joined module path, e.g. "attn/query"
    self.injection = injection
    self.layer: adapt_core.LayerInfo | None = None  # geometry seen in the discovery pass
    self.index = -1  # call order among the adapted layers
    self.adapter = nnx.data(None)  # an `Adapter`; None until discovered
    self.stack = tuple(stack or ())
    if stack is not None:  # routing state, stacked like the kernel for a stack's transform
      self.context = RoutingContext(no_context(self.stack))
      self.rngs = RoutingRngs({})
      self.traces = RouterTraceState(())
    if self.stack:  # each layer's number in the stack, sliced with it
      self.slice = RoutingContext(jnp.arange(math.prod(self.stack), dtype=jnp.int32).reshape(self.stack))
    self.generic = bool(wanted)  # a generic module: its matched weights' names are `wanted`
    if wanted:
      self.wanted = tuple(wanted)
      self.slots: tuple[projections.Slot, ...] = ()  # one per adapted projection, in call order
      self.infos: tuple[adapt_core.LayerInfo, ...] = ()
      self.indices: tuple[int, ...] = ()
      self.adapters = nnx.List([])

  def __getattr__(self, name: str):
    """Reads the host model makes of its own layer (`attn_vec_einsum.shape[1]`) pass through to `.base`."""
    base = vars(self).get("base")
    if name.startswith("_") or base is None:
      raise AttributeError(name)
    return getattr(base, name)

  def entries(self) -> list[tuple[int, adapt_core.LayerInfo, Adapter, projections.Slot | None]]:
    """(call index, geometry, adapter, generic slot or None) of every adapted projection of this layer."""
    if self.generic:
      return list(zip(self.indices, self.infos, self.adapters, self.slots))
    if self.adapter is None or self.layer is None:
      return []
    return [(self.index, self.layer, self.adapter, None)]

  def __call__(self, *args, **kwargs):
    if self.generic:
      return self._generic_call(args, kwargs)
    with projections.frame(projections.Frame(owner=self.base)):  # the layer's ops are its own
      return self._linear_call(*args, **kwargs)

  def _unsliced(self) -> int:
    """How many of the stack's axes the transform around this call left unsliced (0: one layer's call)."""
    return int(self.slice.get_value().ndim) if self.stack else 0

  def _slice_index(self):
    """This call's layer number in its stack (for the rngs), or None (a plain layer, or an unsliced call)."""
    return self.slice.get_value() if self.stack and self._unsliced() == 0 else None

  def _rngs(self) -> dict | None:
    rngs = dict(self.rngs.get_value())
    if self._unsliced():  # state the transform broadcast: the same for every layer
      rngs = {name: key[(0,) * self._unsliced()] for name, key in rngs.items()}
    return rngs or None

  def _capture(self, definitions):
    """Where this call's router traces go (None: not collected); a stack's routed layer refuses them."""
    captures = trace_sinks()
    capture = captures[-1] if captures else None
    routed = [d for d in definitions if adapt_core.routes_on_context(d) or adapt_core.routes_on_activation(d)]
    if capture is not None and self.stack and routed:
      raise ValueError(
        f"layer {self.path!r} is a layer of an nnx.vmap / nnx.scan stack {self.stack} with a routed "
        f"adapter ({type(routed[0]).__name__}): its router traces are values inside that transform "
        "and cannot be collected outside it; call the model inside `routing_context(model, c, "
        "capture=False)` (or nnx_inject.call(..., capture_routing=False)), or build the stack as an "
        "nnx.List of layers to collect them."
      )
    return None if capture is None else functools.partial(capture.record, self)

  def _context(self, definitions) -> Any:
    context = self.context.get_value()
    if self._unsliced():  # state the transform broadcast: the same for every layer
      context = context[(0,) * self._unsliced()]
    context = None if context.shape == (0,) else context
    for definition in definitions:
      if adapt_core.routes_on_context(definition) and context is None:
        raise ValueError(
          f"layer {self.path!r} has a context-routed adapter ({type(definition).__name__}, "
          "router_input='context') but the model was called without a context: call it inside "
          "`with localmoe.nnx_inject.routing_context(model, <labels [batch] or one-hot/embedding "
          "[batch, context_dim]>):` (or nnx_inject.call(model, ..., context=...))."
        )
    return context

  def _generic_call(self, args, kwargs):
    base = self.base
    foreign = [
      v.get_value()
      for p, m in nnx.iter_modules(base)
      if p  # the submodules' arrays
      for v in vars(m).values()
      if isinstance(v, nnx.Variable)
    ]
    probe = discovery()
    if probe is not None:  # discovery pass: record the projections, add nothing
      matches = adapt_core.path_matcher(self.injection.target_modules)
      weights = {name: getattr(base, name).get_value() for name in self.wanted}

      def on_hit(frame, hit):
        try:
          pairs = projections.layers_of(hit, self.path, matches)
        except ValueError as error:
          STATE.problems.append(str(error))
          return
        for slot, info in pairs:
          if slot.key not in probe:
            probe[slot.key], STATE.slots[slot.key] = info, slot

      frame = projections.Frame(self.path, weights, owner=base, foreign=foreign, on_hit=on_hit)
      with projections.frame(frame):
        y = base(*args, **kwargs)
      STATE.called.add(self.path)
      for name, value in weights.items():
        if name not in frame.hits:
          STATE.problems.append(
            projections.problem(self.path, name, value.shape, frame.problems.get(name), name in frame.slices)
          )
      return y
    if not self.slots:
      raise ValueError(
        f"layer {self.path!r} matches target_modules but was not called when the model was "
        "injected (other input shapes or control flow?): re-run inject with inputs that reach it."
      )
    context = self._context(a.definition for a in self.adapters)
    capture = self._capture([a.definition for a in self.adapters])
    rngs, slice_index = self._rngs(), self._slice_index()
    sessions = {
      info.path: adapt_core.LayerSession(
        {info.path: adapter.definition},
        {info.path: adapter.linen_params()},
        [info],
        context,
        capture,
        rngs=rngs,
        offset=index,
      )
      for index, info, adapter, _ in self.entries()
    }
    infos = {info.path: info for info in self.infos}

    def handler(hit, x, w, y):
      chosen = [slot for slot in self.slots if slot.param == hit.param]
      return projections.delta(
        chosen,
        [infos[s.key] for s in chosen],
        hit,
        x,
        w,
        y,
        lambda key, flat, kernel: sessions[key](0, flat, kernel, slice_index=slice_index),
      )

    weights = {slot.param: getattr(base, slot.param).get_value() for slot in self.slots}
    frame = projections.Frame(self.path, weights, handler, owner=base, foreign=foreign)
    with projections.intercepting(), projections.frame(frame):
      y = base(*args, **kwargs)
    missed = [slot.key for slot in self.slots if slot.param not in frame.hits]
    if missed:
      raise ValueError(
        f"layer(s) {missed[:3]} are adapted but this call of {self.path!r} intercepted no "
        "contraction of their weight, so their adapters did not run (another code path, or an op "
        "localmoe.projections does not intercept): call the model as in inject."
      )
    return y

  def _linear_call(self, x, *args, **kwargs):
    y = self.base(x, *args, **kwargs)
    probe = discovery()
    if probe is not None:  # discovery pass: record the geometry, add nothing
      if self.path not in probe:
        probe[self.path] = geometry(self.base, self.path, x, args, kwargs)
      return y
    if self.adapter is None or self.layer is None:
      raise ValueError(
        f"layer {self.path!r} matches target_modules but was not called when the model was "
        "injected (other input shapes or control flow?): re-run inject with inputs that reach it."
      )
    layer, definition = self.layer, self.adapter.definition
    context = self._context([definition])
    capture = self._capture([definition])
    session = adapt_core.LayerSession(
      {layer.path: definition},
      {layer.path: self.adapter.linen_params()},
      [layer],
      context,
      capture,
      rngs=self._rngs(),
      offset=self.index,
    )
    flat = adapt_core.flatten_input(x, layer)  # [..., d_in]
    kernel = adapt_core.kernel_2d(self.base.kernel.get_value(), layer)  # [d_in, d_out]
    with projections.quiet():
      delta = session(0, flat, kernel, slice_index=self._slice_index())  # [..., d_out]
    delta = adapt_core.output_delta(delta, layer, x.ndim, y.shape)  # y's layout
    return y + delta.astype(y.dtype)


def path_str(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def expected_kernel_shape(module) -> tuple[int, ...]:
  if isinstance(module, nnx.Linear):
    return (int(module.in_features), int(module.out_features))
  if isinstance(module, nnx.LinearGeneral):
    return (*module.batch_axis.values(), *module.in_features, *module.out_features)
  return tuple(int(s) for s in module.kernel_shape)


STACK_TRANSFORM = "part of a stacked layer (nnx.vmap / nnx.scan over layers)"
STACK_FIX = "stack the layers on the leading axis (nnx.vmap with out_axes=0)"


def kernel_stack(module, path: str) -> tuple[int, ...]:
  """The leading layer axes of a layer of an nnx.vmap / nnx.scan stack (its kernel [*stack, ...]), () for a
  plain layer; a stack axis that does not lead and a LinearGeneral with batch axes are refused by name."""
  if isinstance(module, nnx.LinearGeneral) and module.batch_axis:
    raise ValueError(
      f"layer {path!r} is an nnx.LinearGeneral with batch_axis={dict(module.batch_axis)}: its "
      "kernel differs per batch index, so one adapter cannot stand for it; leave it out of "
      "target_modules."
    )
  return adapt_core.stack_of(path, module.kernel.shape, expected_kernel_shape(module), STACK_TRANSFORM, STACK_FIX)


def geometry(module, path: str, x, args, kwargs) -> adapt_core.LayerInfo:
  """The LayerInfo of one call of an NNX linear layer on input x."""
  if isinstance(module, nnx.Linear):
    in_shape, out_shape, axis, kind, equation = (int(x.shape[-1]),), (int(module.out_features),), (-1,), "Linear", ""
  elif isinstance(module, nnx.LinearGeneral):
    axis = tuple(int(a) - x.ndim if int(a) >= 0 else int(a) for a in module.axis)  # negative, kernel order
    in_shape, out_shape = tuple(int(x.shape[a]) for a in axis), tuple(int(f) for f in module.out_features)
    kind, equation = "LinearGeneral", ""
  else:
    given = args[0] if args else kwargs.get("einsum_str")
    equation = (given or module.einsum_str).replace(" ", "")
    in_shape, out_shape = einsum_layers.widths(einsum_layers.parse(equation, x.ndim, path), module.kernel_shape)
    axis, kind = (), "Einsum"
  return adapt_core.LayerInfo.of_shapes(path, kind, in_shape, out_shape, axis, equation)
