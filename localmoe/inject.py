"""Adapting a whole Flax model: attach an adapter to every nn.Dense whose module path matches a pattern.

This is PEFT's `target_modules` for flax.linen. The backbone is not rewritten: its params stay frozen and
untouched, and during `apply` a method interceptor (`nn.intercept_methods`) adds the adapter's update to the
output of each matched Dense,

  y = Dense(x) + Delta_l(x)          (LoRA Eq. 1, Localized LoRA Eq. 4, LoRA-MoE Eq. 6/8, DoRA, ...)

so any linen model whose linear maps are nn.Dense (or subclasses) can be adapted without changes.

  adapted, trainable = inject(model, frozen_params, {"method": "lora", "rank": 8, "alpha": 16},
                              jnp.zeros((1, 2)), target_modules=r"hidden_\\d+", key=key)
  y = adapted.apply(frozen_params, trainable, x)         # frozen_params are never differentiated here

Adapters come in two kinds, both handled by an `AdapterSet` (init over all matched layers; a per-forward
`session` that returns Delta for the l-th matched call):
  * per-layer adapters (`PerLayer`): one independent module per matched layer, built from a spec for
    `localmoe.adapters.make` (d_in/d_out filled in) or from a callable. Trainable params: {path: params}.
    An adapter class with `uses_base_kernel = True` (DoRA) also receives the frozen kernel [d_in, d_out].
  * model-wide adapters (`localmoe.queryable.QueryableLoRA`): shared parameters across layers and a state
    carried from layer to layer within one forward pass (Algorithm 1).

Matched layers are ordered by their first call in a forward pass; that order is `adapted.layers`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from localmoe import adapters as adapters_lib


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One matched Dense layer."""
  path: str                       # module path, "/"-joined, e.g. "hidden_3" or "block_0_attn/query"
  d_in: int                       # input width
  d_out: int                      # output width (Dense.features)


