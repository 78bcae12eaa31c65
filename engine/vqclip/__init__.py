"""VQGAN+CLIP: optimise a VQGAN latent until its image matches weighted text prompts under CLIP.

- ``vqgan``: the standard taming-transformers checkpoints (``.ckpt`` + ``.yaml``) loaded into
  diffusers' ``VQModel`` (a maintained, numerically identical implementation of the same network).
- ``clip``: CLIP text and image embeddings through transformers' ``CLIPModel`` (OpenAI weights,
  or open_clip weights published in transformers format), and the prompt weight syntax.
- ``optimise``: the classic loop: cutouts + augmentations, spherical distance loss, Adam.
- ``drawers``: what the loop optimises: a VQGAN latent, a pixel grid with a palette, or a
  Fourier spectrum in decorrelated colours (the last two need no VQGAN).
- ``configs``: the full-size and tiny architectures, built with random weights for the
  benchmark and the tests (no download anywhere).

Everything here imports torch; the scene (``engine.scenes.vqgan_clip``) imports it only in ``load``.
"""
