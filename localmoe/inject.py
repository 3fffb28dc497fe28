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
The NNX sibling of this module is `localmoe.nnx_inject`.

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

Matched layers are ordered by their first call in a forward pass; that order is `adapted.layers`. Layers
inside `nn.scan` or `nn.vmap` (stacked kernels) are refused with an error naming the layer; `nn.remat`
layers are adapted like any other (one adapter per layer).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from localmoe import adapters as adapters_lib
from localmoe import einsum_layers
from localmoe import params as params_lib
from localmoe import routing

LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One matched linear layer."""
  path: str                       # module path, "/"-joined, e.g. "hidden_3" or "encoder/layer_0/attention/self/query"
  d_in: int                       # flattened input width, prod(in_shape)
  d_out: int                      # flattened output width, prod(out_shape)
  kind: str = "Dense"             # "Dense", "DenseGeneral" or "Einsum" (NNX: "Linear", "LinearGeneral")
  in_shape: tuple[int, ...] = ()  # the contracted input axes' sizes, in kernel order (Dense: (d_in,))
  out_shape: tuple[int, ...] = () # the features (Dense: (d_out,))
  axis: tuple[int, ...] = (-1,)   # the contracted axes of the layer's input (negative, kernel order)
  equation: str = ""              # Einsum layers: the equation, e.g. "btd,dnh->btnh" (`localmoe.einsum_layers`)

  def to_json(self) -> dict:
    out = {"path": self.path, "kind": self.kind, "in_shape": list(self.in_shape),
           "out_shape": list(self.out_shape), "d_in": self.d_in, "d_out": self.d_out}
    return dict(out, equation=self.equation) if self.equation else out


class Session(Protocol):
  def __call__(self, index: int, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Delta for the `index`-th matched layer: x [..., d_in], kernel [d_in, d_out] -> [..., d_out]."""


class AdapterSet(Protocol):
  """What `inject` needs from an adapter: params for all matched layers, and a per-forward session."""

  def init(self, key: jax.Array, layers: Sequence[LayerInfo], kernels: Sequence[jnp.ndarray]) -> Any: ...

  def session(self, params: Any, layers: Sequence[LayerInfo], context=None) -> Session: ...

  def num_params(self, layers: Sequence[LayerInfo]) -> int: ...


# ------------------------------------------------------------------------------------------- per-layer


def routes_on_context(module: nn.Module) -> bool:
  """True for a routed adapter whose router reads an external context (the paper's setting)."""
  return getattr(module, "router_input", None) == "context"


def routes_on_activation(module: nn.Module) -> bool:
  return getattr(module, "router_input", None) == "activation"


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
  grid: tuple[int, ...]           # () block-wise, (K_y, K_x) cell-wise
  top_k: int | None
  input_lead: tuple[int, ...] | None = None   # the layer input's leading axes, e.g. (batch, tokens); None: lead


