"""Reranker backbones behind one interface: features in, logits `[batch, list_size]` out."""

from dnr_tf.backbones.dnn import PointwiseDNN
from dnr_tf.backbones.prm import PRM

BACKBONES = {"prm": PRM, "dnn": PointwiseDNN}


def build_backbone(cfg, item_vocab, list_size: int, seed: int = 0, name: str = "reranker"):
    """The backbone named by `cfg.backbone` (a `ModelConfig`)."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[cfg.backbone](cfg, item_vocab, list_size, seed=seed, name=name)
