"""TFDS builder ``multishot``: curated story units encoded into latents, text and pseudo-labels (ArrayRecord, Beam).

One record per story unit of the curated manifest (docs/curation.md), built by a Beam pipeline through TFDS's own
Beam support: ``_generate_examples`` returns a ``PTransform`` (unit indices -> ``Reshuffle`` -> the encoding
``ParDo``), so any Beam runner spreads the units over its workers (DirectRunner here; Dataflow, Flink, Spark: see
docs/records.md). The encoding itself is :mod:`onestory_jax.data.multishot.encoder`; the command is
``python -m onestory_jax.data.build``. Every feature is a ``tfds.features.Tensor`` (zlib-compressed) or ``Text``,
which decode with numpy alone (no TensorFlow at read time); with ``n`` shots, F latent frames and A augmentations:

* ``latents`` [n, F, h, w, C], ``augmented_latents`` [n - 1, A, F, h, w, C] (float16 or float32);
* ``start_latents`` [n, F, h, w, C] (with a first-frame path);
* ``images`` uint8 [n, F, Hi, Wi, 3], ``augmented_images`` uint8 [n - 1, A, F, Hi, Wi, 3] (with image
  cross-attention);
* ``tokens`` int32 [n, text_len]; ``text`` [n, text_len, D_t] (when the config freezes the text encoder);
* ``sel_labels`` float32 [n, n, F]: ``[i, j]`` = pseudo-labels of shot i's latent frames for target shot j;
* ``unit``, ``source``, ``meta_json`` (the manifest line) text; ``index`` (manifest line, 0-based), ``num_shots``.

Records are in manifest order (the keys are the manifest indices, and shuffling is off); a skipped unit leaves no
record. ``metadata.json`` of the build holds the layout, the build fingerprint, the counts and every skipped unit.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import time
from typing import Any

from absl import logging
import apache_beam as beam
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from onestory_jax.data.multishot import encoder as encoder_lib
from onestory_jax.data.multishot import layout as layout_lib

NAME = "multishot"
VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class MultiShotConfig(tfds.core.BuilderConfig):
  """One build: the settings of its workers and the manifest lines it encodes."""

  settings: encoder_lib.BuildSettings | None = None
  num_units: int = 0
  manifest_digest: str = ""


def features(layout: layout_lib.RecordLayout, augmentations: int, dtype: str) -> tfds.features.FeaturesDict:
  """The record features of a layout (module docstring)."""
  zlib = tfds.features.Encoding.ZLIB
  f = tuple(layout.latent_shape)
  dt = np.dtype(dtype)

  def tensor(shape, dtype_):
    return tfds.features.Tensor(shape=shape, dtype=dtype_, encoding=zlib)

  spec = {
      "unit": tfds.features.Text(),
      "source": tfds.features.Text(),
      "meta_json": tfds.features.Text(),
      "index": tfds.features.Tensor(shape=(), dtype=np.int32),
      "num_shots": tfds.features.Tensor(shape=(), dtype=np.int32),
      "latents": tensor((None,) + f, dt),
      "augmented_latents": tensor((None, augmentations) + f, dt),
      "tokens": tensor((None, layout.text_len), np.int32),
      "sel_labels": tensor((None, None, f[0]), np.float32),
  }
  if layout.text_dim:
    spec["text"] = tensor((None, layout.text_len, layout.text_dim), dt)
  if layout.start_latents:
    spec["start_latents"] = tensor((None,) + f, dt)
  if layout.image_size is not None:
    image = (f[0],) + tuple(layout.image_size) + (3,)
    spec["images"] = tensor((None,) + image, np.uint8)
    spec["augmented_images"] = tensor((None, augmentations) + image, np.uint8)
  return tfds.features.FeaturesDict(spec)


class _EncodeUnit(beam.DoFn):
  """Manifest index -> (index, record) of the unit, or nothing (the failure is recorded in the unit cache)."""

  def __init__(self, settings: encoder_lib.BuildSettings):
    self.settings = settings
    self._main_pid = os.getpid()
    self._lines = None
    self._encoded = beam.metrics.Metrics.counter(NAME, "units_encoded")
    self._failed = beam.metrics.Metrics.counter(NAME, "units_failed")

  def setup(self):
    if os.getpid() != self._main_pid:  # a worker process: its libraries' INFO lines (orbax, jax) would flood the log
      py_logging.getLogger("absl").setLevel(py_logging.WARNING)
      py_logging.getLogger("jax").setLevel(py_logging.WARNING)
    self._lines = encoder_lib.read_manifest(self.settings.manifest)

  def process(self, index: int):
    example = encoder_lib.process_unit(self.settings, index, self._lines[index])
    if example is None:
      self._failed.inc()
      return
    self._encoded.inc()
    yield int(index), example


class _EncodeUnits(beam.PTransform):
  """The whole split: unit indices, spread over the workers, encoded."""

  def __init__(self, settings: encoder_lib.BuildSettings, num_units: int):
    super().__init__()
    self.settings = settings
    self.num_units = num_units

  def expand(self, pbegin):
    return (
        pbegin
        | "Units" >> beam.Create(list(range(self.num_units)))
        | "Spread" >> beam.Reshuffle()
        | "Encode" >> beam.ParDo(_EncodeUnit(self.settings))
    )


def make_builder(data_dir: str, config: MultiShotConfig) -> "Builder":
  """The builder of one build (its config is made per build, so TFDS's warning about a config that is not one of
  ``BUILDER_CONFIGS`` is expected and left out)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return Builder(data_dir=data_dir, config=config)
  finally:
    logging.set_verbosity(verbosity)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Curated multi-shot story units as training records (latents, text, pseudo-labels)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "Initial release."}
  # tfds 4.9.10 derives `code_path` through the `importlib_resources` backport, which is not installed on Python
  # 3.11; the answer is simply this file (as for StoryWorld).
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str | None = None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.settings
    return tfds.core.DatasetInfo(
        builder=self,
        description="Curated multi-shot story units: Wan VAE latents, caption tokens / embeddings, pseudo-labels.",
        features=features(s.layout, s.augmentations, s.dtype),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            fingerprint=s.fingerprint,
            layout=s.layout.to_dict(),
            augmentations=s.augmentations,
            dtype=s.dtype,
            seed=s.seed,
            manifest=s.manifest,
            pretrained=s.config.pretrained,
            units=self.builder_config.num_units,
            manifest_digest=self.builder_config.manifest_digest,
        ),
    )

  # TFDS prints these two lines to stdout; the command reports progress and the result itself.
  def _log_download_bytes(self) -> None:
    logging.debug("Building %s into %s", self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.debug("Built %s in %s", self.name, self.data_dir)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # everything is local to the manifest
    self._started = time.time()
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    return _EncodeUnits(self.builder_config.settings, self.builder_config.num_units)

  def _process_pipeline_result(self, pipeline_result: Any) -> None:
    failures = encoder_lib.UnitCache(self.builder_config.settings.cache_dir).failures()
    self.info.metadata["failed"] = [dataclasses.asdict(f) for f in failures]
    self.info.metadata["records"] = self.builder_config.num_units - len(failures)
    self.info.metadata["build_seconds"] = round(time.time() - getattr(self, "_started", time.time()), 3)
