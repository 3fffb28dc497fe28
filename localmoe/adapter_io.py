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
both shapes. Arrays are stored in their own dtype (float32 by default); a tensor of another dtype or shape
than the model needs, or one the adapter does not have, is an error naming the file and the tensor. The
trainable extras (`trainable_extras`, e.g. a task head) are saved with the adapter and loaded back with it.

Saving checks `trainable` against the adapted model (every adapter and extra tensor, shape and dtype)
before anything is written, and writes the pair atomically: both files go into a fresh temporary
directory beside `directory`, which is then renamed into place (an existing adapter directory is swapped
out and removed), so a crash leaves the old pair or the new pair, never one file of each. The directory is
the adapter's own: one that holds other files is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import adapt_core
from localmoe import inject
from localmoe import params as params_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "localmoe-adapter/1"


def _flatten(tree: Any) -> dict[str, np.ndarray]:
  """{"/"-joined path: leaf}; arrays are fetched to numpy, shape structs kept as they are."""
  return {
    path: leaf if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(jax.device_get(leaf))
    for path, leaf in params_lib.leaf_paths(tree)
  }


def _write_pair(directory: str, flat: dict[str, np.ndarray], config: dict) -> None:
  """Writes both files into a temporary sibling directory, then renames it to `directory` (atomic pair)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  directory = os.path.normpath(directory)
  parent, name = os.path.split(os.path.abspath(directory))
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
  except OSError as error:
    raise ValueError(
      f"save_adapter: cannot create a directory in {parent} ({error.strerror or error}): pass a "
      "path on a writable file system (e.g. under your run's work directory)."
    ) from None
  old = None
  try:
    save_file(flat, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": FORMAT})
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(json.dumps(config, indent=2) + "\n")
    mode = 0o666 & ~_umask()
    for file in (WEIGHTS_FILE, CONFIG_FILE):
      os.chmod(os.path.join(tmp, file), mode)
    os.chmod(tmp, 0o777 & ~_umask())
    if os.path.isdir(directory):  # swap the old pair out, the new one in, then drop the old
      old = tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-")
      os.rename(directory, os.path.join(old, name))
    os.rename(tmp, directory)
  finally:
    if old is not None:
      moved = os.path.join(old, name)
      if not os.path.exists(directory) and os.path.exists(moved):
        os.rename(moved, directory)  # the new pair did not land: the old one goes back
      shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _check_target(directory: str) -> None:
  """`directory` must be a new path or an adapter directory of its own, below directories (not files)."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(
      f"save_adapter: {directory} is a file, not a directory: pass a new directory path "
      f"(save_adapter writes {WEIGHTS_FILE} and {CONFIG_FILE} into it), or remove the file."
    )
  above = os.path.dirname(os.path.abspath(directory))
  while above and not os.path.exists(above):
    above = os.path.dirname(above)
  if above and not os.path.isdir(above):
    raise ValueError(
      f"save_adapter: {above} is a file, so nothing can be written under it: pass a directory "
      "path whose parents are directories."
    )
  if os.path.isdir(directory):
    others = sorted(set(os.listdir(directory)) - {WEIGHTS_FILE, CONFIG_FILE})
    if others:
      raise ValueError(
        f"save_adapter: {directory} holds other files ({', '.join(others[:3])}): the adapter pair is "
        "replaced as a whole directory, so give it a directory of its own, e.g. "
        f"{os.path.join(directory, 'adapter')}."
      )


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def adapter_config(adapted: inject.AdaptedModel) -> dict:
  """The JSON description of an adapted model's adapter (what `save_adapter` writes)."""
  from localmoe import __version__  # pylint: disable=g-import-not-at-top

  if isinstance(adapted.adapter, inject.PerLayer):
    spec = adapted.adapter.to_json()
  else:
    import dataclasses  # pylint: disable=g-import-not-at-top

    spec = {"method": "queryable_lora", **dataclasses.asdict(adapted.adapter)}
    spec = adapt_core.jsonable(spec, "adapter spec")
  target = adapted.target_modules if isinstance(adapted.target_modules, str) else list(adapted.target_modules)
  return {
    "format": FORMAT,
    "localmoe_version": __version__,
    "adapter": spec,
    "target_modules": target,
    "trainable_extras": adapted.trainable_extras,
    "extra_paths": list(adapted.extra_paths),
    "layers": [layer.to_json() for layer in adapted.layers],
    "num_params": adapted.num_params(),
  }


