"""Video + caption data: a synthetic set, the manifest dataset, preprocessing to latents, packing."""
