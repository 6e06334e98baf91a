"""The model: base networks and their weight files, the singular-value layers, text encoders, the S-SAM model, adapters, loading and devices."""
