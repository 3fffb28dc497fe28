"""The setting of the paper's three experiments: adapters on one frozen linear layer, routed by a context.

  y_hat = W0 x + Delta(x; context)        (Eq. 9), trained with MSE against y = W_target^(context) x.

`run_methods` trains every requested method on the same data (all seeds vmapped per method) and returns
results.json entries; a method that fails to build or train is reported with its reason and the others
carry on. `run_variants` repeats that over an experiment's variants (spectra, scalings, target families);
`validate_methods` is the config check every such driver shares.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import adapters
from localmoe import checkpoint
from localmoe import configlib
from localmoe import results
from localmoe import routing
from localmoe import runner
from localmoe import train
from localmoe.train import optimizer


def layer_task(module, d_in: int, context_dim: int) -> train.Task:
  """Task for `module` on a frozen layer: frozen = {"w0": [d_out, d_in]}, inputs = {"x", "context"}.

  A routed adapter whose routing draws noise in training (router_hard "gumbel"/"gumbel_soft", router_dropout
  > 0: `module.rng_streams`) gets those rngs at every training step, and one with a `temperature_schedule`
  gets the global step (`train.Task.rngs`, `takes_step`); evaluation is deterministic (no rngs). Any other
  adapter's task is the plain three-argument one.
  """
  x0 = jnp.zeros((1, d_in), jnp.float32)
  c0 = jnp.zeros((1, context_dim), jnp.float32)
  rng_streams = routing.rng_streams(module)
  takes_step = getattr(module, "temperature_schedule", None) is not None

  def init(key, frozen):
    del frozen
    return module.init(key, x0, c0)["params"]

  def predict(params, frozen, inputs, rngs=None, **step):
    x = inputs["x"]
    base = jnp.einsum("...d,od->...o", x, frozen["w0"])  # W0 x
    return base + module.apply({"params": params}, x, inputs["context"], rngs=rngs, **step)

  return train.Task(init=init, predict=predict, rngs=rng_streams, takes_step=takes_step)


FULL_FINETUNE = "full_finetune"  # the method name every experiment gives full fine-tuning (no adapter)


def method_spec(
  specs: Mapping[str, Mapping[str, Any]], name: str, shared: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """The spec of method `name`: the shared defaults (config.adapter) under specs[name] (config.methods).

  The one place a method name becomes a spec, for every experiment that declares its methods in the config;
  FULL_FINETUNE is a spec like any other ({"method": "full_finetune"}), built as no adapter.
  """
  if name not in specs:
    raise ValueError(
      f"config.method_names: {name!r} is not among the configured methods; valid: {sorted(specs)} (comma-separated)."
    )
  spec = dict(shared.to_dict() if hasattr(shared, "to_dict") else shared or {})
  given = specs[name]
  spec.update(given.to_dict() if hasattr(given, "to_dict") else dict(given))
  return spec


def build_method(spec: Mapping[str, Any], name: str, d_in: int, d_out: int, context_dim: int | None = None):
  """The adapter of one method's spec for a d_in -> d_out layer (None for FULL_FINETUNE): the widths and,
  for context-routed adapters, the context width are filled in; a spec that disagrees with them, or that
  `adapters.make` refuses, is a ValueError naming config.methods.<name>."""
  spec = dict(spec)
  if spec.get("method") == FULL_FINETUNE:
    return None
  fill = {"d_in": d_in, "d_out": d_out}
  routed = spec.get("method") in ("blockwise_moe", "cellwise_moe")
  if routed and spec.get("router_input", "context") == "context" and context_dim is not None:
    fill["context_dim"] = context_dim
  for field, value in fill.items():
    given = spec.pop(field, None)
    if given is not None and given != value:
      raise ValueError(
        f"config.methods.{name}.{field}={given!r} disagrees with the data ({field}={value}): "
        f"remove it (it is filled in from the data) or set it to {value}."
      )
  try:
    return adapters.make(spec, **fill)
  except ValueError as error:
    raise ValueError(f"config.methods.{name}: {error}") from None


def build_methods(
  specs: Mapping[str, Mapping[str, Any]],
  names: Sequence[str],
  d_in: int,
  d_out: int,
  context_dim: int,
  shared: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Adapters for `names` (`method_spec`, then `build_method`)."""
  if not names:
    raise ValueError(f"config.method_names: empty; valid: {sorted(specs)} (comma-separated).")
  unknown = [n for n in names if n not in specs]
  if unknown:
    raise ValueError(
      f"config.method_names: {unknown} not among the configured methods; valid: {sorted(specs)} (comma-separated)."
    )
  return {name: build_method(method_spec(specs, name, shared), name, d_in, d_out, context_dim) for name in names}


