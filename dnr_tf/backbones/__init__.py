"""Reranker backbones behind one interface: features in, logits `[batch, list_size]` out.

| name | model | module |
|---|---|---|
| `prm` | PRM (Pei et al., RecSys 2019) | prm.py |
| `dnn` | pointwise DNN, MiDNN-like (Zhuang et al., 2018) | dnn.py |
| `dlcm` | DLCM (Ai et al., SIGIR 2018) | dlcm.py |
| `setrank` | SetRank (Pang et al., SIGIR 2020) | setrank.py |
| `mir` | MIR (Xi et al., WSDM 2022) | mir.py |
| `sasrec` | SASRec (Kang & McAuley, ICDM 2018) | sequential.py |
| `gru4rec` | GRU4Rec (Hidasi et al., ICLR 2016) | sequential.py |
| `caser` | Caser (Tang & Wang, WSDM 2018) | sequential.py |
| `geneval` | generator-evaluator, EG-Rerank / PIER-like (Huzhang et al. 2021; Shi et al. 2023) | geneval.py |
"""

from dnr_tf.backbones.dlcm import DLCM
from dnr_tf.backbones.dnn import PointwiseDNN
from dnr_tf.backbones.geneval import GeneratorEvaluator
from dnr_tf.backbones.mir import MIR
from dnr_tf.backbones.prm import PRM
from dnr_tf.backbones.sequential import Caser, GRU4Rec, SASRec
from dnr_tf.backbones.setrank import SetRank

BACKBONES = {
    "prm": PRM,
    "dnn": PointwiseDNN,
    "dlcm": DLCM,
    "setrank": SetRank,
    "mir": MIR,
    "sasrec": SASRec,
    "gru4rec": GRU4Rec,
    "caser": Caser,
    "geneval": GeneratorEvaluator,
}


def build_backbone(cfg, item_vocab, list_size: int, seed: int = 0, name: str = "reranker"):
    """The backbone named by `cfg.backbone` (a `ModelConfig`)."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[cfg.backbone](cfg, item_vocab, list_size, seed=seed, name=name)
