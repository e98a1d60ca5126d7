"""The training story source of built multi-shot records: ``config.data.source = 'multishot'``.

``config.data.records`` names the ``--out`` of ``python -m onestory_jax.data.build`` (or one build's dataset directory
in it). The records hold latents, caption embeddings and pseudo-labels, so the train step runs neither the VAE nor
(with a frozen text encoder) the text encoder; the batch layout is :func:`layout.example_spec`, not the pixel one.
See docs/records.md.
"""

from __future__ import annotations

import ml_collections

from onestory_jax.data import sources
from onestory_jax.data.multishot import layout


def multishot_source(config: ml_collections.ConfigDict):
  """``config.data.source = 'multishot'``: the records of ``config.data.records``, checked against the config."""
  from onestory_jax.data.multishot import reader  # pylint: disable=g-import-not-at-top

  return reader.open_records(config)


sources.register_source("multishot", multishot_source, example_spec=layout.example_spec)