class _PerLayerSession:
  def __init__(self, modules, params, layers, context, capture: list | None, rngs=None, offset: int = 0):
    self.modules, self.params, self.layers = modules, params, layers
    self.context, self.capture, self.rngs = context, capture, rngs
    self.offset = offset                               # the first layer's index among all adapted layers

  def __call__(self, index, x, kernel):
    layer = self.layers[index]
    module = self.modules[layer.path]
    variables = {"params": self.params[layer.path]}
    extra = {"kernel": kernel} if getattr(module, "uses_base_kernel", False) else {}
    if self.rngs:                                      # each layer its own draw: fold_in(key, call index)
      extra["rngs"] = {name: jax.random.fold_in(key, self.offset + index) for name, key in self.rngs.items()}
    if routes_on_context(module):
      if self.context is None:
        raise ValueError(f"layer {layer.path!r} has a context-routed adapter ({type(module).__name__}, "
                         "router_input='context') but apply was called without a context: pass "
                         "context=<labels [batch] or one-hot/embedding [batch, context_dim]>.")
      _check_float_context(self.context, layer.path)
      rngs = {"rngs": extra.pop("rngs")} if "rngs" in extra else {}
      gates, state = module.apply(variables, None, self.context, method="route", mutable=["intermediates"],
                                  **rngs)
      lead = x.shape[:-1]
      batch = gates.ndim - (1 if module.router_grid == () else 3)                    # axes of the context
      self._record(layer, module, state, gates.shape[:batch], lead)
      if tuple(gates.shape[:batch]) != tuple(lead[:batch]):
        raise ValueError(f"layer {layer.path!r}: the context has batch shape {tuple(gates.shape[:batch])} but "
                         f"the layer's input has leading axes {tuple(lead)}: pass one context per example.")
      gates = gates.reshape(gates.shape[:batch] + (1,) * (len(lead) - batch) + gates.shape[batch:])
      gates = jnp.broadcast_to(gates, lead + gates.shape[len(lead):])
      return module.apply(variables, x, gates=gates, **extra)
    if routes_on_activation(module):
      out, state = module.apply(variables, x, mutable=["intermediates"], **extra)
      self._record(layer, module, state, x.shape[:-1])
      return out
    return module.apply(variables, x, **extra)

  def _record(self, layer, module, state, lead, input_lead=None):
    """Keeps the router's sown logits/gates [tokens, R, E] as [*lead, R, E]."""
    if self.capture is None:
      return
    input_lead = tuple(lead if input_lead is None else input_lead)
    for found in routing.collect_router_outputs(state.get("intermediates", {})):
      shape = tuple(lead) + found.gates.shape[-2:]
      self.capture.append(RouterTrace(layer.path, found.logits.reshape(shape), found.gates.reshape(shape),
                                      tuple(module.router_grid), getattr(module, "top_k", None), input_lead))


def check_rngs(rngs) -> dict | None:
  """rngs for the adapters: None, or a dict {stream: PRNG key} over `routing.RNG_STREAMS` ("gumbel", "dropout")."""
  if rngs is None:
    return None
  if not isinstance(rngs, Mapping):
    raise TypeError(f"rngs={rngs!r} must be a dict of PRNG keys, e.g. rngs={{'gumbel': key, 'dropout': key}}.")
  unknown = sorted(set(rngs) - set(routing.RNG_STREAMS))
  if unknown:
    raise ValueError(f"rngs has stream(s) {unknown}: adapters draw from {list(routing.RNG_STREAMS)} only; "
                     "drop the others.")
  for name, key in rngs.items():
    shape, dtype = np.shape(key), getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if not (typed and shape == ()) and not (shape == (2,) and dtype is not None and dtype == jnp.uint32):
      raise TypeError(f"rngs[{name!r}] is not a PRNG key (shape {shape}, dtype {dtype}): pass "
                      "jax.random.PRNGKey(seed) or jax.random.key(seed).")
  return dict(rngs)


