"""NT-Xent against an independent float64 NumPy implementation, closed forms and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micle_jax.train import losses


def reference_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
  """Loops over the 2N anchors: −log(exp(s_pos/τ) / Σ_{k≠anchor} exp(s_k/τ)), averaged per pair."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    partner = (i + n) % (2 * n)
    sims = z @ z[i] / tau
    others = [k for k in range(2 * n) if k != i]
    log_denominator = np.log(np.sum(np.exp(sims[others] - sims[others].max()))) + sims[others].max()
    total += log_denominator - sims[partner]
  return total / n  # mean over pairs of (loss_a + loss_b)


@pytest.mark.parametrize(
  "n,d,tau", [(2, 3, 0.1), (8, 16, 0.1), (16, 4, 0.5), (33, 128, 1.0), (5, 7, 0.05)]
)
def test_nt_xent_matches_float64_reference(n, d, tau):
  rng = np.random.default_rng(n * 100 + d)
  z1 = rng.normal(size=(n, d)).astype(np.float32)
  z2 = (z1 + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
  loss, _ = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=tau)
  np.testing.assert_allclose(float(loss), reference_nt_xent(z1, z2, tau), rtol=1e-5)


def test_nt_xent_is_scale_invariant():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 6, 8)).astype(np.float32)
  a, _ = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=0.2)
  b, _ = losses.nt_xent(jnp.asarray(3 * z1), jnp.asarray(0.1 * z2), temperature=0.2)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 10])
def test_identical_embeddings_closed_form(n):
  # All 2N embeddings equal: every unmasked logit is 1/τ, so each anchor's softmax is uniform
  # over its 2N − 1 candidates: loss_a = loss_b = log(2N − 1).
  z = jnp.ones((n, 5))
  loss, metrics = losses.nt_xent(z, z, temperature=0.1)
  np.testing.assert_allclose(float(loss), 2 * np.log(2 * n - 1), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["pos_sim"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["neg_sim"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("n,tau", [(3, 0.1), (8, 0.5)])
def test_orthogonal_pairs_closed_form(n, tau):
  # z1 = z2 = one-hot rows: positive logit 1/τ, the 2N − 2 negatives 0:
  # loss_a = loss_b = −1/τ + log(e^{1/τ} + 2N − 2).
  z = jnp.eye(n, 2 * n)
  loss, metrics = losses.nt_xent(z, z, temperature=tau)
  expected = 2 * (-1 / tau + np.log(np.exp(1 / tau) + 2 * n - 2))
  # float32 loses ~1e-7 absolute in log-sum-exp − 1/τ; the loss itself can be ~1e-4.
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=2e-6)
  assert float(metrics["contrast_acc"]) == 1.0
  np.testing.assert_allclose(float(metrics["neg_sim"]), 0.0, atol=1e-7)


def test_metrics_values():
  z1 = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  z2 = jnp.asarray([[1.0, 0.0], [1.0, 0.2], [1.0, 1.0]])  # row 1 best matches row 2
  _, metrics = losses.nt_xent(z1, z2, temperature=0.1)
  np.testing.assert_allclose(float(metrics["contrast_acc"]), 2 / 3, rtol=1e-6)
  a = z1 / jnp.linalg.norm(z1, axis=1, keepdims=True)
  b = z2 / jnp.linalg.norm(z2, axis=1, keepdims=True)
  np.testing.assert_allclose(
    float(metrics["pos_sim"]), float(jnp.mean(jnp.sum(a * b, 1))), rtol=1e-6
  )


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  z1 = rng.normal(size=(3, 4))
  z2 = rng.normal(size=(3, 4))
  with jax.enable_x64():
    grad = jax.grad(lambda a, b: losses.nt_xent(a, b, temperature=0.3)[0], argnums=(0, 1))
    g1, g2 = grad(jnp.asarray(z1), jnp.asarray(z2))
  eps = 1e-6
  for which, g in ((0, g1), (1, g2)):
    for idx in np.ndindex(3, 4):
      plus = [z1.copy(), z2.copy()]
      minus = [z1.copy(), z2.copy()]
      plus[which][idx] += eps
      minus[which][idx] -= eps
      fd = (reference_nt_xent(*plus, 0.3) - reference_nt_xent(*minus, 0.3)) / (2 * eps)
      np.testing.assert_allclose(float(g[idx]), fd, rtol=1e-5, atol=1e-8)


def test_masked_sigmoid_cross_entropy_ignores_masked_cells():
  logits = jnp.asarray([[2.0, -1.0], [0.5, 3.0]])
  targets = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  mask = jnp.asarray([[1.0, 0.0], [1.0, 1.0]])
  got = float(losses.masked_sigmoid_cross_entropy(logits, targets, mask))
  x = np.asarray([2.0, 0.5, 3.0], np.float64)
  t = np.asarray([1.0, 0.0, 1.0])
  p = 1 / (1 + np.exp(-x))
  expected = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert float(losses.masked_sigmoid_cross_entropy(logits, targets, 0 * mask)) == 0.0
