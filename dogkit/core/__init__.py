"""Kernel-safe core: standard library, numpy, PIL, torch and torchvision only."""