class Session(Protocol):
  def __call__(self, index: int, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Delta for the `index`-th matched layer: x [..., d_in], kernel [d_in, d_out] -> [..., d_out]."""


class AdapterSet(Protocol):
  """What `inject` needs from an adapter: params for all matched layers, and a per-forward session."""

  def init(self, key: jax.Array, layers: Sequence[LayerInfo], kernels: Sequence[jnp.ndarray]) -> Any: ...

  def session(self, params: Any, layers: Sequence[LayerInfo]) -> Session: ...

  def num_params(self, layers: Sequence[LayerInfo]) -> int: ...


# ------------------------------------------------------------------------------------------- per-layer


class _PerLayerSession:
  def __init__(self, modules, params, layers):
    self.modules, self.params, self.layers = modules, params, layers

  def __call__(self, index, x, kernel):
    path = self.layers[index].path
    module = self.modules[path]
    if getattr(module, "uses_base_kernel", False):
      return module.apply({"params": self.params[path]}, x, kernel=kernel)
    return module.apply({"params": self.params[path]}, x)


@dataclasses.dataclass(frozen=True)
class PerLayer:
  """An independent adapter per matched layer.

  build: a spec for `localmoe.adapters.make` ({"method": "lora", "rank": 8, ...}; d_in/d_out are filled in
  per layer) or a callable LayerInfo -> nn.Module.
  """
  build: Mapping[str, Any] | Callable[[LayerInfo], nn.Module]

  def module(self, layer: LayerInfo) -> nn.Module:
    if callable(self.build):
      return self.build(layer)
    try:
      return adapters_lib.make(self.build, d_in=layer.d_in, d_out=layer.d_out)
    except ValueError as error:
      raise ValueError(f"adapter for layer {layer.path!r} ({layer.d_in} -> {layer.d_out}): {error}") from None

  def modules(self, layers):
    return {layer.path: self.module(layer) for layer in layers}

  def init(self, key, layers, kernels):
    params = {}
    for i, (layer, kernel) in enumerate(zip(layers, kernels)):
      module = self.module(layer)
      x0 = jnp.zeros((1, layer.d_in), kernel.dtype)
      extra = {"kernel": kernel} if getattr(module, "uses_base_kernel", False) else {}
      params[layer.path] = module.init(jax.random.fold_in(key, i), x0, **extra)["params"]
    return params

  def session(self, params, layers):
    return _PerLayerSession(self.modules(layers), params, layers)

  def num_params(self, layers):
    return sum(self.module(layer).num_params() for layer in layers)


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


def _dense_call(context) -> bool:
  return context.method_name == "__call__" and isinstance(context.module, nn.Dense)


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _inputs(args, kwargs):
  return args[0] if args else kwargs["inputs"]


# ------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
  """A frozen Flax model with an adapter attached to its matched Dense layers (built by `inject`)."""
  model: nn.Module                                    # the backbone, unchanged
  adapter: Any                                        # an AdapterSet (PerLayer, QueryableLoRA, ...)
  layers: tuple[LayerInfo, ...]                       # matched layers in call order
  example_args: tuple[Any, ...]                       # shapes used to discover the layers
  target_modules: str | tuple[str, ...]

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(layer.path for layer in self.layers)

  def num_params(self) -> int:
    """Trainable adapter parameters."""
    return int(self.adapter.num_params(self.layers))

  def base_kernels(self, frozen_params) -> list[jnp.ndarray]:
    """Frozen kernels [d_in, d_out] of the matched layers (a discovery pass; cheap under jit)."""
    index = {p: i for i, p in enumerate(self.paths)}
    kernels = [None] * len(self.layers)
    matches = path_matcher(self.target_modules)

    def grab(next_fun, args, kwargs, context):
      if _dense_call(context) and matches(_path(context.module)):
        kernels[index[_path(context.module)]] = context.module.get_variable("params", "kernel")
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      self.model.apply({"params": frozen_params}, *self.example_args)
    return kernels

  def init_adapter(self, key: jax.Array, frozen_params) -> Any:
    """Fresh trainable adapter params (for a new seed)."""
    return self.adapter.init(key, self.layers, self.base_kernels(frozen_params))

  def apply(self, frozen_params, adapter_params, *args, **kwargs):
    """The adapted forward pass: the backbone with Delta added to every matched Dense output."""
    frozen_params = jax.lax.stop_gradient(frozen_params)
    session = self.adapter.session(adapter_params, self.layers)
    index = {p: i for i, p in enumerate(self.paths)}
    matches = path_matcher(self.target_modules)

    def add_delta(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if not _dense_call(context):
        return y
      path = _path(context.module)
      if not matches(path):
        return y
      if path not in index:
        raise ValueError(f"layer {path!r} matches target_modules but was not seen when the model was "
                         "injected (different input shapes or control flow?): re-run inject with inputs "
                         "that reach it.")
      kernel = context.module.get_variable("params", "kernel")
      return y + session(index[path], _inputs(args, kwargs), kernel).astype(y.dtype)

    with nn.intercept_methods(add_delta):
      return self.model.apply({"params": frozen_params}, *args, **kwargs)


def adapter_set(adapter) -> AdapterSet:
  """An AdapterSet from a spec: {"method": "queryable_lora", ...} builds `QueryableLoRA`; any other method
  name is a per-layer adapter of `localmoe.adapters.make` (wrapped in `PerLayer`). AdapterSets pass through."""
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
                target_modules: str | Sequence[str]) -> tuple[LayerInfo, ...]:
  """The nn.Dense layers whose path matches, in order of their first call (shape-only pass)."""
  matches = path_matcher(target_modules)
  found: dict[str, LayerInfo] = {}

  def record(next_fun, args, kwargs, context):
    if _dense_call(context):
      path = _path(context.module)
      if matches(path) and path not in found:
        x = _inputs(args, kwargs)
        found[path] = LayerInfo(path=path, d_in=int(x.shape[-1]), d_out=int(context.module.features))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, *a: model.apply({"params": p}, *a), params, *example_args)
  return tuple(found.values())


def inject(model: nn.Module, params, adapter, *example_args, target_modules: str | Sequence[str],
           key: jax.Array) -> tuple[AdaptedModel, Any]:
  """Freezes `params` and attaches `adapter` to every nn.Dense whose path matches `target_modules`.

  Args:
    model: any flax.linen model; its linear maps must be nn.Dense (or subclasses) to be adaptable.
    params: the pretrained `params` collection (frozen: `apply` stops their gradient).
    adapter: an `AdapterSet`, or a spec dict for `localmoe.adapters.make` (wrapped in `PerLayer`).
    *example_args: inputs of the right shapes (e.g. jnp.zeros((1, 2))), used to discover the layers.
    target_modules: a regex that must match the whole path ("hidden_\\d+", ".*attn/(query|value)"), or a
      list of layer names matched as path suffixes (PEFT's list semantics).
    key: PRNG key for the adapter's initialisation.

  Returns:
    (adapted, trainable): call `adapted.apply(params, trainable, *inputs)`; `trainable` holds only adapter
    params; `adapted.paths` lists the matched layers.
  """
  adapter = adapter_set(adapter)
  layers = find_layers(model, params, example_args, target_modules)
  if not layers:
    raise ValueError(f"target_modules={target_modules!r} matched no nn.Dense layer of "
                     f"{type(model).__name__}: check the module paths (e.g. print them with "
                     "localmoe.inject.dense_paths(model, params, *inputs)).")
  target = target_modules if isinstance(target_modules, str) else tuple(target_modules)
  adapted = AdaptedModel(model=model, adapter=adapter, layers=layers, example_args=tuple(example_args),
                         target_modules=target)
  return adapted, adapted.init_adapter(key, params)


def dense_paths(model: nn.Module, params, *example_args) -> list[str]:
  """Every nn.Dense path of `model`, in call order (to write a target_modules pattern)."""
  return [layer.path for layer in find_layers(model, params, example_args, ".*")]
