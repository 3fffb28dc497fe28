"""The host-independent half of adapting a model: what linen's `inject` and NNX's `nnx_inject` share.

A host (`localmoe.inject` for flax.linen, `localmoe.nnx_inject` for Flax NNX) finds the matched layers of
its framework and adds Delta(x) to their outputs; everything else lives here, once:

  * a layer's geometry (`LayerInfo`) and its flattened view: the input's contracted axes flattened to
    d_in, the kernel as [d_in, d_out], Delta [..., d_out] back in the output's layout (`flatten_input`,
    `kernel_2d`, `kernel_nd`, `output_delta`; einsum layers through `localmoe.einsum_layers`);
  * the adapters per layer (`PerLayer`, `adapter_set`) and one forward pass's session (`LayerSession`:
    the context broadcast over tokens, router traces, training rngs);
  * the refusals and checks (`check_key`, `check_rngs`, `check_float_context`, `merge_context`,
    `no_match_error`, `stacked_error`, `select_extras`), with the same words for both hosts;
  * the merge of one layer from the adapter's own Delta W (`merged_kernel`, Eq. 9).

Router traces, losses and diagnostics are `localmoe.router_traces`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from localmoe import adapters as adapters_lib
from localmoe import einsum_layers
from localmoe import routing
from localmoe.router_traces import RouterTrace


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One matched linear layer."""

  path: str  # module path, "/"-joined, e.g. "hidden_3" or "encoder/layer_0/attention/self/query"
  d_in: int  # flattened input width, prod(in_shape)
  d_out: int  # flattened output width, prod(out_shape)
  kind: str = "Dense"  # "Dense", "DenseGeneral" or "Einsum" (NNX: "Linear", "LinearGeneral")
  in_shape: tuple[int, ...] = ()  # the contracted input axes' sizes, in kernel order (Dense: (d_in,))
  out_shape: tuple[int, ...] = ()  # the features (Dense: (d_out,))
  axis: tuple[int, ...] = (-1,)  # the contracted axes of the layer's input (negative, kernel order)
  equation: str = ""  # Einsum layers: the equation, e.g. "btd,dnh->btnh" (`localmoe.einsum_layers`)
  stack: tuple[int, ...] = ()  # a layer of a scan / vmap stack: the kernel's leading layer axes, e.g. (3,)

  def to_json(self) -> dict:
    out = {
      "path": self.path,
      "kind": self.kind,
      "in_shape": list(self.in_shape),
      "out_shape": list(self.out_shape),
      "d_in": self.d_in,
      "d_out": self.d_out,
    }
    if self.stack:
      out["stack"] = list(self.stack)
    return dict(out, equation=self.equation) if self.equation else out

  @classmethod
  def of_shapes(cls, path: str, kind: str, in_shape, out_shape, axis=(-1,), equation: str = "", stack=()):
    """The LayerInfo of a layer whose call contracts `in_shape` into `out_shape` (d_in, d_out their products)."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    return cls(
      path=path,
      d_in=math.prod(in_shape),
      d_out=math.prod(out_shape),
      kind=kind,
      in_shape=in_shape,
      out_shape=out_shape,
      axis=tuple(axis),
      equation=equation,
      stack=tuple(stack),
    )

  def unstacked(self) -> "LayerInfo":
    """One layer of the stack (the geometry each call sees)."""
    return dataclasses.replace(self, stack=()) if self.stack else self


class Session(Protocol):
  def __call__(self, index: int, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Delta for the `index`-th matched layer: x [..., d_in], kernel [d_in, d_out] -> [..., d_out]."""


def over_stack(fn: Callable, stack: Sequence[int], *args):
  """fn mapped over the leading `stack` axes of every argument (one jax.vmap per axis); fn itself for ()."""
  for _ in stack:
    fn = jax.vmap(fn)
  return fn(*args)


