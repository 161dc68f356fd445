"""LightningDataModules: image-text shards (`pairs`), instruction jsonl (`instruct`), the embedded `world`
generator, and `toy` data made in code; `transforms` holds the image transforms and collation they share."""
