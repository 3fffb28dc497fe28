"""Queryable LoRA (Queryable LoRA paper, Section 3, Eq. 1-3, Algorithms 1-2), without the instruction prior.

Every adapted layer l keeps LoRA factors A_l, B_l and a gate eta_l; a bank of M shared r x r atoms C_m with
keys k_m is queried once per block of consecutive layers:

  s_l      = A_l^T h_l                                            rank-space state       [..., r]
  q_b^(0)  = w_b + Q_cur s_{l_b}^entry                             pre-query (Eq. 2, lambda_ctx = 0)
  beta_i   = softmax_i <RMSNorm(Q_dep,q q_b^(0)), RMSNorm(Q_dep,k sbar_i)> / sqrt(d_k T_dep),   i < b
  q_b      = q_b^(0) + Q_dep sum_{i<b} beta_i sbar_i               (u^att = 0 for b = 1)
  zeta_b,m = <RMSNorm(q_b), RMSNorm(k_m)> / sqrt(d_k T_attn)       (Eq. 3 with tau_lang = 0)
  S_b      = sum_m TopKSoftmax(zeta_b)_m C_m                       [..., r, r]
  Delta_l  = (alpha / r) B_l (I_r + sigmoid(eta_l) S_b) s_l        (Eq. 1; Algorithm 2, lines 26-38)
  sbar_b   = mean_{l in block b} s_l                               (Algorithm 2, lines 43-46)

Routing is per example (per token for sequence models): s, q and S carry the input's leading axes.
B_l = 0 at initialisation, so the adapted model equals the frozen one (and g_l = 0 recovers LoRA).
Layers are split into `num_blocks` contiguous blocks in call order (`numpy.array_split`).

Letters in einsums: m atoms, r/s rank, k query width d_k.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import routing
from localmoe.adapters import common


def rms_norm(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """Parameter-free RMSNorm over the last axis."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def blocks_of(num_layers: int, num_blocks: int) -> list[np.ndarray]:
  """Contiguous layer blocks, as equal as possible."""
  return [b for b in np.array_split(np.arange(num_layers), num_blocks)]


