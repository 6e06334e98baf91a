"""Inference: slice geometry, intensities, preprocessing, the slice loop, prompts and the file-level segment job."""
