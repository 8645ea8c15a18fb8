"""Contrastive and supervised losses (pure jax.numpy; no TensorFlow, no flags)."""

import jax
import jax.numpy as jnp
import optax

# SimCLR masks self-similarity by subtracting this from the logits.
LARGE_NUM = 1e9


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
  """x / max(‖x‖, eps), like `tf.math.l2_normalize`."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def nt_xent(
  z1: jnp.ndarray, z2: jnp.ndarray, *, temperature: float = 0.1
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """SimCLR's normalised-temperature cross-entropy over the global batch.

  With a = l2_normalize(z1), b = l2_normalize(z2) of shape [N, d] and τ = `temperature`:

      logits_ab = a bᵀ / τ        logits_aa = a aᵀ / τ − 1e9·I
      logits_ba = b aᵀ / τ        logits_bb = b bᵀ / τ − 1e9·I
      loss_a[i] = −log softmax([logits_ab | logits_aa][i])[i]
      loss_b[i] = −log softmax([logits_ba | logits_bb][i])[i]
      loss      = mean_i (loss_a[i] + loss_b[i])

  so each of the 2N views has one positive (its partner) and 2N − 2 negatives. The two
  directions are summed, as in SimCLR. MICLe uses this loss unchanged; it differs only in how
  the pair (z1[i], z2[i]) is sampled. Under `jax.jit` on a batch sharded over devices and hosts,
  these are global matmuls: every example is a negative for every other, with no hand gather.
  Computed in float32 whatever the input dtype.

  Args:
    z1: [N, d] projections of the first views.
    z2: [N, d] projections of the second views (row i is the positive of z1[i]).
    temperature: τ > 0.

  Returns:
    (loss, metrics) with metrics `contrast_acc` (fraction of rows where argmax logits_ab is the
    diagonal), `contrast_entropy` (mean entropy of softmax(logits_ab)), `pos_sim` (mean cosine
    similarity of positive pairs) and `neg_sim` (mean cosine similarity over all 2N(2N − 2)
    negative pairs).
  """
  a = l2_normalize(z1.astype(jnp.float32))
  b = l2_normalize(z2.astype(jnp.float32))
  n = a.shape[0]
  eye = jnp.eye(n, dtype=jnp.float32)
  sim_ab = a @ b.T
  sim_aa = a @ a.T
  sim_bb = b @ b.T
  logits_ab = sim_ab / temperature
  logits_aa = sim_aa / temperature - eye * LARGE_NUM
  logits_bb = sim_bb / temperature - eye * LARGE_NUM
  logits_ba = logits_ab.T
  labels = jnp.arange(n)
  loss_a = optax.softmax_cross_entropy_with_integer_labels(
    jnp.concatenate([logits_ab, logits_aa], axis=1), labels
  )
  loss_b = optax.softmax_cross_entropy_with_integer_labels(
    jnp.concatenate([logits_ba, logits_bb], axis=1), labels
  )
  loss = jnp.mean(loss_a + loss_b)

  off_diag = 1.0 - eye
  num_neg = 2 * n * (2 * n - 2)
  neg_sum = jnp.sum((2 * sim_ab + sim_aa + sim_bb) * off_diag)
  probs_ab = jax.nn.softmax(logits_ab, axis=1)
  metrics = {
    "contrast_acc": jnp.mean(jnp.argmax(logits_ab, axis=1) == labels),
    "contrast_entropy": -jnp.mean(jnp.sum(probs_ab * jnp.log(probs_ab + 1e-20), axis=1)),
    "pos_sim": jnp.mean(jnp.diagonal(sim_ab)),
    "neg_sim": neg_sum / jnp.maximum(num_neg, 1),
  }
  return loss, metrics


def softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Mean cross-entropy of integer `labels` [N] under `logits` [N, K]."""
  return jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  )


def masked_sigmoid_cross_entropy(
  logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray
) -> jnp.ndarray:
  """Multi-label BCE averaged over unmasked (example, label) cells (U-Ignore masks cells).

  Returns 0 when every cell is masked.
  """
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
  mask = mask.astype(jnp.float32)
  return jnp.sum(bce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