def validate_common(config, num_train: int, data_bytes: float = 0.0) -> train.Settings:
  """Checks shared by the single-layer experiments: seeds, optimisation settings, checkpoint cadence and
  memory (data_bytes: the data of all seeds, host copy; held about three times while training)."""
  if not isinstance(config.num_seeds, int) or config.num_seeds < 1:
    raise ValueError(f"config.num_seeds={config.num_seeds!r} must be a positive integer.")
  if config.seed < 0:
    raise ValueError(f"config.seed={config.seed!r} must be >= 0.")
  settings = train.Settings.from_config(config.optim)
  settings.check_batch(num_train)
  checkpoint.every_epochs(config)
  methods = max(1, len(configlib.split_names(config.get("method_names", "")))) if "method_names" in config else 1
  train.check_memory(
    3 * data_bytes + methods * train.history_bytes(config.num_seeds, settings),
    f"config.num_seeds={config.num_seeds} x the data ({data_bytes / 2**20:,.0f} MiB) and "
    f"{settings.epochs:,} epochs of history",
    "use fewer seeds, fewer samples or fewer epochs",
  )
  return settings


def validate_methods(
  config,
  num_train: int,
  data_bytes: float,
  d_in: int,
  d_out: int,
  context_dim: int,
  shared: Mapping[str, Any] | None = None,
  make_task: Callable[[Any, int, int], train.Task] | None = None,
) -> train.Settings:
  """`validate_common`, then config.adapter.alpha checked, every method of config.method_names built
  (`build_methods`; `shared`: the defaults under each spec, default config.adapter) and config.optim.groups
  checked against its parameters (`optimizer.check_groups` on `make_task(module, d_in, context_dim)`, default
  `layer_task`). Returns the settings."""
  settings = validate_common(config, num_train, data_bytes)
  shared = config.get("adapter") if shared is None else shared
  check_alpha(shared)
  modules = build_methods(
    config.methods, configlib.split_names(config.method_names), d_in, d_out, context_dim, shared=shared
  )
  make_task = make_task or layer_task
  for name, module in modules.items():  # parameter groups against each method's parameters
    optimizer.check_groups(settings, make_task(module, d_in, context_dim).init, where=f" (method {name})")
  return settings


def check_alpha(adapter) -> None:
  """config.adapter.alpha: None (scale 1) or a positive, finite number."""
  alpha = adapter.get("alpha") if hasattr(adapter, "get") else None
  if alpha is not None and not (isinstance(alpha, (int, float)) and 0 < alpha < float("inf")):
    raise ValueError(
      f"config.adapter.alpha={alpha!r} must be > 0 (the adapter's output is scaled by "
      "alpha / rank), or None for a scale of 1."
    )


def device_data(data: train.Data) -> train.Data:
  """Moves every array to the default device once, so epochs don't re-transfer them."""
  return dataclasses.replace(
    data,
    train=jax.device_put(dict(data.train)),
    test=jax.device_put(dict(data.test)),
    frozen=jax.device_put(data.frozen),
  )


def run_methods(
  modules: Mapping[str, Any],
  data: train.Data,
  seeds: Sequence[int],
  settings: train.Settings,
  d_in: int,
  context_dim: int,
  paper: Mapping[str, Mapping[str, Any]],
  log: Callable[[str], None] = print,
  parallel: int = 2,
  checkpoints: checkpoint.Policy | None = None,
  make_task: Callable[[Any, int, int], train.Task] | None = None,
  live: results.Live | None = None,
  prefix: str = "",
):
  """Trains each module on `data` for all seeds. Returns ({name: results.json entry}, {name: FitResult}).

  checkpoints: each method saves to / resumes from <checkpoints.directory>/<name> (`train.fit` with that
  policy); None trains without files (a stop request is still honoured). make_task(module, d_in,
  context_dim): the Task of one method (default `layer_task`). live: streams history.csv and TensorBoard
  scalars at every evaluation, each method under `prefix + name`.

  A method that raises is reported ("failed: ..." in its summary) and the others carry on; the caller's
  `results.write_run` then refuses to mark the run finished. `parallel` methods train at once in threads:
  XLA compiles and runs outside the GIL, and a small layer leaves CPU cores idle otherwise. Results do not
  depend on it (each method is its own program).
  """
  data = device_data(data)
  make_task = make_task or layer_task

  def train_one(method: runner.Method):
    module = modules[method.name]
    log(f"[{method.name}] {module.num_params():,} parameters, {len(seeds)} seeds, {settings.epochs} epochs")
    fit = method.fit(make_task(module, d_in, context_dim), data, seeds, settings, live_name=prefix + method.name)
    return fit, results.method_summary(module.num_params(), seeds, fit, paper.get(method.name))

  def failed(name, reason):
    return results.failed_summary(modules[name].num_params(), seeds, reason, paper.get(name))

  return runner.run_methods(
    list(modules), train_one, failed=failed, checkpoints=checkpoints, live=live, log=log, parallel=parallel
  )