def check_key(key) -> None:
  """The adapters' initialisation key must be a PRNG key (None and seeds are refused by name)."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and np.shape(key) == ():
    return
  if dtype is not None and dtype == jnp.uint32 and np.shape(key) == (2,):
    return
  raise TypeError(f"key={key!r} is not a PRNG key: pass key=jax.random.PRNGKey(seed) (or jax.random.key(seed)) "
                  "for the adapters' initialisation.")


def merge_context(context, module, path: str) -> jnp.ndarray:
  """The one context a merge is built for: an integer label, or one vector [context_dim]."""
  c = np.asarray(context) if not isinstance(context, jax.Array) else context
  integer = jnp.issubdtype(c.dtype, jnp.integer) and not jnp.issubdtype(c.dtype, jnp.bool_)
  dim = getattr(module, "context_dim", None)
  if integer and c.ndim == 0:
    return jnp.asarray(c)
  if not integer and c.ndim == 1 and jnp.issubdtype(c.dtype, jnp.floating) and (dim is None or c.shape[0] == dim):
    return jnp.asarray(c)
  shown = repr(context) if np.ndim(context) == 0 or np.size(context) <= 4 else f"<{c.dtype} array {tuple(c.shape)}>"
  raise ValueError(f"merge: context={' '.join(shown.split())} (layer {path!r}) is not one context: a merged model stands for "
                   f"ONE context, an integer label (context=1) or one float vector [context_dim={dim}]; merge once "
                   "per context for several.")


def _check_float_context(context, path: str) -> None:
  """A float context of apply is [batch, D] (one vector per example); one float vector is refused.

  A float [n] is ambiguous: labels of n examples written as floats, or one embedding [D] for every
  example (when n = context_dim the routers would silently read it as the latter).
  """
  shape = np.shape(context)
  dtype = context.dtype if hasattr(context, "dtype") else np.asarray(context).dtype
  if len(shape) < 2 and not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"context has shape {tuple(shape)} and dtype {jnp.dtype(dtype).name} (layer {path!r}): "
                     "apply takes one context per example, integer labels [batch] (float labels: "
                     "context.astype(jnp.int32)) or a one-hot/embedding [batch, context_dim] (one vector for "
                     "all examples: jnp.broadcast_to(c, (batch, context_dim))).")


@dataclasses.dataclass(frozen=True)
class PerLayer:
  """An independent adapter per matched layer.

  build: a spec for `localmoe.adapters.make` ({"method": "lora", "rank": 8, ...}; d_in/d_out are filled in
    per layer), a sequence of (pattern, spec) rules (the first pattern that fully matches a layer's path
    chooses its spec; e.g. context routers on attention and activation routers on the FFN), or a callable
    LayerInfo -> nn.Module.
  """
  build: Mapping[str, Any] | Sequence[tuple[str, Mapping[str, Any]]] | Callable[[LayerInfo], nn.Module]

  def spec_for(self, layer: LayerInfo) -> Mapping[str, Any]:
    if isinstance(self.build, Mapping):
      return self.build
    for pattern, spec in self.build:
      if re.fullmatch(pattern, layer.path):
        return spec
    raise ValueError(f"layer {layer.path!r} matches target_modules but none of the adapter rules' patterns "
                     f"{[p for p, _ in self.build]}: add a rule for it or narrow target_modules.")

  def module(self, layer: LayerInfo) -> nn.Module:
    if callable(self.build) and not isinstance(self.build, Mapping):
      return self.build(layer)
    try:
      return adapters_lib.make(self.spec_for(layer), d_in=layer.d_in, d_out=layer.d_out)
    except ValueError as error:
      raise ValueError(f"adapter for layer {layer.path!r} ({layer.d_in} -> {layer.d_out}): {error}") from None

  def modules(self, layers):
    return {layer.path: self.module(layer) for layer in layers}

  def init(self, key, layers, kernels):
    params = {}
    for i, (layer, kernel) in enumerate(zip(layers, kernels)):
      module = self.module(layer)
      x0 = jnp.zeros((1, layer.d_in), jnp.float32)
      extra = {"kernel": kernel} if getattr(module, "uses_base_kernel", False) else {}
      if routes_on_context(module):
        extra["context"] = jnp.zeros((1,), jnp.int32)
      params[layer.path] = module.init(jax.random.fold_in(key, i), x0, **extra)["params"]
    return params

  def session(self, params, layers, context=None, capture=None, rngs=None):
    return _PerLayerSession(self.modules(layers), params, layers, context, capture, rngs)

  def num_params(self, layers):
    return sum(self.module(layer).num_params() for layer in layers)

  def to_json(self) -> Any:
    if isinstance(self.build, Mapping):
      return _jsonable(dict(self.build), "adapter spec")
    if callable(self.build):
      raise ValueError("an adapter built by a callable cannot be saved: build it from a spec dict (or (pattern, "
                       "spec) rules) so adapter_config.json can describe it.")
    return [[pattern, _jsonable(dict(spec), f"adapter spec for {pattern!r}")] for pattern, spec in self.build]


def _jsonable(spec: dict, what: str) -> dict:
  out = {}
  for key, value in spec.items():
    if isinstance(value, (str, int, float, bool, type(None))):
      out[key] = value
    elif isinstance(value, (tuple, list)) and all(isinstance(v, (str, int, float, bool)) for v in value):
      out[key] = list(value)
    elif hasattr(value, "dtype") or value in (jnp.float32, jnp.bfloat16, jnp.float16):
      out[key] = jnp.dtype(value).name
    else:
      raise ValueError(f"{what}: field {key}={value!r} cannot be written to adapter_config.json; use a name "
                       "(e.g. a_init='lora') instead of a callable.")
  return out


# ------------------------------------------------------------------------------------------- matching


def path_matcher(target_modules: str | Sequence[str]) -> Callable[[str], bool]:
  """PEFT semantics: a string is a regular expression that must match the whole path; a list of names
  matches a path equal to a name or ending in "/name"."""
  if isinstance(target_modules, str):
    pattern = re.compile(target_modules)
    return lambda path: pattern.fullmatch(path) is not None
  names = list(target_modules)
  if not names:
    raise ValueError("target_modules is empty: pass a regex string or a non-empty list of layer names.")
  return lambda path: any(path == n or path.endswith("/" + n) for n in names)


def _linear_call(context) -> bool:
  return context.method_name == "__call__" and isinstance(context.module, LINEAR_TYPES)


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _inputs(args, kwargs):
  return args[0] if args else kwargs["inputs"]


def _einsum_equation(module: nn.Module, args, kwargs) -> str:
  """The equation of an nn.Einsum call (the call's `einsum_str`, else the module's); "" for other layers."""
  if not isinstance(module, nn.Einsum):
    return ""
  given = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  return (given or module.einsum_str).replace(" ", "")


def _layer_geometry(module: nn.Module, x, equation: str = ""
                    ) -> tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(kind, in_shape, out_shape, axis) of a Dense/DenseGeneral/Einsum call on input x."""
  path = _path(module)
  if isinstance(module, nn.Einsum):                  # contracted and feature axes of the kernel
    in_shape, out_shape = einsum_layers.widths(einsum_layers.parse(equation, x.ndim, path), module.shape)
    return "Einsum", in_shape, out_shape, ()
  if isinstance(module, nn.Dense):
    return "Dense", (int(x.shape[-1]),), (int(module.features),), (-1,)
  if getattr(module, "batch_dims", ()):
    raise ValueError(f"layer {path!r} is an nn.DenseGeneral with batch_dims={module.batch_dims}: its kernel "
                     "differs per batch index, so one adapter cannot stand for it; leave it out of target_modules.")
  axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
  axis = tuple(int(a) - x.ndim if int(a) >= 0 else int(a) for a in axis)           # negative, kernel order
  features = module.features if isinstance(module.features, Sequence) else (module.features,)
  return "DenseGeneral", tuple(int(x.shape[a]) for a in axis), tuple(int(f) for f in features), axis