def stack_of(path: str, stored, seen, transform: str, fix: str) -> tuple[int, ...]:
  """The leading layer axes of a kernel stored as `stored` whose calls see `seen` (() when unstacked).

  A layer of an nn.scan / nn.vmap / nnx.scan / nnx.vmap stack stores its kernel as [*stack, *seen]; a kernel
  whose stack axis does not lead (variable_axes={"params": 1}) is refused by name (`stacked_error`).
  """
  stored, seen = tuple(int(s) for s in stored), tuple(int(s) for s in seen)
  lead = len(stored) - len(seen)
  if lead < 0 or stored[lead:] != seen:
    raise stacked_error(path, stored, seen, transform, fix)
  return stored[:lead]


class AdapterSet(Protocol):
  """What `inject` needs from an adapter: params for all matched layers, and a per-forward session."""

  def init(self, key: jax.Array, layers: Sequence[LayerInfo], kernels: Sequence[jnp.ndarray]) -> Any: ...

  def session(self, params: Any, layers: Sequence[LayerInfo], context=None) -> Session: ...

  def num_params(self, layers: Sequence[LayerInfo]) -> int: ...


def routes_on_context(module: nn.Module) -> bool:
  """True for a routed adapter whose router reads an external context (the paper's setting)."""
  return getattr(module, "router_input", None) == "context"


def routes_on_activation(module: nn.Module) -> bool:
  return getattr(module, "router_input", None) == "activation"


class LayerSession:
  """Delta of the matched layers for one forward pass: context broadcast over tokens, router traces, rngs."""

  def __init__(self, modules, params, layers, context, capture: list | Callable | None, rngs=None, offset: int = 0):
    """capture: None, a list the RouterTraces are appended to, or a callable each trace is passed to (a host's
    sink that keeps it as transform-safe state: linen's `sow`, an NNX variable)."""
    self.modules, self.params, self.layers = modules, params, layers
    self.context, self.capture, self.rngs = context, capture, rngs
    self.offset = offset  # the first layer's index among all adapted layers

  def __call__(self, index, x, kernel, params=None, slice_index=None):
    """Delta [..., d_out] of the index-th layer on x [..., d_in]. A layer of a stack: `params` is this
    layer's slice of its stacked adapter params, `slice_index` its position in the stack (for the rngs)."""
    layer = self.layers[index]
    module = self.modules[layer.path]
    variables = {"params": self.params[layer.path] if params is None else params}
    extra = {"kernel": kernel} if getattr(module, "uses_base_kernel", False) else {}
    if self.rngs:  # each layer its own draw: fold_in(key, call index)
      keys = {name: jax.random.fold_in(key, self.offset + index) for name, key in self.rngs.items()}
      if slice_index is not None:  # and each layer of a stack its own
        keys = {name: jax.random.fold_in(key, slice_index) for name, key in keys.items()}
      extra["rngs"] = keys
    if routes_on_context(module):
      if self.context is None:
        raise ValueError(
          f"layer {layer.path!r} has a context-routed adapter ({type(module).__name__}, "
          "router_input='context') but apply was called without a context: pass "
          "context=<labels [batch] or one-hot/embedding [batch, context_dim]>."
        )
      check_float_context(self.context, layer.path)
      rngs = {"rngs": extra.pop("rngs")} if "rngs" in extra else {}
      gates, state = module.apply(variables, None, self.context, method="route", mutable=["intermediates"], **rngs)
      lead = x.shape[:-1]
      batch = gates.ndim - (1 if module.router_grid == () else 3)  # axes of the context
      self._record(layer, module, state, gates.shape[:batch], lead)
      if tuple(gates.shape[:batch]) != tuple(lead[:batch]):
        raise ValueError(
          f"layer {layer.path!r}: the context has batch shape {tuple(gates.shape[:batch])} but "
          f"the layer's input has leading axes {tuple(lead)}: pass one context per example."
        )
      gates = gates.reshape(gates.shape[:batch] + (1,) * (len(lead) - batch) + gates.shape[batch:])
      gates = jnp.broadcast_to(gates, lead + gates.shape[len(lead) :])
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
      trace = RouterTrace(
        layer.path,
        found.logits.reshape(shape),
        found.gates.reshape(shape),
        tuple(module.router_grid),
        getattr(module, "top_k", None),
        input_lead,
      )
      if callable(self.capture):
        self.capture(trace)
      else:
        self.capture.append(trace)


