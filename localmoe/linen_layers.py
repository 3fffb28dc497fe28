"""The linen host's layers: which calls are adapted, their geometry, and the shape-only discovery pass.

`localmoe.inject` attaches adapters through `nn.intercept_methods`; this module holds what its interceptors
ask of one call (a Flax linear layer's `__call__`, or a generic projection module's: `localmoe.projections`),
the geometry of a Dense / DenseGeneral / Einsum call, the stacked-kernel refusal words, and `discover`, the
pass over `jax.eval_shape` that lists the matched layers in call order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from localmoe import adapt_core
from localmoe import einsum_layers
from localmoe import params as params_lib
from localmoe import projections
from localmoe.adapt_core import LayerInfo, path_matcher

LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def unjitted(fn):
  """The method under a linen `nn.jit` method decorator (`@nn.jit def __call__`), or None.

  nn.jit caches its trace by the module, not by the method interceptors around the call, so a cached trace
  would skip the adapters (a silent no-op): the hosts call the method underneath instead (the caller's own
  jax.jit still compiles the whole step). Recognised by flax's cached-transform wrapper, which keeps the
  wrapped method as `__wrapped__`.
  """
  code = getattr(fn, "__code__", None)
  if code is not None and code.co_name == "wrapped_fn" and "trafo_fn" in code.co_freevars:
    return getattr(fn, "__wrapped__", None)
  return None


def run_model(model: nn.Module, variables, args, kwargs, **apply_kwargs):
  """model.apply(variables, *args, **kwargs), through the method under an `nn.jit` decorator on __call__."""
  method = unjitted(type(model).__call__)
  if method is not None:
    apply_kwargs["method"] = method
  return model.apply(variables, *args, **kwargs, **apply_kwargs)


TRACES = "router_traces"  # the collection the linen host sows router traces into (remat/scan safe)
STACKED_ADAPTERS = "localmoe_adapters"  # where apply places a stack's adapters in its layers' params scope
STACK_TRANSFORM = "inside a lifted transform (nn.scan or nn.vmap)"
STACK_FIX = "stack the params on their leading axis (variable_axes={'params': 0})"


def is_linear_call(context) -> bool:
  return context.method_name == "__call__" and isinstance(context.module, LINEAR_TYPES)


def module_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def call_input(args, kwargs):
  return args[0] if args else kwargs["inputs"]


def own_weights(module: nn.Module) -> dict:
  """The params (ndim >= 2) a module holds directly in its scope (gemma's nn.share_scope: its parent's)."""
  try:
    params = module.variables.get("params", {})
  except (AttributeError, ValueError, TypeError):
    return {}
  return {k: v for k, v in params.items() if not isinstance(v, Mapping) and getattr(v, "ndim", 0) >= 2}


def generic_weights(context, matches) -> dict:
  """The matched weights of a generic module's __call__ (`localmoe.projections`), else {}."""
  module = context.module
  if context.method_name != "__call__" or isinstance(module, LINEAR_TYPES) or projections.is_builtin(module):
    return {}
  return projections.wanted(module_path(module), own_weights(module), matches)


def trace_name(slot: projections.Slot | None) -> str:
  """The sow name of a layer's router traces in its module's scope ("trace"; a generic key's suffix after)."""
  if slot is None or slot.key == slot.module_path:
    return "trace"
  suffix = slot.key[len(slot.module_path) :].lstrip("/") if slot.module_path else slot.key
  return "trace:" + suffix.replace("/", ":")


def einsum_equation(module: nn.Module, args, kwargs) -> str:
  """The equation of an nn.Einsum call (the call's `einsum_str`, else the module's); "" for other layers."""
  if not isinstance(module, nn.Einsum):
    return ""
  given = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  return (given or module.einsum_str).replace(" ", "")


def layer_geometry(
  module: nn.Module, x, equation: str = ""
) -> tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(kind, in_shape, out_shape, axis) of a Dense/DenseGeneral/Einsum call on input x."""
  path = module_path(module)
  if isinstance(module, nn.Einsum):  # contracted and feature axes of the kernel
    in_shape, out_shape = einsum_layers.widths(einsum_layers.parse(equation, x.ndim, path), module.shape)
    return "Einsum", in_shape, out_shape, ()
  if isinstance(module, nn.Dense):
    return "Dense", (int(x.shape[-1]),), (int(module.features),), (-1,)
  if getattr(module, "batch_dims", ()):
    raise ValueError(
      f"layer {path!r} is an nn.DenseGeneral with batch_dims={module.batch_dims}: its kernel "
      "differs per batch index, so one adapter cannot stand for it; leave it out of target_modules."
    )
  axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
  axis = tuple(int(a) - x.ndim if int(a) >= 0 else int(a) for a in axis)  # negative, kernel order
  features = module.features if isinstance(module.features, Sequence) else (module.features,)
  return "DenseGeneral", tuple(int(x.shape[a]) for a in axis), tuple(int(f) for f in features), axis


def path_keys(path: str) -> list[str]:
  """Module path "a/b" -> ["a", "b"]; the root module's path "" -> []."""
  return path.split("/") if path else []