@dataclasses.dataclass
class Variants:
  """What `run_variants` collected: results.json entries per variant, histories and markdown sections."""

  entries: dict  # {variant: {"methods": {name: summary}, **report's extras}}
  histories: dict  # {"<variant>/<method>": (seeds, FitResult)}
  sections: list  # one markdown section per variant, in order
  live: results.Live  # history.csv / TensorBoard of every variant's methods

  def write(
    self,
    workdir: str,
    experiment: str,
    config,
    default: str,
    wall: float,
    markdown: str,
    extra: Mapping[str, Any] | None = None,
  ) -> dict:
    """`results.write_run` with variant `default`'s methods as the run's table and every variant under
    "variants"; returns {"methods": default's, "variants", "wall_time_s"}."""
    methods = self.entries[default]["methods"]
    results.write_run(
      workdir,
      experiment,
      config,
      methods,
      self.histories,
      wall,
      markdown,
      extra={**(extra or {}), "variants": self.entries},
      live=self.live,
    )
    return {"methods": methods, "variants": self.entries, "wall_time_s": wall}


def run_variants(
  config,
  workdir: str,
  variants: Sequence[str],
  make_data: Callable[[str], tuple],
  report: Callable[..., tuple[dict, str]],
  d_in: int,
  d_out: int,
  paper: Mapping[str, Mapping[str, Any]],
  shared: Mapping[str, Any] | None = None,
  live: results.Live | None = None,
) -> Variants:
  """Trains every method of config.method_names on each variant's data, in order.

  `shared`: the defaults under each method's spec (default config.adapter). make_data(variant) -> (train.Data,
  context_dim, info); report(variant, summaries, fits, seconds, info) ->
  (extras of the variant's results.json entry, its markdown section); `seconds`: the variant's time from
  make_data to the end of training. Each variant checkpoints under its own name and streams its methods as
  "<variant>/<method>" (`live`, default a new `results.Live(workdir)`).
  """
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  settings = train.Settings.from_config(config.optim)
  names = configlib.split_names(config.method_names)
  shared = config.get("adapter") if shared is None else shared
  out = Variants({}, {}, [], live if live is not None else results.Live(workdir))
  for variant in variants:
    t0 = time.perf_counter()
    data, context_dim, info = make_data(variant)
    modules = build_methods(config.methods, names, d_in, d_out, context_dim, shared=shared)
    summaries, fits = run_methods(
      modules,
      data,
      seeds,
      settings,
      d_in,
      context_dim,
      paper,
      live=out.live,
      prefix=f"{variant}/",
      checkpoints=checkpoint.policy(config, workdir, variant),
    )
    extras, section = report(variant, summaries, fits, time.perf_counter() - t0, info)
    out.entries[variant] = {"methods": summaries, **extras}
    out.histories.update({f"{variant}/{n}": (seeds, f) for n, f in fits.items()})
    out.sections.append(section)
  return out


def split_train_test(rng: np.random.Generator, n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """A random permutation cut into (train indices, test indices)."""
  order = rng.permutation(n)
  n_test = int(round(n * test_fraction))
  return order[n_test:], order[:n_test]


def least_squares_r2(x_train, y_train, x_test, y_test) -> float:
  """Test R^2 of the best static linear map (unlimited rank, fitted on train): the static ceiling."""
  w, *_ = np.linalg.lstsq(x_train, y_train, rcond=None)
  pred = x_test @ w
  sst = np.sum((y_test - y_test.mean(0)) ** 2)
  return float(1.0 - np.sum((pred - y_test) ** 2) / sst)