def check_rngs(rngs) -> dict | None:
  """rngs for the adapters: None, or a dict {stream: PRNG key} over `routing.RNG_STREAMS` ("gumbel", "dropout")."""
  if rngs is None:
    return None
  if not isinstance(rngs, Mapping):
    raise TypeError(f"rngs={rngs!r} must be a dict of PRNG keys, e.g. rngs={{'gumbel': key, 'dropout': key}}.")
  unknown = sorted(set(rngs) - set(routing.RNG_STREAMS))
  if unknown:
    raise ValueError(
      f"rngs has stream(s) {unknown}: adapters draw from {list(routing.RNG_STREAMS)} only; drop the others."
    )
  for name, key in rngs.items():
    shape, dtype = np.shape(key), getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if not (typed and shape == ()) and not (shape == (2,) and dtype is not None and dtype == jnp.uint32):
      raise TypeError(
        f"rngs[{name!r}] is not a PRNG key (shape {shape}, dtype {dtype}): pass "
        "jax.random.PRNGKey(seed) or jax.random.key(seed)."
      )
  return dict(rngs)


def check_key(key) -> None:
  """The adapters' initialisation key must be a PRNG key (None and seeds are refused by name)."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and np.shape(key) == ():
    return
  if dtype is not None and dtype == jnp.uint32 and np.shape(key) == (2,):
    return
  raise TypeError(
    f"key={key!r} is not a PRNG key: pass key=jax.random.PRNGKey(seed) (or jax.random.key(seed)) "
    "for the adapters' initialisation."
  )


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
  raise ValueError(
    f"merge: context={' '.join(shown.split())} (layer {path!r}) is not one context: a merged model stands for "
    f"ONE context, an integer label (context=1) or one float vector [context_dim={dim}]; merge once "
    "per context for several."
  )


def check_float_context(context, path: str) -> None:
  """A float context of apply is [batch, D] (one vector per example); one float vector is refused.

  A float [n] is ambiguous: labels of n examples written as floats, or one embedding [D] for every
  example (when n = context_dim the routers would silently read it as the latter).
  """
  shape = np.shape(context)
  dtype = context.dtype if hasattr(context, "dtype") else np.asarray(context).dtype
  if len(shape) < 2 and not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
      f"context has shape {tuple(shape)} and dtype {jnp.dtype(dtype).name} (layer {path!r}): "
      "apply takes one context per example, integer labels [batch] (float labels: "
      "context.astype(jnp.int32)) or a one-hot/embedding [batch, context_dim] (one vector for "
      "all examples: jnp.broadcast_to(c, (batch, context_dim)))."
    )


def _init_params(module: nn.Module, d_in: int, uses_kernel: bool, key, kernel):
  """The params of one layer's adapter (`PerLayer.init`): module.init on a zero input [1, d_in] (a task id 0
  for a context router; the base kernel [d_in, d_out] for an adapter that reads it, e.g. DoRA)."""
  x0 = jnp.zeros((1, d_in), jnp.float32)
  context = {"context": jnp.zeros((1,), jnp.int32)} if routes_on_context(module) else {}
  return module.init(key, x0, **context, **({"kernel": kernel} if uses_kernel else {}))["params"]


_init_params_compiled = jax.jit(_init_params, static_argnums=(0, 1, 2))  # one program per equal adapter


def _init_fn(module: nn.Module, d_in: int, uses_kernel: bool) -> Callable:
  try:
    hash(module)
  except TypeError:  # a module built by a callable need not be hashable: init it op by op
    return functools.partial(_init_params, module, d_in, uses_kernel)
  return functools.partial(_init_params_compiled, module, d_in, uses_kernel)


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
    raise ValueError(
      f"layer {layer.path!r} matches target_modules but none of the adapter rules' patterns "
      f"{[p for p, _ in self.build]}: add a rule for it or narrow target_modules."
    )

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
    """{layer path: params}; a layer of a stack gets params stacked [*stack, ...] (kernels [*stack, d_in,
    d_out] or one [d_in, d_out] for all), layer j of the stack drawn from fold_in(fold_in(key, i), j).

    Each layer's init is one compiled program, shared by the layers whose adapters are equal (a model's
    layers of one shape compile it once)."""
    params = {}
    for i, (layer, kernel) in enumerate(zip(layers, kernels)):
      module = self.module(layer)
      uses_kernel = getattr(module, "uses_base_kernel", False)
      one = _init_fn(module, layer.d_in, uses_kernel)
      if not uses_kernel:
        kernel = None  # not an input of the program (one compile for every kernel dtype and layout)
      if not layer.stack:
        params[layer.path] = one(jax.random.fold_in(key, i), kernel)
        continue
      count = int(np.prod(layer.stack))
      keys = jax.vmap(lambda j, k=jax.random.fold_in(key, i): jax.random.fold_in(k, j))(jnp.arange(count))
      keys = keys.reshape(tuple(layer.stack) + keys.shape[1:])
      if uses_kernel:
        kernel = jnp.zeros((layer.d_in, layer.d_out), jnp.float32) if kernel is None else jnp.asarray(kernel)
        kernel = jnp.broadcast_to(kernel, tuple(layer.stack) + kernel.shape[-2:])  # [*stack, d_in, d_out]
      params[layer.path] = over_stack(one, layer.stack, keys, kernel)
    return params

  def session(self, params, layers, context=None, capture=None, rngs=None):
    return LayerSession(self.modules(layers), params, layers, context, capture, rngs)

  def num_params(self, layers):
    return sum(self.module(layer).num_params() * int(np.prod(layer.stack)) for layer in layers)

  def to_json(self) -> Any:
    if isinstance(self.build, Mapping):
      return jsonable(dict(self.build), "adapter spec")
    if callable(self.build):
      raise ValueError(
        "an adapter built by a callable cannot be saved: build it from a spec dict (or (pattern, "
        "spec) rules) so adapter_config.json can describe it."
      )
    return [[pattern, jsonable(dict(spec), f"adapter spec for {pattern!r}")] for pattern, spec in self.build]


def jsonable(spec: dict, what: str) -> dict:
  out = {}
  for key, value in spec.items():
    if isinstance(value, (str, int, float, bool, type(None))):
      out[key] = value
    elif isinstance(value, (tuple, list)) and all(isinstance(v, (str, int, float, bool)) for v in value):
      out[key] = list(value)
    elif hasattr(value, "dtype") or value in (jnp.float32, jnp.bfloat16, jnp.float16):
      out[key] = jnp.dtype(value).name
    else:
      raise ValueError(
        f"{what}: field {key}={value!r} cannot be written to adapter_config.json; use a name "
        "(e.g. a_init='lora') instead of a callable."
      )
  return out


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


def flatten_input(x: jnp.ndarray, layer: LayerInfo) -> jnp.ndarray:
  """Moves the contracted axes last (kernel order) and flattens them: [..., d_in]."""
  if layer.kind in ("Dense", "Linear"):
    return x
  if layer.kind == "Einsum":
    return einsum_layers.flatten_input(x, einsum_layers.parse(layer.equation, x.ndim, layer.path))
  rest = [a for a in range(-x.ndim, 0) if a not in layer.axis]
  x = jnp.transpose(x, [a % x.ndim for a in (*rest, *layer.axis)])
  return x.reshape(*x.shape[: len(rest)], layer.d_in)


def kernel_2d(kernel: jnp.ndarray, layer: LayerInfo) -> jnp.ndarray:
  if layer.kind == "Einsum":  # kernel axes in any order
    return einsum_layers.kernel_2d(kernel, einsum_map(layer))
  return kernel.reshape(layer.d_in, layer.d_out)  # [d_in, d_out]


def kernel_nd(w2: jnp.ndarray, layer: LayerInfo, kernel_shape) -> jnp.ndarray:
  """Inverse of `kernel_2d`: [d_in, d_out] -> the layer's kernel layout."""
  if layer.kind == "Einsum":
    return einsum_layers.kernel_nd(w2, einsum_map(layer), kernel_shape)
  return w2.reshape(kernel_shape)


