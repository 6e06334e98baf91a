"""Training: datasets and label maps, the slice bank, losses, the training loop and evaluation."""