def save_adapter(directory: str, adapted: inject.AdaptedModel, trainable: Mapping[str, Any]) -> None:
  """Writes `trainable` (one entry: no leading seed axis) and adapter_config.json into `directory`.

  Everything is checked before anything is written: the spec must be JSON-able, and `trainable` must hold
  exactly the adapter's tensors and the trainable extras, each of the model's shape and dtype; the
  directory must be new or an adapter directory (module docstring: the pair is written atomically).
  """
  config = adapter_config(adapted)  # validates that the spec is JSON-able before writing anything
  flat = _flatten(trainable)
  kernels = [jnp.zeros((layer.d_in, layer.d_out), jnp.float32) for layer in adapted.layers]
  expected = _flatten(
    {"adapter": jax.eval_shape(lambda: adapted.adapter.init(jax.random.PRNGKey(0), adapted.layers, kernels))}
  )
  got = {k: v for k, v in flat.items() if k.startswith("adapter/")}
  wrong = {k: (v.shape, expected[k].shape) for k, v in got.items() if k in expected and v.shape != expected[k].shape}
  if set(got) != set(expected) or wrong:
    raise ValueError(
      f"save_adapter: trainable does not match the adapted model (missing "
      f"{sorted(set(expected) - set(got))[:3]}, unexpected {sorted(set(got) - set(expected))[:3]}, "
      f"shapes {dict(list(wrong.items())[:3])}); pass one entry's params (e.g. fit.entry(0))."
    )
  _check_extras(adapted, flat)
  _check_target(directory)
  _write_pair(directory, flat, config)


def _check_extras(adapted: inject.AdaptedModel, flat: Mapping[str, np.ndarray]) -> None:
  """The trainable extras in `flat` must be exactly the adapted model's, with their shapes and dtypes."""
  want = {path: (shape, dtype) for path, shape, dtype in adapted.extra_leaves}
  got = {k: v for k, v in flat.items() if not k.startswith("adapter/")}
  missing = sorted(set(want) - set(got))
  if missing:
    raise ValueError(
      f"save_adapter: trainable lacks {missing[0]!r} ({len(missing)} trainable-extras tensors "
      f"missing; trainable_extras={adapted.trainable_extras!r}): pass the whole trainable dict "
      "that inject or training returned, {'adapter': ..., 'extras': ...}."
    )
  unexpected = sorted(set(got) - set(want))
  if unexpected:
    raise ValueError(
      f"save_adapter: trainable has {unexpected[0]!r}, which is neither an adapter tensor nor a "
      f"trainable extra of this model (trainable_extras={adapted.trainable_extras!r}): pass the "
      "trainable dict of this adapted model."
    )
  for path, (shape, dtype) in want.items():
    leaf = got[path]
    if tuple(leaf.shape) != tuple(shape) or jnp.dtype(leaf.dtype).name != dtype:
      raise ValueError(
        f"save_adapter: {path!r} is {jnp.dtype(leaf.dtype).name}{list(leaf.shape)} but the model's "
        f"param is {dtype}{list(shape)}: pass the trainable extras of this model, as trained."
      )


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: point load_adapter at a directory written by save_adapter.")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ValueError(f"{path} is not readable JSON ({error}): re-save the adapter.") from None
  if not isinstance(config, dict):
    raise ValueError(
      f"{path} holds a JSON {type(config).__name__}, not an adapter config object: point "
      "load_adapter at a directory written by save_adapter, or re-save the adapter."
    )
  if config.get("format") != FORMAT:
    raise ValueError(f"{path} has format {config.get('format')!r}; this localmoe reads {FORMAT!r}.")
  for key, kind in (("adapter", (dict, list)), ("target_modules", (str, list)), ("layers", list)):
    if not isinstance(config.get(key), kind):
      state = "lacks" if key not in config else f"has a {type(config[key]).__name__} for"
      raise ValueError(
        f"{path} {state} {key!r}: it was not written by save_adapter (or was edited); re-save the adapter."
      )
  return config


def check_layers(config: Mapping[str, Any], found: Mapping[str, Any], target) -> None:
  """The model's matched layers `found` ({path: LayerInfo}) must equal the saved ones, path and shape."""
  saved = {layer["path"]: layer for layer in config["layers"]}
  for path, layer in saved.items():
    if path not in found:
      raise ValueError(
        f"the saved adapter has layer {path!r} ({layer['kind']} {layer['in_shape']} -> "
        f"{layer['out_shape']}) but target_modules={target!r} matches no such layer on this model."
      )
    here = found[path].to_json()
    if (here["in_shape"], here["out_shape"]) != (layer["in_shape"], layer["out_shape"]):
      raise ValueError(
        f"layer {path!r}: the saved adapter was built for {layer['in_shape']} -> "
        f"{layer['out_shape']} but this model's layer is {here['in_shape']} -> {here['out_shape']}."
      )
    if here.get("stack", []) != layer.get("stack", []):
      raise ValueError(
        f"layer {path!r}: the saved adapter was built for a stack of {layer.get('stack', [])} layers "
        f"([] for one layer) but this model's layer is stacked {here.get('stack', [])}."
      )
  extra = sorted(set(found) - set(saved))
  if extra:
    raise ValueError(
      f"this model has layer {extra[0]!r} matching target_modules={target!r} that the saved adapter "
      f"does not have ({len(extra)} such layers): the adapter was saved from another model."
    )


