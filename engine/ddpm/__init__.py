"""Unconditional DDPMs (Ho et al. 2020) shown as they denoise, one reverse step per frame.

``model`` loads a ``UNet2DModel`` and its noise schedule (hub id, local diffusers folder, or
the project's own texture model); ``reverse`` walks the reverse process step by step, from
noise or from a noised camera frame (SDEdit); ``textures`` and ``train`` make the shipped
model. The ``ddpm`` scene (engine/scenes/ddpm.py) puts them on stage.
"""