def _flatten_input(x: jnp.ndarray, layer: LayerInfo) -> jnp.ndarray:
  """Moves the contracted axes last (kernel order) and flattens them: [..., d_in]."""
  if layer.kind in ("Dense", "Linear"):
    return x
  if layer.kind == "Einsum":
    return einsum_layers.flatten_input(x, einsum_layers.parse(layer.equation, x.ndim, layer.path))
  rest = [a for a in range(-x.ndim, 0) if a not in layer.axis]
  x = jnp.transpose(x, [a % x.ndim for a in (*rest, *layer.axis)])
  return x.reshape(*x.shape[:len(rest)], layer.d_in)


def _kernel_2d(kernel: jnp.ndarray, layer: LayerInfo) -> jnp.ndarray:
  if layer.kind == "Einsum":                                                          # kernel axes in any order
    return einsum_layers.kernel_2d(kernel, _einsum_map(layer))
  return kernel.reshape(layer.d_in, layer.d_out)                                      # [d_in, d_out]


def _kernel_nd(w2: jnp.ndarray, layer: LayerInfo, kernel_shape) -> jnp.ndarray:
  """Inverse of `_kernel_2d`: [d_in, d_out] -> the layer's kernel layout."""
  if layer.kind == "Einsum":
    return einsum_layers.kernel_nd(w2, _einsum_map(layer), kernel_shape)
  return w2.reshape(kernel_shape)


def _output_delta(delta: jnp.ndarray, layer: LayerInfo, x_ndim: int, y_shape) -> jnp.ndarray:
  """Delta [..., d_out] in the layer's output layout y_shape (einsum outputs may interleave the axes)."""
  if layer.kind == "Einsum":
    return einsum_layers.unflatten_output(delta, einsum_layers.parse(layer.equation, x_ndim, layer.path),
                                          layer.out_shape)
  return delta.reshape(y_shape)


