"""dnr-tf: the Denoising Neural Reranker (Mao et al., 2025) on TensorFlow and Keras 3."""

__version__ = "0.1.0"
