"""ML-WGAN augmentation: one WGAN-GP per training image, K of them trained at once (vmap + jit).

    python -m wgan.run --config=configs/wgan.py --config.data.root=DIR --config.out_dir=OUT
"""
