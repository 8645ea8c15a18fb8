"""micle_jax: SimCLR and MICLe self-supervised pretraining for medical images in JAX/Flax."""

import os as _os

from micle_jax.runtime import allocator as _allocator

# TensorFlow's C++ INFO lines (the oneDNN notice, ...) before anything imports it; warnings stay.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# A command (`python -m micle_jax.…`) restarts once with tcmalloc preloaded, before its imports.
_allocator.use_tcmalloc()
