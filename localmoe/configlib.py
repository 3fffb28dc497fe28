"""Helpers for config files: the typed variant string of `get_config(arg)` (big_vision style)."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'quick,seeds=3,methods=lora+cellwise_moe' against typed defaults.

  A bare word sets a boolean default to True ('quick'); 'key=value' is cast to the default's type (booleans
  accept true/false, yes/no, on/off, 1/0; anything else, e.g. 'quick=ture', is an error); '+' separates
  list items in strings. Unknown keys are an error that lists the valid ones.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for token in arg.split(","):
    token = token.strip()
    if not token:
      continue
    key, _, raw = token.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is not known; valid: {sorted(defaults)}.")
    default = defaults[key]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...).")
      result[key] = True
    elif isinstance(default, bool):
      if raw.lower() not in _TRUE + _FALSE:
        raise ValueError(
          f"config arg {key}={raw!r} is not a boolean: use {key}=true or {key}=false (or the bare word '{key}')."
        )
      result[key] = raw.lower() in _TRUE
    elif isinstance(default, (int, float)):
      try:
        result[key] = type(default)(raw)
      except ValueError:
        raise ValueError(
          f"config arg {key}={raw!r} is not {'an integer' if isinstance(default, int) else 'a number'} "
          f"(default {default!r})."
        ) from None
    else:
      result[key] = raw.replace("+", ",")
  return result


def groups_field(default: Any = "") -> ml_collections.FieldReference:
  """The `config.optim.groups` field (parameter groups, `localmoe.train.settings`): a string on the command line
  (preset names joined by "+", or a literal list of rules), and in a config file also a list of rule dicts or a
  dict of named rules (which a sweep can address: "optim.groups.router.lr_mult"). Typed `object`, so a locked
  config accepts each of these."""
  return ml_collections.FieldReference(default, field_type=object)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config (path.py[:arg]) in argv, or None."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def load_config_module(path: str, name: str = "_config_check"):
  """Imports a config file; a ValueError (one line) if it is missing, does not parse, or fails to import."""
  import importlib.util
  import os

  if not os.path.isfile(path):
    raise ValueError(f"--config={path}: no such file (give the path of a config file, e.g. configs/svd_simulation.py).")
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"--config={path}: not a Python file.")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as error:
    raise ValueError(f"--config={path}: syntax error at line {error.lineno}: {error.msg}.") from None
  except Exception as error:  # an import error inside the config file
    raise ValueError(f"--config={path}: importing it failed ({type(error).__name__}: {error}).") from None
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"--config={path} defines no get_config(arg=None): add one returning the ConfigDict.")
  return module


def check_config_file(argv: list[str]) -> str | None:
  """A one-line message if the --config file of argv is missing, broken, lacks get_config, or its
  get_config(arg) rejects the arg; None if it loads (absl then parses it again)."""
  spec = _config_spec(argv)
  if not spec:
    return None
  path, _, variant = spec.partition(":")
  try:
    module = load_config_module(path)
    module.get_config(variant or None)
  except ValueError as error:
    return str(error) if str(error).startswith("--config") else f"--config={spec}: {error}"
  return None


def split_names(names: str) -> list[str]:
  """'lora, melora' -> ['lora', 'melora']."""
  return [n.strip() for n in names.split(",") if n.strip()]


def explain_bad_override(argv: list[str]) -> str | None:
  """For a failed `--config.a.b=v` override: which field does not exist, and which ones do.

  Loads the config file named by --config (path.py[:arg]) and walks every override's dotted path.
  Returns a message, or None if every override path exists (the failure was something else).
  """
  spec_arg = _config_spec(argv)
  if not spec_arg:
    return None
  path, _, variant = spec_arg.partition(":")
  try:
    config = load_config_module(path, "_config_for_errors").get_config(variant or None)
  except ValueError:
    return None
  for arg in argv:
    if not arg.startswith("--config.") or arg.startswith("--config="):
      continue
    dotted = arg[len("--config.") :].split("=", 1)[0]
    node, walked = config, "config"
    for part in dotted.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        close = [k for k in keys if part.lower()[:3] in k.lower() or k.lower()[:3] in part.lower()]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return (
          f"--config.{dotted}: {walked} has no field {part!r} (configs are locked, so a typo cannot "
          f"add one). Fields of {walked}: {sorted(keys)}.{hint}"
        )
      node, walked = node[part], f"{walked}.{part}"
  return None
