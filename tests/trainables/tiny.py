"""Tiny configs of the built-in tasks (seconds per epoch on a CPU), shared by the training tests."""

TINY = {
    "microstructure": {"task": "microstructure", "batch_size": 4, "lr": 3e-3,
                       "data": {"size": 32, "num_sequences": 6, "frames": 8, "seq_length": 3},
                       "model": {"hidden_channels": [8, 16]}},
    "microscopy-unet": {"task": "microscopy", "batch_size": 8, "lr": 3e-3, "intensity_weight": 0.1,
                        "gradient_weight": 0.1, "data": {"size": 32, "num_train": 48, "num_val": 8},
                        "model": {"name": "unet", "base_channels": 8}},
    "microscopy-ddpm": {"task": "microscopy", "batch_size": 8, "lr": 3e-3, "intensity_weight": 0.1,
                        "data": {"size": 32, "num_train": 48, "num_val": 8},
                        "model": {"name": "ddpm", "base_channels": 8, "timesteps": 100, "sampling_steps": 5}},
}
