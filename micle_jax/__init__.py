"""micle_jax: SimCLR and MICLe self-supervised pretraining for medical images in JAX/Flax."""

from micle_jax.runtime import allocator as _allocator

# A command (`python -m micle_jax.…`) restarts once with tcmalloc preloaded, before its imports.
_allocator.use_tcmalloc()