def spec_and_target(config: Mapping[str, Any]) -> tuple[Any, str | tuple[str, ...]]:
  """The adapter spec (a dict, or (pattern, spec) rules) and target_modules of a read config."""
  spec = config["adapter"]
  target = config["target_modules"]
  return (
    [tuple(rule) for rule in spec] if isinstance(spec, list) else spec,
    target if isinstance(target, str) else tuple(target),
  )


def read_tensors(directory: str) -> tuple[str, dict[str, np.ndarray]]:
  """(path of the weights file, {name: array}); a missing or unreadable file is one ValueError."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  weights_path = os.path.join(directory, WEIGHTS_FILE)
  try:
    return weights_path, load_file(weights_path)
  except FileNotFoundError:
    raise ValueError(
      f"{weights_path} does not exist: the directory lacks the weights written by save_adapter; re-save the adapter."
    ) from None
  except Exception as error:  # safetensors raises SafetensorError (and others) on bad files
    raise ValueError(
      f"{weights_path} is not a readable safetensors file ({type(error).__name__}: "
      f"{str(error).splitlines()[0] if str(error) else 'no detail'}): it is truncated or "
      "corrupt; re-save the adapter."
    ) from None


def check_tensors(
  weights_path: str, arrays: Mapping[str, np.ndarray], expected: Mapping[str, Any], trainable_extras
) -> None:
  """`arrays` must hold exactly the tensors `expected` ({name: leaf with shape and dtype}), of their shape
  and dtype; the first that differs is a ValueError naming the file and the tensor."""
  for name, leaf in expected.items():
    if name not in arrays:
      raise ValueError(f"{weights_path} lacks {name!r}: the file and {CONFIG_FILE} disagree; re-save the adapter.")
    if arrays[name].shape != tuple(leaf.shape):
      raise ValueError(f"{name}: saved shape {arrays[name].shape} but this model needs {tuple(leaf.shape)}.")
    if arrays[name].dtype != leaf.dtype:
      raise ValueError(
        f"{weights_path}: tensor {name!r} is {arrays[name].dtype} but this model needs "
        f"{jnp.dtype(leaf.dtype).name}: re-save the adapter from params of that dtype (the "
        "spec's param_dtype), or cast the file's tensors."
      )
  unknown = sorted(set(arrays) - set(expected))
  if unknown:
    raise ValueError(
      f"{weights_path} holds tensor {unknown[0]!r} ({len(unknown)} such) that the adapter of "
      f"{CONFIG_FILE} does not have (trainable_extras={trainable_extras!r}): the file "
      "and the config disagree; re-save the adapter."
    )


def load_adapter(
  directory: str, model, frozen_params, *example_args, example_kwargs=None, key: jax.Array | None = None
) -> tuple[inject.AdaptedModel, dict]:
  """Attaches the saved adapter to `model` and returns (adapted, trainable) with the saved arrays.

  The model's matched layers (found with `example_args`) must equal the saved ones, path by path and shape
  by shape; otherwise a ValueError names the first layer that differs and both shapes, before anything is
  loaded or applied.
  """
  config = read_config(directory)
  adapter, target = spec_and_target(config)
  layers = inject.find_layers(model, frozen_params, example_args, target, example_kwargs)
  check_layers(config, {layer.path: layer for layer in layers}, target)
  adapted, template = inject.inject(
    model,
    frozen_params,
    adapter,
    *example_args,
    target_modules=target,
    key=jax.random.PRNGKey(0) if key is None else key,
    trainable_extras=config.get("trainable_extras"),
    example_kwargs=example_kwargs,
  )
  weights_path, arrays = read_tensors(directory)
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [
    "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path) for key_path, _ in leaves_with_paths
  ]
  check_tensors(
    weights_path, arrays, {n: leaf for n, (_, leaf) in zip(names, leaves_with_paths)}, config.get("trainable_extras")
  )
  return adapted, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[n]) for n in names])


def export_peft(
  directory: str, adapted: inject.AdaptedModel, trainable: Mapping[str, Any], family: str = "bert"
) -> None:
  """PEFT's adapter_model.safetensors + adapter_config.json for a LoRA/DoRA adapter (`localmoe.export`)."""
  from localmoe import export  # pylint: disable=g-import-not-at-top

  export.export_peft(directory, adapted, trainable, family)