def _einsum_map(layer: LayerInfo) -> einsum_layers.EinsumMap:
  """The equation's letter groups for the kernel; x's rank only matters for an ellipsis (never in the kernel)."""
  lhs = layer.equation.replace(" ", "").split(",")[0]
  return einsum_layers.parse(layer.equation, len(lhs) if "..." not in lhs else len(lhs) - 3, layer.path)


def _keys(path: str) -> list[str]:
  """Module path "a/b" -> ["a", "b"]; the root module's path "" -> []."""
  return path.split("/") if path else []


def _tree_get(tree, path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree


# ------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
  """A frozen Flax model with adapters attached to its matched linear layers (built by `inject`)."""
  model: nn.Module                                    # the backbone, unchanged
  adapter: Any                                        # an AdapterSet (PerLayer, QueryableLoRA, ...)
  layers: tuple[LayerInfo, ...]                       # matched layers in call order
  example_args: tuple[Any, ...]                       # shapes used to discover the layers
  target_modules: str | tuple[str, ...]
  trainable_extras: str | tuple[str, ...] | None = None   # regex (or names) of frozen-param modules to train
  extra_paths: tuple[str, ...] = ()                   # module paths selected by trainable_extras
  extra_leaves: tuple[tuple[str, tuple[int, ...], str], ...] = ()   # (path, shape, dtype) of each extra param

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
      node[keys[-1]] = jax.tree_util.tree_map(jnp.asarray, _tree_get(frozen_params, keys))
    return out

  def base_kernels(self, frozen_params) -> list[jnp.ndarray]:
    """Frozen kernels [d_in, d_out] (flattened for DenseGeneral) of the matched layers, in call order."""
    return [_kernel_2d(jnp.asarray(_tree_get(frozen_params, _keys(l.path) + ["kernel"])), l)
            for l in self.layers]

  def init_adapter(self, key: jax.Array, frozen_params) -> dict:
    """Fresh trainable params {"adapter": ..., "extras": ...} (for a new seed)."""
    return {"adapter": self.adapter.init(key, self.layers, self.base_kernels(frozen_params)),
            "extras": self.extras_of(frozen_params)}

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

  def apply(self, frozen_params, trainable, *args, context=None, capture_routing: bool = False, rngs=None,
            **kwargs):
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
    traces: list[RouterTrace] | None = [] if capture_routing else None
    if isinstance(self.adapter, PerLayer):
      session = self.adapter.session(trainable["adapter"], self.layers, context=context, capture=traces,
                                     rngs=rngs)
    elif rngs:
      raise ValueError(f"rngs={sorted(rngs)}: {type(self.adapter).__name__} draws no randomness; call apply "
                       "without rngs.")
    else:
      session = self.adapter.session(trainable["adapter"], self.layers, context=context)
    index = {p: i for i, p in enumerate(self.paths)}
    matches = path_matcher(self.target_modules)

    def add_delta(next_fun, args, kwargs, ctx):
      y = next_fun(*args, **kwargs)
      if not _linear_call(ctx):
        return y
      path = _path(ctx.module)
      if not matches(path):
        return y
      if path not in index:
        raise ValueError(f"layer {path!r} matches target_modules but was not seen when the model was "
                         "injected (different input shapes or control flow?): re-run inject with inputs "
                         "that reach it.")
      layer = self.layers[index[path]]
      x = _flatten_input(_inputs(args, kwargs), layer)                               # [..., d_in]
      kernel = _kernel_2d(ctx.module.get_variable("params", "kernel"), layer)        # [d_in, d_out]
      delta = session(index[path], x, kernel)                                         # [..., d_out]
      delta = _output_delta(delta, layer, _inputs(args, kwargs).ndim, y.shape)       # y's layout
      return y + delta.astype(y.dtype)

    with nn.intercept_methods(add_delta):
      y = self.model.apply({"params": params}, *args, **kwargs)
    return (y, traces) if capture_routing else y

  def merge(self, frozen_params, trainable, context=None):
    """Plain params for `model.apply`: every matched kernel + Delta W (Eq. 9), extras in place.

    Static adapters merge as they are; context-routed ones at ONE fixed context (a label or a vector [D]),
    giving one merged model per context. Activation-routed adapters cannot be merged (their Delta W changes
    with every input): the error names the layer.
    """
    if not isinstance(self.adapter, PerLayer):
      raise ValueError(f"{type(self.adapter).__name__} routes on activations across layers: its update depends "
                       "on every input, so it has no fixed Delta W to merge; apply the adapted model instead.")
    params = jax.tree_util.tree_map(jnp.asarray, self._with_extras(frozen_params, trainable.get("extras")))
    params = jax.tree_util.tree_map(lambda a: a, params)                              # a copy we may edit
    for layer in self.layers:
      module = self.adapter.module(layer)
      if routes_on_activation(module):
        raise ValueError(f"layer {layer.path!r}: {type(module).__name__} routes on its input "
                         "(router_input='activation'), so Delta W changes with every x and cannot be merged; "
                         "use router_input='context' to merge per context, or apply the adapted model.")
      if routes_on_context(module) and context is None:
        raise ValueError(f"layer {layer.path!r} is context-routed: merge(..., context=<one label or a [D] "
                         "vector>) builds the merged model of that one context.")
      keys = _keys(layer.path)
      if not keys:
        raise ValueError("merge needs the adapted layer to be a submodule of the model (its params under a "
                         "name), not the root module itself.")
      node = _tree_get(params, keys)
      kernel = node["kernel"]
      variables = {"params": trainable["adapter"][layer.path]}
      eye = jnp.eye(layer.d_in, dtype=jnp.float32)                                  # Delta is linear in x here
      extra = {"kernel": _kernel_2d(kernel, layer)} if getattr(module, "uses_base_kernel", False) else {}
      if routes_on_context(module):
        c = merge_context(context, module, layer.path)
        c = jnp.broadcast_to(c, (layer.d_in,) + c.shape)
        extra["context"] = c
      delta = module.apply(variables, eye, **extra)                                  # [d_in, d_out] = Delta W^T
      node = dict(node)
      node["kernel"] = kernel + _kernel_nd(delta, layer, kernel.shape).astype(kernel.dtype)
      parent = _tree_get(params, keys[:-1]) if len(keys) > 1 else params
      parent[keys[-1]] = node
    return params


def adapter_set(adapter) -> AdapterSet:
  """An AdapterSet from a spec: {"method": "queryable_lora", ...} builds `QueryableLoRA`; any other method
  name is a per-layer adapter of `localmoe.adapters.make` (wrapped in `PerLayer`); a list of (pattern, spec)
  rules is a `PerLayer` with per-layer specs. AdapterSets pass through."""
  if isinstance(adapter, (list, tuple)):
    rules = [(pattern, dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)) for pattern, spec in adapter]
    for pattern, spec in rules:
      if spec.get("method") not in adapters_lib.ADAPTERS:
        raise ValueError(f"adapter rule {pattern!r}: method={spec.get('method')!r} is not a per-layer adapter; "
                         f"valid: {sorted(adapters_lib.ADAPTERS)}.")
    return PerLayer(tuple(rules))
  if not (isinstance(adapter, Mapping) or hasattr(adapter, "to_dict")):
    return adapter
  spec = dict(adapter.to_dict() if hasattr(adapter, "to_dict") else adapter)
  if spec.get("method") == "queryable_lora":
    from localmoe.queryable import QueryableLoRA        # pylint: disable=g-import-not-at-top
    fields = {f.name for f in dataclasses.fields(QueryableLoRA)}
    unknown = sorted(set(spec) - fields - {"method"})
    if unknown:
      raise ValueError(f"queryable_lora: unknown field(s) {unknown}; QueryableLoRA takes {sorted(fields)}.")
    return QueryableLoRA(**{k: v for k, v in spec.items() if k != "method"})
  if spec.get("method") not in adapters_lib.ADAPTERS:
    raise ValueError(f"method={spec.get('method')!r} is not a known adapter; valid: "
                     f"{sorted(adapters_lib.ADAPTERS) + ['queryable_lora']}.")
  return PerLayer(spec)


