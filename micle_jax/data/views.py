"""Chest X-ray view filters: which images of a dataset a run reads (`all`, `frontal`, `ap`, `pa`).

CheXpert and NIH ChestX-ray14 both mix projections: CheXpert has frontal and lateral images
(`view` = `frontal`/`lateral`, frontal ones with `ap_pa` = `AP`/`PA`), NIH only frontal ones
(`view` = `PA`/`AP`). A shift comparison is like with like only when both sides read the same
views, so every input (pretraining, fine-tuning, evaluation) takes a filter:

- `all`: every image;
- `frontal`: frontal images (every NIH image);
- `ap`, `pa`: frontal images of that projection.

Case-level examples (MICLe) carry the same information per image (`views`/`ap_pa` sequences for
CheXpert, a `view` sequence for NIH); `image_mask` says which of a case's images pass, and a case
with none is dropped.
"""

from collections.abc import Mapping

import tensorflow as tf

from micle_jax import specs

VIEWS = specs.VIEWS
_FRONTAL_CODES = ("AP", "PA")


def check(views: str, key: str = "views") -> str:
  """Returns `views`, or raises naming the config key."""
  if views not in VIEWS:
    raise ValueError(f"config.{key}={views!r} not in {VIEWS}")
  return views


def _fields(features: Mapping[str, tf.Tensor], case_level: bool) -> tuple[str, str | None]:
  """(view feature, projection feature or None) of a dataset's examples."""
  if case_level:
    view = "views" if "views" in features else "view"
  else:
    view = "view"
  projection = "ap_pa" if "ap_pa" in features else None
  return view, projection


def supports(feature_names, views: str, *, case_level: bool) -> bool:
  """Whether a dataset with these features can be filtered by `views` ("all" always can)."""
  names = set(feature_names)
  if views == "all":
    return True
  return ("views" in names or "view" in names) if case_level else "view" in names


def image_mask(features: Mapping[str, tf.Tensor], views: str, *, case_level: bool) -> tf.Tensor:
  """Bool per image ([] for an image-level example, [num_images] for a case) passing `views`."""
  check(views)
  if views == "all":
    if not case_level:
      return tf.constant(True)
    count = features["num_images"] if "num_images" in features else tf.shape(features["images"])[0]
    return tf.ones([count], tf.bool)
  view_key, projection_key = _fields(features, case_level)
  if view_key not in features:
    raise ValueError(f"views={views!r} needs a `{view_key}` feature; the dataset has none")
  view = features[view_key]
  if projection_key is None:  # NIH: the view is the projection, and every image is frontal.
    frontal = tf.reduce_any(tf.stack([tf.equal(view, c) for c in _FRONTAL_CODES]), axis=0)
    projection = view
  else:  # CheXpert: frontal/lateral, and AP/PA (blank for laterals) beside it.
    frontal = tf.equal(view, "frontal")
    projection = features[projection_key]
  if views == "frontal":
    return frontal
  return tf.logical_and(frontal, tf.equal(projection, views.upper()))


def keep_example(features: Mapping[str, tf.Tensor], views: str, *, case_level: bool) -> tf.Tensor:
  """Scalar bool: an image passes, or a case has at least one image that passes."""
  mask = image_mask(features, views, case_level=case_level)
  return tf.reduce_any(mask) if case_level else mask
