"""Evaluation metrics for generative models, and the networks they need.

- ``inception``: the FID Inception-v3 (pytorch-fid's network).
- ``clip_image``: CLIP's image tower with projection, and its preprocessing.
- ``features``: jitted, mesh-sharded feature extraction over image batches.
- ``statistics``: FID statistics (running mean/covariance, ``mu``/``sigma`` ``.npz`` files).
- ``feature_metrics``: FID, KID and Inception Score on features (float64, host).
- ``precision_recall``: improved precision/recall with k-NN manifolds.
- ``image_metrics``: PSNR and SSIM.
- ``clip_score``: CLIP score from image and text embeddings.

No module here opens a weights file: converters and loaders of these
networks' weights live in ``ldm_jax.interop`` (``inception``, ``clip_image``,
``clip_model``, ``feature_nets``).
"""