def find_layers(model: nn.Module, params, example_args: Sequence[Any],
                target_modules: str | Sequence[str], example_kwargs: Mapping[str, Any] | None = None
                ) -> tuple[LayerInfo, ...]:
  """The nn.Dense / nn.DenseGeneral layers whose path matches, in order of their first call (shape-only pass).

  A matched layer inside nn.scan / nn.vmap (its kernel in `params` has more axes than the layer sees) is an
  error naming the layer.
  """
  matches = path_matcher(target_modules)
  found: dict[str, LayerInfo] = {}

  def record(next_fun, args, kwargs, context):
    if _linear_call(context):
      path = _path(context.module)
      if matches(path) and path not in found:
        x = _inputs(args, kwargs)
        equation = _einsum_equation(context.module, args, kwargs)
        kind, in_shape, out_shape, axis = _layer_geometry(context.module, x, equation)
        seen = tuple(context.module.get_variable("params", "kernel").shape)
        try:
          stored = tuple(np.shape(_tree_get(params, [str(p) for p in context.module.path] + ["kernel"])))
        except (KeyError, TypeError):
          stored = seen
        if stored != seen:
          raise ValueError(
              f"layer {path!r} is inside a lifted transform (nn.scan or nn.vmap): its kernel is stored as "
              f"{stored} but each call sees {seen}, so one adapter per layer cannot be attached; unroll the "
              "stack (a Python loop over layers, or scan=False) or leave it out of target_modules.")
        found[path] = LayerInfo(path=path, d_in=math.prod(in_shape), d_out=math.prod(out_shape), kind=kind,
                                in_shape=in_shape, out_shape=out_shape, axis=axis, equation=equation)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, *a: model.apply({"params": p}, *a, **(example_kwargs or {})), params, *example_args)
  return tuple(found.values())


