"""Adapter files (localmoe.adapter_io): round trips with trainable extras, checks before writing, the atomic
pair, and one clear line for every unreadable or mismatched file."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from localmoe import adapter_io, inject

LORA = {"method": "lora", "rank": 2}


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(8, name="hidden")(x)))


@pytest.fixture(scope="module")
def net():
  model = _Net()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  frozen = model.init(jax.random.PRNGKey(1), x)["params"]
  adapted, trainable = inject.inject(
    model, frozen, LORA, x[:1], target_modules=["hidden"], key=jax.random.PRNGKey(2), trainable_extras="head"
  )
  trained = jax.tree_util.tree_map(lambda a: a + 0.5, trainable)  # moved away from the frozen values
  return model, frozen, x, adapted, trained


def _saved(tmp_path, net, name="adapter"):
  model, frozen, x, adapted, trained = net
  directory = str(tmp_path / name)
  adapter_io.save_adapter(directory, adapted, trained)
  return directory


def _one_line(error):
  assert "\n" not in str(error.value), str(error.value)
  return str(error.value)


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.slow
@pytest.mark.parametrize("extras", ["head", ["head"]], ids=["regex", "list"])
def test_trainable_extras_are_saved_and_loaded_without_being_named_again(tmp_path, net, extras):
  model, frozen, x, _, _ = net
  adapted, trainable = inject.inject(
    model, frozen, LORA, x[:1], target_modules=["hidden"], key=jax.random.PRNGKey(2), trainable_extras=extras
  )
  trained = jax.tree_util.tree_map(lambda a: a + 0.5, trainable)
  adapter_io.save_adapter(str(tmp_path / "a"), adapted, trained)
  again, loaded = adapter_io.load_adapter(str(tmp_path / "a"), model, frozen, x[:1])  # no trainable_extras here
  assert again.extra_paths == ("head",)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(trained)):
    np.testing.assert_array_equal(a, b)  # the trained head, not the frozen one
  np.testing.assert_array_equal(again.apply(frozen, loaded, x), adapted.apply(frozen, trained, x))


def test_resaving_replaces_the_pair_and_leaves_no_temporary_directories(tmp_path, net):
  model, frozen, x, adapted, trained = net
  directory = _saved(tmp_path, net)
  changed = jax.tree_util.tree_map(lambda a: a * 2, trained)
  adapter_io.save_adapter(directory, adapted, changed)
  _, loaded = adapter_io.load_adapter(directory, model, frozen, x[:1])
  np.testing.assert_array_equal(loaded["adapter"]["hidden"]["A"], changed["adapter"]["hidden"]["A"])
  assert sorted(os.listdir(tmp_path)) == ["adapter"]
  assert sorted(os.listdir(directory)) == [adapter_io.WEIGHTS_FILE, adapter_io.CONFIG_FILE]


# ------------------------------------------------------------------------------------------- checks before writing


def test_trainable_without_its_extras_is_refused_before_writing(tmp_path, net):
  _, _, _, adapted, trained = net
  with pytest.raises(ValueError) as error:
    adapter_io.save_adapter(str(tmp_path / "a"), adapted, {"adapter": trained["adapter"]})
  assert _one_line(error).startswith("save_adapter: trainable lacks 'extras/head/bias'")
  assert "trainable_extras='head'" in str(error.value) and "pass the whole trainable dict" in str(error.value)
  assert not os.path.exists(tmp_path / "a")


def test_extras_of_the_wrong_shape_are_refused_before_writing(tmp_path, net):
  _, _, _, adapted, trained = net
  bad = {
    "adapter": trained["adapter"],
    "extras": {"head": {"bias": jnp.zeros(4), "kernel": trained["extras"]["head"]["kernel"]}},
  }
  with pytest.raises(ValueError) as error:
    adapter_io.save_adapter(str(tmp_path / "a"), adapted, bad)
  assert _one_line(error).startswith(
    "save_adapter: 'extras/head/bias' is float32[4] but the model's param is "
    "float32[3]: pass the trainable extras of this model"
  )
  assert not os.path.exists(tmp_path / "a")


def test_saving_onto_or_under_a_file_names_the_file(tmp_path, net):
  _, _, _, adapted, trained = net
  file = tmp_path / "notes.txt"
  file.write_text("x")
  with pytest.raises(ValueError) as error:
    adapter_io.save_adapter(str(file), adapted, trained)
  assert _one_line(error) == (
    f"save_adapter: {file} is a file, not a directory: pass a new directory path "
    "(save_adapter writes adapter.safetensors and adapter_config.json into it), or "
    "remove the file."
  )
  with pytest.raises(ValueError) as error:
    adapter_io.save_adapter(str(file / "adapter"), adapted, trained)
  assert _one_line(error).startswith(f"save_adapter: {file} is a file, so nothing can be written under it")
  assert file.read_text() == "x"


def test_a_directory_holding_other_files_is_refused(tmp_path, net):
  _, _, _, adapted, trained = net
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text("{}")
  with pytest.raises(ValueError) as error:
    adapter_io.save_adapter(str(tmp_path / "run"), adapted, trained)
  assert _one_line(error).startswith(f"save_adapter: {tmp_path / 'run'} holds other files (results.json)")
  assert str(tmp_path / "run" / "adapter") in str(error.value)
  assert os.listdir(tmp_path / "run") == ["results.json"]


# ------------------------------------------------------------------------------------------- the atomic pair


@pytest.mark.parametrize("fail_at", ["config", "rename"])
def test_a_failed_save_keeps_the_old_pair_whole(tmp_path, net, monkeypatch, fail_at):
  model, frozen, x, adapted, trained = net
  directory = _saved(tmp_path, net)
  before = {name: (tmp_path / "adapter" / name).read_bytes() for name in os.listdir(directory)}
  if fail_at == "config":  # the weights are written, then the config write fails
    monkeypatch.setattr(adapter_io.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
  else:  # the old pair moved out, then the new one cannot move in
    real_rename, calls = os.rename, []

    def rename(src, dst):
      calls.append(src)
      if len(calls) == 2:
        raise OSError("crash between the renames")
      real_rename(src, dst)

    monkeypatch.setattr(adapter_io.os, "rename", rename)
  with pytest.raises(OSError):
    adapter_io.save_adapter(directory, adapted, jax.tree_util.tree_map(lambda a: a * 3, trained))
  monkeypatch.undo()
  assert {name: (tmp_path / "adapter" / name).read_bytes() for name in os.listdir(directory)} == before
  assert sorted(os.listdir(tmp_path)) == ["adapter"]
  _, loaded = adapter_io.load_adapter(directory, model, frozen, x[:1])
  np.testing.assert_array_equal(loaded["adapter"]["hidden"]["A"], trained["adapter"]["hidden"]["A"])


# ------------------------------------------------------------------------------------------- unreadable files


def test_truncated_weights_are_one_line_naming_the_file(tmp_path, net):
  model, frozen, x, _, _ = net
  directory = _saved(tmp_path, net)
  path = os.path.join(directory, adapter_io.WEIGHTS_FILE)
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  with pytest.raises(ValueError) as error:
    adapter_io.load_adapter(directory, model, frozen, x[:1])
  line = _one_line(error)
  assert line.startswith(f"{path} is not a readable safetensors file (SafetensorError: ")
  assert line.endswith("): it is truncated or corrupt; re-save the adapter.")


@pytest.mark.parametrize(
  "config, message",
  [
    (
      [1, 2],
      "holds a JSON list, not an adapter config object: point load_adapter at a directory written by "
      "save_adapter, or re-save the adapter.",
    ),
    ("no layers", "lacks 'layers': it was not written by save_adapter (or was edited); re-save the adapter."),
  ],
)
def test_config_that_is_not_an_adapter_config_is_one_line(tmp_path, net, config, message):
  model, frozen, x, _, _ = net
  directory = _saved(tmp_path, net)
  path = os.path.join(directory, adapter_io.CONFIG_FILE)
  if config == "no layers":
    config = json.load(open(path))
    del config["layers"]
  json.dump(config, open(path, "w"))
  with pytest.raises(ValueError) as error:
    adapter_io.load_adapter(directory, model, frozen, x[:1])
  assert _one_line(error) == f"{path} {message}"


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_a_tensor_of_another_dtype_is_refused(tmp_path, net, dtype):
  model, frozen, x, _, _ = net
  directory = _saved(tmp_path, net)
  path = os.path.join(directory, adapter_io.WEIGHTS_FILE)
  arrays = load_file(path)
  arrays["adapter/hidden/A"] = arrays["adapter/hidden/A"].astype(dtype)
  save_file(arrays, path, metadata={"format": adapter_io.FORMAT})
  with pytest.raises(ValueError) as error:
    adapter_io.load_adapter(directory, model, frozen, x[:1])
  assert _one_line(error) == (
    f"{path}: tensor 'adapter/hidden/A' is {np.dtype(dtype).name} but this model needs "
    "float32: re-save the adapter from params of that dtype (the spec's param_dtype), "
    "or cast the file's tensors."
  )


def test_an_unknown_tensor_is_refused(tmp_path, net):
  model, frozen, x, _, _ = net
  directory = _saved(tmp_path, net)
  path = os.path.join(directory, adapter_io.WEIGHTS_FILE)
  arrays = load_file(path)
  arrays["extras/other/kernel"] = np.zeros((2, 2), np.float32)
  save_file(arrays, path, metadata={"format": adapter_io.FORMAT})
  with pytest.raises(ValueError) as error:
    adapter_io.load_adapter(directory, model, frozen, x[:1])
  assert _one_line(error) == (
    f"{path} holds tensor 'extras/other/kernel' (1 such) that the adapter of "
    "adapter_config.json does not have (trainable_extras='head'): the file and the "
    "config disagree; re-save the adapter."
  )