def output_delta(delta: jnp.ndarray, layer: LayerInfo, x_ndim: int, y_shape) -> jnp.ndarray:
  """Delta [..., d_out] in the layer's output layout y_shape (einsum outputs may interleave the axes)."""
  if layer.kind == "Einsum":
    return einsum_layers.unflatten_output(
      delta, einsum_layers.parse(layer.equation, x_ndim, layer.path), layer.out_shape
    )
  return delta.reshape(y_shape)


def einsum_map(layer: LayerInfo) -> einsum_layers.EinsumMap:
  """The equation's letter groups for the kernel; x's rank only matters for an ellipsis (never in the kernel)."""
  lhs = layer.equation.replace(" ", "").split(",")[0]
  return einsum_layers.parse(layer.equation, len(lhs) if "..." not in lhs else len(lhs) - 3, layer.path)


def adapter_set(adapter) -> AdapterSet:
  """An AdapterSet from a spec: {"method": "queryable_lora", ...} builds `QueryableLoRA`; any other method
  name is a per-layer adapter of `localmoe.adapters.make` (wrapped in `PerLayer`); a list of (pattern, spec)
  rules is a `PerLayer` with per-layer specs. AdapterSets pass through."""
  if isinstance(adapter, (list, tuple)):
    rules = [(pattern, dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)) for pattern, spec in adapter]
    for pattern, spec in rules:
      if spec.get("method") not in adapters_lib.ADAPTERS:
        raise ValueError(
          f"adapter rule {pattern!r}: method={spec.get('method')!r} is not a per-layer adapter; "
          f"valid: {sorted(adapters_lib.ADAPTERS)}."
        )
    return PerLayer(tuple(rules))
  if not (isinstance(adapter, Mapping) or hasattr(adapter, "to_dict")):
    return adapter
  spec = dict(adapter.to_dict() if hasattr(adapter, "to_dict") else adapter)
  if spec.get("method") == "queryable_lora":
    from localmoe.queryable import QueryableLoRA  # pylint: disable=g-import-not-at-top

    fields = {f.name for f in dataclasses.fields(QueryableLoRA)}
    unknown = sorted(set(spec) - fields - {"method"})
    if unknown:
      raise ValueError(f"queryable_lora: unknown field(s) {unknown}; QueryableLoRA takes {sorted(fields)}.")
    return QueryableLoRA(**{k: v for k, v in spec.items() if k != "method"})
  if spec.get("method") not in adapters_lib.ADAPTERS:
    raise ValueError(
      f"method={spec.get('method')!r} is not a known adapter; valid: "
      f"{sorted(adapters_lib.ADAPTERS) + ['queryable_lora']}."
    )
  return PerLayer(spec)


