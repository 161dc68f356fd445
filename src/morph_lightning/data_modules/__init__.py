"""LightningDataModules: `toy` (made in code) now; image-text shards and instruction mixtures next."""
