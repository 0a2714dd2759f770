"""Building blocks shared by the autoencoders, the UNet and the text encoders.

This package imports nothing else from ldm_jax.
"""
