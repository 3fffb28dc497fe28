"""Backbones: the nonconvex benchmark's MLP and Transformer, and a BERT encoder that loads MiniLM.

  `localmoe.models.nonconvex`  DeepNarrowMLP, SmallTransformer (the nonconvex regression benchmark)
  `localmoe.models.bert`       a linen BERT encoder laid out like the Hugging Face checkpoint
  `localmoe.models.minilm`     all-MiniLM-L6-v2 offline: `load`, `tokenize`, `embed`

The nonconvex names are re-exported here, so `from localmoe import models; models.DeepNarrowMLP` works.
`bert` and `minilm` are imported on use (`from localmoe.models import minilm`).
"""

from localmoe.models.nonconvex import BACKBONES, KERNEL_INITS, DeepNarrowMLP, SmallTransformer, bias_init, kernel_init

__all__ = ["BACKBONES", "KERNEL_INITS", "DeepNarrowMLP", "SmallTransformer", "bias_init", "kernel_init"]
