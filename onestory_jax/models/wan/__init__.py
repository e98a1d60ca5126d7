"""Flax ports of Wan2.1's published components, each with the weight map of its released checkpoint beside it.

* :mod:`.dit`: the video diffusion transformer (diffusers' ``WanTransformer3DModel``), with OneStory's context
  tokens; :mod:`.rope`: its 3D rotary position embedding.
* :mod:`.vae`: the causal video VAE (diffusers' ``AutoencoderKLWan``; Wan2.1 and Wan2.2 sizes).
* :mod:`.umt5`: the T5 / umT5 text encoder (transformers' ``UMT5EncoderModel``); the demo's small T5-style
  encoder is an instance of the same class.
* :mod:`.clip`: the CLIP ViT vision tower of the I2V models (transformers' ``CLIPVisionModel``) and its
  preprocessing.

Each module maps the published tensor names onto its parameters (``torch_key_to_target`` and the like) and reads
the sizes from the release's ``config.json``; :mod:`onestory_jax.convert` streams a release through them.
"""
