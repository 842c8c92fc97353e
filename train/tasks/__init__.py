"""Training tasks. A task supplies the loss over a batch (summed, with its normaliser) and its
metrics; one loop in train/loop.py runs them all."""
