"""Multi-shot training records: curated story units encoded once (latents, text, pseudo-labels), read by grain.

* :mod:`.layout`: what a record holds for a run config, and the training sample read from it (light: no TFDS).
* :mod:`.encoder`: the encoding of one unit (VAE, umT5, DINOv2 + CLIP pseudo-labels) and the resume cache.
* :mod:`.multishot_dataset_builder`: the TFDS Beam builder (``python -m onestory_jax.data.build``).
* :mod:`.reader`: random access and the latent triplet sampler (``config.data.source = 'multishot'``).

See docs/records.md.
"""