def extras_matcher(trainable_extras) -> Callable[[str], bool]:
  """trainable_extras as target_modules: a regex over the whole module path, or a list of module names
  (a path equal to a name or ending in "/name")."""
  if isinstance(trainable_extras, str):
    return path_matcher(trainable_extras)
  if not isinstance(trainable_extras, (list, tuple)) or not all(isinstance(n, str) for n in trainable_extras):
    raise ValueError(
      f"trainable_extras={trainable_extras!r} must be a regex string (e.g. 'head') or a list of "
      "module names (e.g. ['head']), like target_modules."
    )
  if not trainable_extras:
    raise ValueError(
      "trainable_extras=[] selects nothing: pass None for no trainable extras, or module names (e.g. ['head'])."
    )
  return path_matcher(list(trainable_extras))


# ------------------------------------------------------------------------------------------- shared refusals


def no_match_error(target_modules, kinds: str, model: Any, listing: str) -> ValueError:
  """The error of a target_modules that matches no adaptable layer (kinds: the host's layer classes)."""
  return ValueError(
    f"target_modules={target_modules!r} matched no {kinds} layer of {type(model).__name__}: "
    f"check the module paths (e.g. print them with {listing})."
  )


def stacked_error(path: str, stored, seen, transform: str, fix: str) -> ValueError:
  """The error of a matched layer of a stack whose layer axes do not lead its stored kernel."""
  return ValueError(
    f"layer {path!r} is {transform}: its kernel is stored as {tuple(stored)} but each call sees "
    f"{tuple(seen)}, which is not [*layers, *{tuple(seen)}], so the adapters cannot be stacked on "
    f"the same leading axis; {fix} or leave it out of target_modules."
  )


