"""Saving an adapter on its own and loading it back onto a model (PEFT's `save_pretrained`/`from_pretrained`).

An adapter directory holds two files:

  adapter.safetensors    every trainable array (the adapters' params and the trainable extras), keyed by its
                         "/"-joined path, e.g. "adapter/encoder/layer_0/attention/self/query/A"
  adapter_config.json    the adapter spec (method and every field, or the per-layer rules), target_modules,
                         trainable_extras, the matched layers with their kinds and shapes, localmoe's version

  save_adapter("runs/x/adapter", adapted, trainable)
  adapted, trainable = load_adapter("runs/x/adapter", model, frozen_params, *example_inputs)

Loading re-discovers the matched layers on the given model and compares them with the saved ones before
anything is applied: a missing or extra layer, or a layer of another shape, is an error naming the layer and
both shapes. Arrays are stored in their own dtype (float32 by default).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import inject
from localmoe import params as params_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "localmoe-adapter/1"


def _flatten(tree: Any) -> dict[str, np.ndarray]:
  """{"/"-joined path: leaf}; arrays are fetched to numpy, shape structs kept as they are."""
  return {path: leaf if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(jax.device_get(leaf))
          for path, leaf in params_lib.leaf_paths(tree)}


def _atomic_write(path: str, write) -> None:
  directory = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def adapter_config(adapted: inject.AdaptedModel) -> dict:
  """The JSON description of an adapted model's adapter (what `save_adapter` writes)."""
  from localmoe import __version__            # pylint: disable=g-import-not-at-top
  if isinstance(adapted.adapter, inject.PerLayer):
    spec = adapted.adapter.to_json()
  else:
    import dataclasses                         # pylint: disable=g-import-not-at-top
    spec = {"method": "queryable_lora", **dataclasses.asdict(adapted.adapter)}
    spec = inject._jsonable(spec, "adapter spec")   # pylint: disable=protected-access
  target = adapted.target_modules if isinstance(adapted.target_modules, str) else list(adapted.target_modules)
  return {"format": FORMAT, "localmoe_version": __version__, "adapter": spec, "target_modules": target,
          "trainable_extras": adapted.trainable_extras, "extra_paths": list(adapted.extra_paths),
          "layers": [layer.to_json() for layer in adapted.layers], "num_params": adapted.num_params()}


def save_adapter(directory: str, adapted: inject.AdaptedModel, trainable: Mapping[str, Any]) -> None:
  """Writes `trainable` (one entry: no leading seed axis) and adapter_config.json into `directory`."""
  from safetensors.numpy import save_file     # pylint: disable=g-import-not-at-top
  config = adapter_config(adapted)            # validates that the spec is JSON-able before writing anything
  flat = _flatten(trainable)
  kernels = [jnp.zeros((layer.d_in, layer.d_out), jnp.float32) for layer in adapted.layers]
  expected = _flatten({"adapter": jax.eval_shape(
      lambda: adapted.adapter.init(jax.random.PRNGKey(0), adapted.layers, kernels))})
  got = {k: v for k, v in flat.items() if k.startswith("adapter/")}
  wrong = {k: (v.shape, expected[k].shape) for k, v in got.items() if k in expected and v.shape != expected[k].shape}
  if set(got) != set(expected) or wrong:
    raise ValueError(f"save_adapter: trainable does not match the adapted model (missing "
                     f"{sorted(set(expected) - set(got))[:3]}, unexpected {sorted(set(got) - set(expected))[:3]}, "
                     f"shapes {dict(list(wrong.items())[:3])}); pass one entry's params (e.g. fit.entry(0)).")
  os.makedirs(directory, exist_ok=True)
  _atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda tmp: save_file(flat, tmp, metadata={"format": FORMAT}))
  _atomic_write(os.path.join(directory, CONFIG_FILE),
                lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(config, indent=2) + "\n"))


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: point load_adapter at a directory written by save_adapter.")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ValueError(f"{path} is not readable JSON ({error}): re-save the adapter.") from None
  if config.get("format") != FORMAT:
    raise ValueError(f"{path} has format {config.get('format')!r}; this localmoe reads {FORMAT!r}.")
  return config


def load_adapter(directory: str, model, frozen_params, *example_args, example_kwargs=None,
                 key: jax.Array | None = None) -> tuple[inject.AdaptedModel, dict]:
  """Attaches the saved adapter to `model` and returns (adapted, trainable) with the saved arrays.

  The model's matched layers (found with `example_args`) must equal the saved ones, path by path and shape
  by shape; otherwise a ValueError names the first layer that differs and both shapes, before anything is
  loaded or applied.
  """
  from safetensors.numpy import load_file     # pylint: disable=g-import-not-at-top
  config = read_config(directory)
  spec = config["adapter"]
  adapter = [tuple(rule) for rule in spec] if isinstance(spec, list) else spec
  target = config["target_modules"]
  target = target if isinstance(target, str) else tuple(target)
  layers = inject.find_layers(model, frozen_params, example_args, target, example_kwargs)
  saved = {layer["path"]: layer for layer in config["layers"]}
  found = {layer.path: layer for layer in layers}
  for path, layer in saved.items():
    if path not in found:
      raise ValueError(f"the saved adapter has layer {path!r} ({layer['kind']} {layer['in_shape']} -> "
                       f"{layer['out_shape']}) but target_modules={target!r} matches no such layer on this model.")
    here = found[path].to_json()
    if (here["in_shape"], here["out_shape"]) != (layer["in_shape"], layer["out_shape"]):
      raise ValueError(f"layer {path!r}: the saved adapter was built for {layer['in_shape']} -> "
                       f"{layer['out_shape']} but this model's layer is {here['in_shape']} -> {here['out_shape']}.")
  extra = sorted(set(found) - set(saved))
  if extra:
    raise ValueError(f"this model has layer {extra[0]!r} matching target_modules={target!r} that the saved adapter "
                     f"does not have ({len(extra)} such layers): the adapter was saved from another model.")
  adapted, template = inject.inject(model, frozen_params, adapter, *example_args, target_modules=target,
                                    key=jax.random.PRNGKey(0) if key is None else key,
                                    trainable_extras=config.get("trainable_extras"), example_kwargs=example_kwargs)
  arrays = load_file(os.path.join(directory, WEIGHTS_FILE))
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  values = []
  for key_path, leaf in leaves_with_paths:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)
    if name not in arrays:
      raise ValueError(f"{os.path.join(directory, WEIGHTS_FILE)} lacks {name!r}: the file and "
                       f"{CONFIG_FILE} disagree; re-save the adapter.")
    if arrays[name].shape != leaf.shape:
      raise ValueError(f"{name}: saved shape {arrays[name].shape} but this model needs {tuple(leaf.shape)}.")
    values.append(jnp.asarray(arrays[name]))
  return adapted, jax.tree_util.tree_unflatten(treedef, values)
