r"""MNIST sensor degradation: the paper's Table 3 and Figure 3 (Section 3.3).

  python launch.py --config configs/mnist_degradation.py --workdir runs/mnist_degradation
  python launch.py --config configs/mnist_degradation.py:quick --workdir runs/mnist_quick        # seconds, CI
  python launch.py --config configs/mnist_degradation.py:methods=lora+cellwise_moe,seeds=3 --workdir runs/x

Prints the variance of the target and of the frozen W0 x, per-method progress, then the table (test MSE and
R^2 on the 10k test images, mean +- std over seeds, beside the paper's), whether routed > static > MELoRA holds,
the least-squares ceilings (static and per-context, unlimited rank) and the wall time. Writes results.json,
results.md, history.csv, TensorBoard events (tb/), figure3.png (R^2 per method with seed error bars) and
outputs.png (input, target and every method's output for a few test digits in each context).

Stated by the paper: x in R^784 as four 14x14 quadrants; y = W^(c) x; context 0 anti-diagonal blocks (opposite
corners); context 1: quadrant 4 fails, off-diagonal blocks that sever x4; 196x196 SVD blocks; W0 ~ N(0, 0.01^2);
budgets LoRA r=16 25,088, MELoRA r=32 50,176, Localized K=4 r=4 25,088, Global 25,092, Cell-wise 25,152.

Left open by the paper, chosen here (each overridable, e.g. --config.optim.lr=3e-3):
  * context-1 cells: the paper does not list them. We use (1,3), (3,1), (2,1), (4,3): all off-diagonal, none
    in column 4 (so the target never reads x4), x1 and x3 cross-talk ((1,3), (3,1)) as the text describes,
    and every output quadrant reads exactly one input quadrant, as in context 0. The input's x4 is zeroed too.
  * inputs: pixels / 255 in [0, 1], no centring (the raw image, as a sensor would deliver it).
  * target scale: "gaussian" singular values (of G / sqrt(196), mean square 1) times block_scale = 1.4.
    The paper's MSE / (1 - R^2) gives a test variance of ~0.167 per output; block_scale = 1 gives 0.086 and
    1.4 gives ~0.17, so we match the paper's implied scale (which also makes our MSE column comparable).
    The scale matters because the frozen W0 x (variance ~0.005 here, 784 inputs x 0.01^2 x pixel variance)
    is full-rank noise that no low-rank adapter can cancel: at block_scale = 1 it is ~6% of the target
    variance, at 1.4 ~3%. The data and targets are fixed by data.seed (one draw, printed in results.md).
  * seeds: inputs and targets are shared by all seeds (Data(per_seed=False): per-seed 60k x 784 targets
    would need ~1 GB each); seeds vary the adapters' initialisation and the batch order only, so the spread
    over seeds is optimisation noise, not target-draw noise (run other data.seed values for that).
  * optimisation: AdamW lr 1e-3 (the paper's Section 3.1 rate), weight decay 0.01, batch 128, 10 epochs:
    in a 20-epoch, 1-seed probe every method's test R^2 moved by at most 0.4 points after epoch 10 (see
    history.csv for the curves). Train on all 60k training images, report on the 10k test images.
  * note: zeroing x4 in context 1 leaks the context into the input (x4 is nonzero only in context 0), so a
    static map can already fit context 0's column-4 block; the static least-squares ceiling printed in
    results.md (~74%) is well above the ~50% of "one average map for two disjoint contexts".
  * init: standard LoRA (A ~ U(+-1/sqrt(fan_in)), B = 0); routers take the one-hot context (E x D, no bias).
"""

import ml_collections

from localmoe import configlib

ALL_METHODS = "melora,localized_lora,lora,blockwise_moe,cellwise_moe"


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, methods=ALL_METHODS, seeds=5)
  config = ml_collections.ConfigDict()
  config.experiment = "mnist_degradation"
  config.method_names = arg.methods
  config.seed = 0  # seeds are seed, seed+1, ..., seed+num_seeds-1 (init and batch order)
  config.num_seeds = arg.seeds
  config.checkpoint_every_epochs = 5  # orbax checkpoints in <workdir>/checkpoints; re-running resumes

  config.data = ml_collections.ConfigDict(
    dict(
      seed=0,  # fixes the targets, W0 and the contexts (shared by all seeds)
      num_train=0,  # 0: all 60,000 training images; n: the first n (quick mode)
      num_test=0,  # 0: all 10,000 test images
      degraded_cells="1-3,3-1,2-1,4-3",  # context 1 active cells (i-j, 1-indexed); never column 4
      spectrum="gaussian",
      block_scale=1.4,  # test target variance ~0.17 per output, as the paper's Table 3 implies
      w0_std=0.01,
    )
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      epochs=10,
      batch_size=128,
      lr=1e-3,
      weight_decay=0.01,
      eval_batch_size=4096,
      log_every=0,
      groups=configlib.groups_field(),  # parameter groups (localmoe.train.settings): PRESETS names joined by "+",
      # e.g. poly_router, a list of rules or a dict of named rules; "" none
    )
  )
  config.adapter = ml_collections.ConfigDict(dict(a_init="lora", b_init="zeros"))
  config.adapter.alpha = ml_collections.config_dict.placeholder(float)
  config.methods = ml_collections.ConfigDict(
    {
      "lora": dict(method="lora", rank=16),  # 25,088
      "melora": dict(method="melora", num_blocks=4, rank=32),  # 50,176
      "localized_lora": dict(method="localized_lora", k_y=4, k_x=4, rank=4),  # 25,088
      "blockwise_moe": dict(
        method="blockwise_moe",
        k_y=4,
        k_x=4,
        rank=2,
        num_experts=2,  # 25,092
        router_input="context",
      ),
      "cellwise_moe": dict(
        method="cellwise_moe",
        k_y=4,
        k_x=4,
        rank=2,
        num_experts=2,  # 25,152
        router_input="context",
      ),
    }
  )
  config.eval = ml_collections.ConfigDict(
    dict(
      ceilings=True,  # least-squares ceilings (static / per context) in results.md
      num_examples=3,  # test digits per context in outputs.png
    )
  )
  if arg.quick:
    config.num_seeds = min(arg.seeds, 2)
    config.data.num_train = 2000
    config.data.num_test = 500
    config.optim.epochs = 1
  return config
