"""micle_jax: SimCLR and MICLe self-supervised pretraining for medical images in JAX/Flax."""