def _module_paths(params) -> list[str]:
  """"/"-joined module paths that hold leaves directly (e.g. "head" for head/kernel, head/bias)."""
  paths = []
  for leaf_path, _ in params_lib.leaf_paths(params):
    module = leaf_path.rpartition("/")[0]
    if module not in paths:
      paths.append(module)
  return paths


def inject(model: nn.Module, params, adapter, *example_args, target_modules: str | Sequence[str],
           key: jax.Array, trainable_extras: str | Sequence[str] | None = None,
           example_kwargs: Mapping[str, Any] | None = None) -> tuple[AdaptedModel, dict]:
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
  layers = find_layers(model, params, example_args, target_modules, example_kwargs)
  if not layers:
    raise ValueError(f"target_modules={target_modules!r} matched no nn.Dense / nn.DenseGeneral / nn.Einsum layer of "
                     f"{type(model).__name__}: check the module paths (e.g. print them with "
                     "localmoe.inject.dense_paths(model, params, *inputs)).")
  extra_paths: tuple[str, ...] = ()
  if trainable_extras is not None:
    extras_match = _extras_matcher(trainable_extras)
    trainable_extras = trainable_extras if isinstance(trainable_extras, str) else tuple(trainable_extras)
    extra_paths = tuple(p for p in _module_paths(params) if extras_match(p))
    if not extra_paths:
      raise ValueError(f"trainable_extras={trainable_extras!r} matched no module of the params; module paths "
                       f"are e.g. {_module_paths(params)[-5:]}.")
    clash = [p for p in extra_paths if p in {l.path for l in layers}]
    if clash:
      raise ValueError(f"trainable_extras selects {clash}, which target_modules also adapts: a layer is either "
                       "adapted or trained in full, not both.")
  target = target_modules if isinstance(target_modules, str) else tuple(target_modules)
  adapted = AdaptedModel(model=model, adapter=adapter, layers=layers, example_args=tuple(example_args),
                         target_modules=target, trainable_extras=trainable_extras, extra_paths=extra_paths)
  trainable = adapted.init_adapter(key, params)
  leaves = tuple((f"extras/{path}", tuple(np.shape(leaf)), jnp.dtype(leaf.dtype).name)
                 for path, leaf in params_lib.leaf_paths(trainable["extras"]))
  return dataclasses.replace(adapted, extra_leaves=leaves), trainable