def tree_get(tree, path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree


def discover(
  model: nn.Module,
  params,
  example_args: Sequence[Any],
  target_modules: str | Sequence[str],
  example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[tuple[LayerInfo, ...], tuple[projections.Slot, ...], list[str]]:
  """(layers in call order, the generic layers' slots, one error text per matched generic weight that cannot
  be adapted: stacked experts, a refused equation, no intercepted contraction)."""
  matches = path_matcher(target_modules)
  found: dict[str, LayerInfo] = {}
  slots: dict[str, projections.Slot] = {}
  hit_keys: set[tuple[str, str]] = set()
  frames: list[projections.Frame] = []
  failures: list[str] = []

  def on_hit(frame, hit):
    hit_keys.add((frame.module_path, hit.param))
    try:
      pairs = projections.layers_of(hit, frame.module_path, matches)
    except ValueError as error:
      failures.append(str(error))
      return
    for slot, info in pairs:
      if slot.key not in found:
        found[slot.key], slots[slot.key] = info, slot

  def record(next_fun, args, kwargs, context):
    if projections.is_quiet():
      return next_fun(*args, **kwargs)
    if not is_linear_call(context):
      top = projections.top()
      if top is not None and top.owner is context.module:
        return next_fun(*args, **kwargs)
      weights = generic_weights(context, matches)
      frame = projections.Frame(module_path(context.module), weights, owner=context.module, on_hit=on_hit)
      if weights:
        frames.append(frame)
      with projections.frame(frame):
        return next_fun(*args, **kwargs)
    path = module_path(context.module)
    if matches(path) and path not in found:
      x = call_input(args, kwargs)
      equation = einsum_equation(context.module, args, kwargs)
      kind, in_shape, out_shape, axis = layer_geometry(context.module, x, equation)
      seen = tuple(context.module.get_variable("params", "kernel").shape)
      try:
        stored = tuple(np.shape(tree_get(params, [str(p) for p in context.module.path] + ["kernel"])))
      except (KeyError, TypeError):
        stored = seen
      stack = adapt_core.stack_of(path, stored, seen, STACK_TRANSFORM, STACK_FIX)
      found[path] = LayerInfo.of_shapes(path, kind, in_shape, out_shape, axis, equation, stack)
    with projections.frame(projections.Frame(owner=context.module)):
      return next_fun(*args, **kwargs)

  with nn.intercept_methods(record), projections.intercepting():
    jax.eval_shape(lambda p, *a: run_model(model, {"params": p}, a, example_kwargs or {}), params, *example_args)
  for key, slot in slots.items():  # a generic layer of a stack: its weight's leading axes
    try:
      stored = np.shape(tree_get(params, path_keys(slot.module_path) + [slot.param]))
    except (KeyError, TypeError):
      continue
    found[key] = dataclasses.replace(
      found[key], stack=adapt_core.stack_of(key, stored, slot.shape, STACK_TRANSFORM, STACK_FIX)
    )
  problems, seen_keys = list(failures), set()
  for frame in frames:  # matched weights whose contraction no frame adapted
    for name, value in frame.weights.items():
      if (frame.module_path, name) in hit_keys or (frame.module_path, name) in seen_keys:
        continue
      seen_keys.add((frame.module_path, name))
      problems.append(
        projections.problem(frame.module_path, name, value.shape, frame.problems.get(name), name in frame.slices)
      )
  return tuple(found.values()), tuple(slots.values()), problems


def module_paths(params) -> list[str]:
  """ "/"-joined module paths that hold leaves directly (e.g. "head" for head/kernel, head/bias)."""
  paths = []
  for leaf_path, _ in params_lib.leaf_paths(params):
    module = leaf_path.rpartition("/")[0]
    if module not in paths:
      paths.append(module)
  return paths
