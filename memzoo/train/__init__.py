"""Training: the Accelerate pretraining loop behind ``memzoo-train`` (lands with the training issue).

Until then ``examples/quickstart.py`` trains a small model with a plain PyTorch loop.
"""
