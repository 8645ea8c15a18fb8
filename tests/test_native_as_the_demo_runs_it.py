"""The native convolution as `make demo` runs it: one CPU device, oneDNN on two or more threads.

The rest of the suite forces 8 devices, so each call there runs on one thread. Here a fresh
process starts its devices as the commands do (`app.start_devices`): its convolutions must match
float64 on the shapes the demo's model has, two compilations must agree to the bit, and a
pretraining stopped half-way and resumed must end bit-identical to an uninterrupted one.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from micle_jax.models import native_conv

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
  """
  import json, sys
  sys.path.insert(0, {tests!r})
  from micle_jax import app, host
  import jax
  jax.config.update("jax_compilation_cache_dir", {workdir!r} + "/jax_cache")
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from micle_jax.models import native_conv
  if host.usable_cores() < 2:  # a 1-core machine still runs oneDNN on two threads here
    host.usable_cores = lambda cgroup=None: 2
  app.start_devices(8)
  import jax, jax.numpy as jnp, numpy as np
  from conv_reference import reference, reference_grads, relative
  import test_pretrain
  from micle_jax import pretrain

  out = {{"devices": jax.device_count(), "threads": native_conv._threads(),
          "path": native_conv.describe()["convolution"], "errors": {{}}}}
  # The demo's convolutions (ResNet-18 x0.25, cifar stem, 32 px): 3x3 at stride 1 and 2, 1x1.
  for side, c, d, k, s in [(32, 3, 16, 3, 1), (16, 16, 32, 3, 2), (16, 16, 32, 1, 2), (8, 32, 32, 3, 1)]:
    rng = np.random.default_rng(side + c + d + k + s)
    x = rng.normal(size=(8, side, side, c)); w = rng.normal(size=(k, k, c, d)) / np.sqrt(k * k * c)
    dy = rng.normal(size=reference(x, w, s)[0].shape)
    expected = reference_grads(x, w, s, dy)
    def run(x, w, dy):
      y, vjp = jax.vjp(lambda x, w: native_conv.conv(x, w, s), x, w)
      return (y, *vjp(dy))
    args = [jnp.asarray(a, jnp.float32) for a in (x, w, dy)]
    first, second = jax.jit(run)(*args), jax.jit(run)(*args)
    key = f"{{side}}-{{c}}-{{d}}-{{k}}-{{s}}"
    out["errors"][key] = [relative(a, e) for a, e in zip(first, expected)]
    out.setdefault("bit_identical", True)
    out["bit_identical"] &= all(np.array_equal(a, b) for a, b in zip(first, second))
  # Pretraining: 4 steps at once, and 2 + 2 across a restart, end bit-identical.
  settings = {{"probe.dataset": "", "num_steps": 4}}
  config = test_pretrain._config({data_dir!r}, **settings)
  whole = jax.device_get(pretrain.train_and_evaluate(config, {workdir!r} + "/whole"))
  pieces = test_pretrain._config({data_dir!r}, max_steps_per_run=2, **settings)
  for _ in range(2):
    parts = jax.device_get(pretrain.train_and_evaluate(pieces, {workdir!r} + "/pieces"))
  out["steps"] = [int(whole.step), int(parts.step)]
  out["resume_bit_identical"] = all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves((whole.params, whole.batch_stats, whole.opt_state)),
                    jax.tree_util.tree_leaves((parts.params, parts.batch_stats, parts.opt_state)))
  )
  print("RESULT " + json.dumps(out))
  """
)


def test_one_device_several_threads_matches_float64_and_resumes_bit_identically(
  cxr_data_dir, tmp_path
):
  if not native_conv.available():
    message = f"{native_conv.LIBRARY} is not built: run `make native`"
    if os.environ.get("MICLE_REQUIRE_NATIVE_CONV") == "1":
      pytest.fail(message)
    pytest.skip(message)
  script = SCRIPT.format(tests=str(REPO / "tests"), data_dir=cxr_data_dir, workdir=str(tmp_path))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no forced device count
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
  out = json.loads(line[len("RESULT ") :])
  assert out["devices"] == 1 and out["threads"] >= 2 and out["path"] == "native"
  for shape, errors in out["errors"].items():
    assert max(errors) < 1e-5, (shape, errors)
  assert out["bit_identical"]
  assert out["steps"] == [4, 4] and out["resume_bit_identical"]
