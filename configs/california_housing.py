r"""California Housing domain shift: the paper's Table 2 and Figure 2 (Section 3.2).

  python launch.py --config configs/california_housing.py --workdir runs/california
  python launch.py --config configs/california_housing.py:quick --workdir runs/california_quick   # seconds, CI
  python launch.py --config configs/california_housing.py:scalings=clip,seeds=3 --workdir runs/x

Prints per-method progress, then for each input scaling the table (test MSE and R^2, mean +- std over seeds,
beside the paper's), every seed's R^2, whether routed > static > MELoRA holds, diagnostics (target variance,
largest |z| in the test split and the share of the test SST its single largest row carries, static and routed
least-squares ceilings) and the wall time. Writes results.json, results.md, history.csv, TensorBoard events
(tb/) and Figure 2 (figure2_<scaling>.png: test R^2 per epoch, mean line, min-max band over seeds).

Stated by the paper: 8 features in two fields of 4 (demographics: MedInc, HouseAge, Population, AveOccup;
property: AveRooms, AveBedrms, Latitude, Longitude), each field normalised with its own statistics; c ~ U{0,1}
per sample; block-diagonal target for c=0, off-diagonal for c=1, 4x4 SVD blocks scaled by 0.5;
W0 ~ N(0, 0.01^2); N = 20,640; AdamW lr 5e-3, 15 epochs, batch 128; 256/256/256/260/272 parameters.

Left open by the paper, chosen here (each overridable, e.g. --config.data.clip_z=3):
  * scaling: per-feature z-scores, every feature located and scaled by its own mean/std (so each field is
    normalised only by its own statistics, a block-diagonal Sigma_diag), fitted on the train split.
    A few rows have extreme z-scores (AveOccup up to ~119), and whichever land in the test split can carry a
    large share of its SST, so static methods' per-seed R^2 swings. We therefore also run "clip" (the same
    z-scores clipped at +-clip_z = 5); both tables are reported ("robust", median/IQR, is
    available too). The first entry of data.scalings is the one results.json "methods" reports.
  * spectrum: as in our Table 1 reading, "gaussian" singular values of G / sqrt(4) (mean square 1, a block
    that preserves the variance of its field), times the paper's 0.5. R^2 does not depend on this scale
    except through W0 x, whose variance (~8e-4) is negligible here.
  * split: 80% train / 20% test, random per seed; weight decay 0.01 (PyTorch's AdamW default).
  * init: standard LoRA (A ~ U(+-1/sqrt(fan_in)), B = 0); routers take the one-hot context (W_g is E x D,
    no bias), as in the paper's parameter counts (2x2 = 4 and 2x2x2x2 = 16 router weights).
  * seeds: each seed is a full replicate (its own targets, W0, contexts, split and initialisation).
"""

import ml_collections

from localmoe import configlib

ALL_METHODS = "melora,localized_lora,lora,blockwise_moe,cellwise_moe"


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, methods=ALL_METHODS, seeds=5, scalings="standard,clip")
  config = ml_collections.ConfigDict()
  config.experiment = "california_housing"
  config.method_names = arg.methods
  config.seed = 0  # seeds are seed, seed+1, ..., seed+num_seeds-1
  config.num_seeds = arg.seeds
  config.checkpoint_every_epochs = 5  # orbax checkpoints in <workdir>/checkpoints; re-running resumes

  config.data = ml_collections.ConfigDict(
    dict(
      num_samples=0,  # 0: all 20,640 rows; n > 0: a random subset of n rows (quick mode)
      test_fraction=0.2,
      scalings=arg.scalings,  # "standard", "clip", "robust"; the first is the default
      clip_z=5.0,  # "clip": |z| is capped here before re-standardising
      spectrum="gaussian",  # singular values of each 4x4 block (mean square 1)
      block_scale=0.5,  # the paper's "scaled by 0.5"
      w0_std=0.01,
    )
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      epochs=15,
      batch_size=128,
      lr=5e-3,
      weight_decay=0.01,
      eval_batch_size=8192,
      log_every=0,
      groups=configlib.groups_field(),  # parameter groups (localmoe.train.settings): PRESETS names joined by "+",
      # e.g. poly_router, a list of rules or a dict of named rules; "" none
    )
  )
  config.adapter = ml_collections.ConfigDict(dict(a_init="lora", b_init="zeros"))
  config.adapter.alpha = ml_collections.config_dict.placeholder(float)
  # The paper's budgets give ranks above the 4x4 (or 8x8) blocks they factor: LoRA r=16 on 8x8, MELoRA r=16
  # on 4x4 blocks, Localized r=8 on 4x4 cells. Such over-complete factorisations add parameters but no
  # expressivity; allow_overcomplete_rank=True keeps them so that the counts match the paper's 256.
  config.methods = ml_collections.ConfigDict(
    {
      "lora": dict(method="lora", rank=16, allow_overcomplete_rank=True),
      "melora": dict(method="melora", num_blocks=2, rank=16, allow_overcomplete_rank=True),
      "localized_lora": dict(method="localized_lora", k_y=2, k_x=2, rank=8, allow_overcomplete_rank=True),
      "blockwise_moe": dict(method="blockwise_moe", k_y=2, k_x=2, rank=4, num_experts=2, router_input="context"),
      "cellwise_moe": dict(method="cellwise_moe", k_y=2, k_x=2, rank=4, num_experts=2, router_input="context"),
    }
  )
  if arg.quick:
    config.num_seeds = min(arg.seeds, 2)
    config.data.num_samples = 2000
    config.data.scalings = arg.scalings.split(",")[0]  # one table: CI time is mostly compilation
    config.optim.epochs = 2
  return config
