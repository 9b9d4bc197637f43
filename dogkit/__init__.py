"""dogkit: train, sample and score generative dog models for Kaggle's "Generative Dog Images".

Two layers: ``dogkit.core`` is kernel-safe (standard library, numpy, PIL, torch, torchvision
only) and is inlined into the generated Kaggle kernels; everything else (CLI, metrics,
reports) is tooling and may use any dependency.
"""
__version__ = "0.1.0"
