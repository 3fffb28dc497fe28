"""Helpers for config files: the typed variant string of `get_config(arg)` (big_vision style)."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'quick,seeds=3,methods=lora+cellwise_moe' against typed defaults.

  A bare word sets a boolean default to True ('quick'); 'key=value' is cast to the default's type;
  '+' separates list items in strings. Unknown keys are an error that lists the valid ones.
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
      result[key] = raw.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      result[key] = int(raw)
    elif isinstance(default, float):
      result[key] = float(raw)
    else:
      result[key] = raw.replace("+", ",")
  return result


def split_names(names: str) -> list[str]:
  """'lora, melora' -> ['lora', 'melora']."""
  return [n.strip() for n in names.split(",") if n.strip()]


def explain_bad_override(argv: list[str]) -> str | None:
  """For a failed `--config.a.b=v` override: which field does not exist, and which ones do.

  Loads the config file named by --config (path.py[:arg]) and walks every override's dotted path.
  Returns a message, or None if every override path exists (the failure was something else).
  """
  import importlib.util

  spec_arg = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec_arg = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec_arg = argv[i + 1]
  if not spec_arg:
    return None
  path, _, variant = spec_arg.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_for_errors", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  for arg in argv:
    if not arg.startswith("--config.") or arg.startswith("--config=") :
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, "config"
    for part in dotted.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        close = [k for k in keys if part.lower()[:3] in k.lower() or k.lower()[:3] in part.lower()]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return (f"--config.{dotted}: {walked} has no field {part!r} (configs are locked, so a typo cannot "
                f"add one). Fields of {walked}: {sorted(keys)}.{hint}")
      node, walked = node[part], f"{walked}.{part}"
  return None