@dataclasses.dataclass(frozen=True)
class QueryableLoRA:
  """Model-wide adapter for `localmoe.inject` (an AdapterSet). Every matched layer gets A, B, eta."""

  rank: int = 8  # r
  num_atoms: int = 8  # M
  num_blocks: int = 4  # B
  top_k: int = 2  # atoms mixed per block query
  query_dim: int | None = None  # d_k; None -> r
  alpha: float | None = None  # scale alpha / r; None -> 1
  t_attn: float = 1.0  # T_attn
  t_dep: float = 1.0  # T_dep
  atom_std: float | None = None  # atoms C_m ~ N(0, atom_std^2); None -> 1 / r
  eta_init: float = 0.0  # g = sigmoid(eta) = 0.5 at init

  def __post_init__(self):
    for field in ("rank", "num_atoms", "num_blocks", "top_k"):
      common.check_positive(getattr(self, field), field)
    common.check_alpha(self.alpha)
    if self.top_k > self.num_atoms:
      raise ValueError(f"top_k={self.top_k} must be <= num_atoms={self.num_atoms}.")

  @property
  def d_k(self) -> int:
    return self.query_dim or self.rank

  def _check_layers(self, layers):
    if len(layers) < self.num_blocks:
      raise ValueError(
        f"num_blocks={self.num_blocks} is larger than the number of adapted layers "
        f"({len(layers)}): use num_blocks <= {len(layers)}."
      )
    for layer in layers:
      common.check_rank(self.rank, layer.d_out, layer.d_in, f"layer {layer.path!r}", False)

  def init(self, key, layers: Sequence[Any], kernels=None) -> dict:
    """{"layers": {path: {"A" [d_in, r], "B" [d_out, r], "eta" []}}, "shared": {...}}."""
    del kernels
    self._check_layers(layers)
    r, dk, m = self.rank, self.d_k, self.num_atoms
    per_layer = {}
    for i, layer in enumerate(layers):
      k = jax.random.fold_in(key, i)
      per_layer[layer.path] = {
        "A": common.lora_a_init(k, (layer.d_in, r)),
        "B": jnp.zeros((layer.d_out, r)),
        "eta": jnp.asarray(self.eta_init, jnp.float32),
      }
    ks = jax.random.split(jax.random.fold_in(key, len(layers)), 7)
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape) / math.sqrt(fan_in)
    atom_std = self.atom_std if self.atom_std is not None else 1.0 / r
    shared = {
      "atoms": atom_std * jax.random.normal(ks[0], (m, r, r)),  # C_m
      "keys": jax.random.normal(ks[1], (m, dk)),  # k_m
      "block_prior": normal(ks[2], (self.num_blocks, dk), dk),  # w_{l_b}
      "q_cur": normal(ks[3], (r, dk), r),  # Q_cur
      "q_dep": normal(ks[4], (r, dk), r),  # Q_dep
      "q_dep_q": normal(ks[5], (dk, dk), dk),  # Q_dep,q
      "q_dep_k": normal(ks[6], (r, dk), r),  # Q_dep,k
    }
    return {"layers": per_layer, "shared": shared}

  def num_params(self, layers) -> int:
    r, dk, m = self.rank, self.d_k, self.num_atoms
    per_layer = sum(r * (l.d_in + l.d_out) + 1 for l in layers)
    shared = m * r * r + m * dk + self.num_blocks * dk + 3 * r * dk + dk * dk
    return per_layer + shared

  # ----------------------------------------------------------------------------------------- routing

  def route(self, shared, block: int, s_entry: jnp.ndarray, summaries: list[jnp.ndarray]):
    """Algorithm 2 lines 5-25: the block operator S_b [..., r, r] and the routing weights [..., M]."""
    q0 = shared["block_prior"][block] + s_entry @ shared["q_cur"]  # [..., d_k]
    if summaries:
      sbar = jnp.stack(summaries, axis=-2)  # [..., b-1, r]
      query = rms_norm(q0 @ shared["q_dep_q"])  # [..., d_k]
      keys = rms_norm(sbar @ shared["q_dep_k"])  # [..., b-1, d_k]
      xi = jnp.einsum("...k,...ik->...i", query, keys) / math.sqrt(self.d_k * self.t_dep)
      beta = jax.nn.softmax(xi, axis=-1)  # [..., b-1]
      u_att = jnp.einsum("...i,...ir->...r", beta, sbar)  # [..., r]
      q = q0 + u_att @ shared["q_dep"]
    else:
      q = q0
    zeta = jnp.einsum("...k,mk->...m", rms_norm(q), rms_norm(shared["keys"]))
    zeta = zeta / math.sqrt(self.d_k * self.t_attn)  # [..., M]
    weights = routing.gates_from_logits(zeta, self.top_k)  # [..., M]
    return jnp.einsum("...m,mrs->...rs", weights, shared["atoms"]), weights

  def session(self, params, layers, context=None):
    del context  # Queryable LoRA routes on its own activations
    return _QueryableSession(self, params, layers)


class _QueryableSession:
  """The state carried through one forward pass (Algorithm 2): current S_b, running block sums, summaries.

  Layers must be called in the order `inject` recorded; each matched layer once per forward pass.
  """

  def __init__(self, adapter: QueryableLoRA, params, layers):
    self.adapter, self.params, self.layers = adapter, params, layers
    self.block_of, self.first, self.last = {}, set(), set()
    for b, idx in enumerate(blocks_of(len(layers), adapter.num_blocks)):
      for i in idx:
        self.block_of[int(i)] = b
      self.first.add(int(idx[0]))
      self.last.add(int(idx[-1]))
    self.expected = 0
    self.summaries: list[jnp.ndarray] = []
    self.operator = None
    self.block_sum = None
    self.block_count = 0

  def __call__(self, index: int, x: jnp.ndarray, kernel=None) -> jnp.ndarray:
    del kernel
    if index != self.expected % len(self.layers):
      raise ValueError(
        f"QueryableLoRA expects the adapted layers in call order; got layer {index} "
        f"({self.layers[index].path!r}) when layer {self.expected} was next."
      )
    if index == 0:  # a new forward pass
      self.summaries, self.operator = [], None
    self.expected += 1
    layer = self.params["layers"][self.layers[index].path]
    s = jnp.einsum("...d,dr->...r", x, layer["A"])  # [..., r]
    if index in self.first:
      self.operator, _ = self.adapter.route(self.params["shared"], self.block_of[index], s, self.summaries)
      self.block_sum, self.block_count = jnp.zeros_like(s), 0
    t = s + jax.nn.sigmoid(layer["eta"]) * jnp.einsum("...rs,...s->...r", self.operator, s)
    self.block_sum, self.block_count = self.block_sum + s, self.block_count + 1
    if index in self.last:
      self.summaries.append(self.block_sum / self.block_count)
    scale = common.scaling(self.adapter.alpha, self.adapter.rank)
    return scale * jnp.einsum("...r,or->...o", t, layer["B"])  # [..., d_out]