def select_extras(trainable_extras, module_paths: Sequence[str], layer_paths: Sequence[str]) -> tuple[str, ...]:
  """The module paths `trainable_extras` selects (a regex, or names as target_modules); none, or one that
  is also adapted, is a ValueError."""
  selected = extras_matcher(trainable_extras)
  extra_paths = tuple(p for p in module_paths if selected(p))
  shown = trainable_extras if isinstance(trainable_extras, str) else tuple(trainable_extras)
  if not extra_paths:
    raise ValueError(
      f"trainable_extras={shown!r} matched no module of the params; module paths are e.g. {list(module_paths)[-5:]}."
    )
  clash = [p for p in extra_paths if p in set(layer_paths)]
  if clash:
    raise ValueError(
      f"trainable_extras selects {clash}, which target_modules also adapts: a layer is either "
      "adapted or trained in full, not both."
    )
  return extra_paths


_MERGE_WORDS = {"linen": ("merge(..., context=", "apply"), "nnx": ("merge(model, context=", "call")}


def delta_2d(
  module: nn.Module, params, layer: LayerInfo, kernel_2d_: jnp.ndarray, context=None, host: str = "linen"
) -> jnp.ndarray:
  """Delta W^T [d_in, d_out] of one layer's adapter at one fixed routing (Eq. 9): the adapter's own
  `delta_weight` where it has one, else (DoRA: Delta depends on W0) its output on the identity.
  host ("linen" or "nnx") only words the errors as that host's calls."""
  call, use = _MERGE_WORDS[host]
  if routes_on_activation(module):
    raise ValueError(
      f"layer {layer.path!r}: {type(module).__name__} routes on its input "
      "(router_input='activation'), so Delta W changes with every x and cannot be merged; "
      f"use router_input='context' to merge per context, or {use} the adapted model."
    )
  if routes_on_context(module):
    if context is None:
      raise ValueError(
        f"layer {layer.path!r} is context-routed: {call}<one label or a [D] "
        "vector>) builds the merged model of that one context."
      )
    context = merge_context(context, module, layer.path)
  variables = {"params": params}
  if hasattr(type(module), "delta_weight"):
    return adapters_lib.delta_weight(module, variables, context=context).T
  eye = jnp.eye(layer.d_in, dtype=jnp.float32)  # Delta is linear in x here
  extra = {"kernel": kernel_2d_} if getattr(module, "uses_base_kernel", False) else {}
  if context is not None:
    extra["context"] = jnp.broadcast_to(context, (layer.d_in,) + jnp.shape(context))
  return module.apply(variables, eye, **extra)


def merged_kernel(
  module: nn.Module, params, layer: LayerInfo, kernel: jnp.ndarray, context=None, host: str = "linen"
) -> jnp.ndarray:
  """kernel + Delta W in the kernel's own layout and dtype (one fixed routing; `delta_2d`)."""
  if layer.stack:  # [*stack, ...]: each layer its own Delta W
    one = layer.unstacked()
    if routes_on_context(module) and context is not None:
      context = merge_context(context, module, layer.path)
    return over_stack(lambda p, w: merged_kernel(module, p, one, w, context, host), layer.stack, params, kernel)
  delta = delta_2d(module, params, layer, kernel_2d(kernel, layer), context, host)
  return kernel + kernel_nd(delta, layer, kernel.shape).astype(kernel.dtype)