def _extras_matcher(trainable_extras) -> Callable[[str], bool]:
  """trainable_extras as target_modules: a regex over the whole module path, or a list of module names
  (a path equal to a name or ending in "/name")."""
  if isinstance(trainable_extras, str):
    return path_matcher(trainable_extras)
  if not isinstance(trainable_extras, (list, tuple)) or not all(isinstance(n, str) for n in trainable_extras):
    raise ValueError(f"trainable_extras={trainable_extras!r} must be a regex string (e.g. 'head') or a list of "
                     "module names (e.g. ['head']), like target_modules.")
  if not trainable_extras:
    raise ValueError("trainable_extras=[] selects nothing: pass None for no trainable extras, or module names "
                     "(e.g. ['head']).")
  return path_matcher(list(trainable_extras))


def dense_paths(model: nn.Module, params, *example_args) -> list[str]:
  """Every nn.Dense / nn.DenseGeneral path of `model`, in call order (to write a target_modules pattern)."""
  return [layer.path for layer in find_layers(model, params, example_args, ".*")]


# ------------------------------------------------------------------------------------------- router losses


def router_losses(traces: Sequence[RouterTrace], load_balance: float = 0.0, z_loss: float = 0.0,
                  mask: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
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
    if m.ndim > len(lead):                     # a per-example router: an example counts if it has any token
      m = m.reshape(m.shape[:len(lead)] + (-1,)).max(-1)
    weights = jnp.broadcast_to(m.reshape(m.shape + (1,) * (len(lead) - m.ndim)), lead).reshape(-1)
  return gates, logits, weights


def _check_mask(shape: tuple[int, ...], trace: RouterTrace) -> None:
  """The mask must broadcast onto the layer input's leading axes, aligned from the batch axis."""
  lead = tuple(trace.gates.shape[:-2] if trace.input_lead is None else trace.input_lead)
  if len(shape) > len(lead) or any(m not in (1, n) for m, n in zip(shape, lead)):
    raise ValueError(f"mask has shape {tuple(shape)} but layer {trace.path!r} routes inputs with leading axes "
                     f"{lead}: pass weights [batch, ...] of this batch that broadcast onto them (e.g. the "
                     "attention mask [batch, tokens]), without extra axes.")


def routing_diagnostics(traces: Sequence[RouterTrace], groups: jnp.ndarray | None = None,
                        num_groups: int = 1, mask: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
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
    raise ValueError(f"groups has dtype {jnp.asarray(groups).dtype}: pass integer group ids [batch] "
                     "(e.g. task ids; float ids: groups.astype(jnp.int32)).")
  usage, entropy = [], []
  for trace in traces:
    gates, _, weights = _flat(trace, mask)
    if groups is None:
      onehot = jnp.ones((gates.shape[0], 1), jnp.float32)
    else:
      lead = trace.gates.shape[:-2]
      if np.shape(groups) != tuple(lead[:1]):
        raise ValueError(f"groups has shape {np.shape(groups)} but layer {trace.path!r} routed a batch of "
                         f"{lead[0]}: pass one group id per example, shape ({lead[0]},).")
      g = jnp.asarray(groups).reshape(lead[:1] + (1,) * (len(lead) - 1))
      onehot = routing.one_hot_labels(jnp.broadcast_to(g, lead).reshape(-1), num_groups, "groups",
                                      "num_groups", "pass num_groups = the number of groups (ids run "
                                      "0..num_groups-1)")                              # [N, G]
    w = onehot * weights[:, None]                                                      # [N, G]
    u, ent = routing.group_usage(gates, w)
    usage.append(u)
    entropy.append(ent)
  if not usage:
    return {}
  shapes = {u.shape for u in usage}
  if len(shapes) > 1:
    raise ValueError(f"routing_diagnostics stacks layers of one router layout; got usage shapes {sorted(shapes)}.")
  return {"usage": jnp.stack(usage), "entropy": jnp.stack(entropy)}
