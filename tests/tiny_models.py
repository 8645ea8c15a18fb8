"""Tiny model settings for tests: XLA's convolution gradients are slow on CPU."""

from micle_jax import specs


def tiny_spec(**overrides) -> specs.ModelSpec:
  """ResNet-18 at width 0.25 with the cifar stem: 32 px inputs give 32/16/8/4 feature maps."""
  fields = dict(depth=18, width=0.25, stem="cifar", num_proj_layers=2, proj_out_dim=16)
  fields.update(overrides)
  return specs.ModelSpec(**fields)
