"""A cascade simulator: the embedded default data set, with the truth known.

Users and items have latent factors; the true engagement probability is
    p(z = 1 | u, i) = sigmoid(base_logit + taste_scale * <U_u, V_i> + b_i).
The retriever sees the same model through noisy factors (U + e, V + e', b + e''), on the same
logit scale, so its scores x are a noisy estimate of p. Each user starts from a warm history
drawn from p, then makes `requests_per_user` requests over time: the retriever proposes its top
`list_size` unconsumed items, feedback z ~ Bernoulli(p) on every candidate, and the positives
become history. The true p of every candidate is written as `oracle_scores`, so the ceiling of
any reranker on the same lists is measurable. Everything is a function of (seed, user): the same
seed gives the same data on any runner and any number of workers.
"""

from __future__ import annotations

import numpy as np

from dnr_tf import schema as S
from pipeline.config import SyntheticConfig
from pipeline.protocol import sigmoid

WARM_HISTORY = 10
_SECONDS_BETWEEN_REQUESTS = 3600


class World:
    """The simulator's items, true preference model and retriever (shared by all users)."""

    def __init__(self, cfg: SyntheticConfig, seed: int, retrained_seed: int | None = None):
        self.cfg = cfg
        self.seed = seed
        self.retrained_seed = retrained_seed
        rng = np.random.default_rng([seed, 0])
        d = cfg.dim
        self.item_ids = np.arange(1, cfg.num_items + 1, dtype=np.int64)
        self.V = rng.normal(0.0, 1.0 / np.sqrt(d), (cfg.num_items, d))
        self.b = rng.normal(0.0, cfg.popularity, cfg.num_items)
        self.V_hat = self.V + rng.normal(0.0, cfg.retriever_noise / np.sqrt(d), self.V.shape)
        self.b_hat = self.b + rng.normal(0.0, cfg.retriever_noise * cfg.popularity, cfg.num_items)
        if retrained_seed is not None:
            # The retrained retriever: the same truth seen through noise of another seed.
            again = np.random.default_rng([retrained_seed, 0, seed])
            self.V_hat2 = self.V + again.normal(0.0, cfg.retriever_noise / np.sqrt(d), self.V.shape)
            self.b_hat2 = self.b + again.normal(0.0, cfg.retriever_noise * cfg.popularity, cfg.num_items)

    def user(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(true factors, retriever's view of them) of one user."""
        rng = np.random.default_rng([self.seed, 1, user])
        d = self.cfg.dim
        u = rng.normal(0.0, 1.0, d)
        u_hat = u + rng.normal(0.0, self.cfg.retriever_noise, d)
        return u, u_hat

    def true_p(self, u: np.ndarray) -> np.ndarray:
        return sigmoid(self._logit(self.V, u, self.b))

    def retriever_p(self, u_hat: np.ndarray) -> np.ndarray:
        return sigmoid(self._logit(self.V_hat, u_hat, self.b_hat))

    def retrained_p(self, user: int, u: np.ndarray) -> np.ndarray:
        """The retrained retriever's x over the catalogue for one user (true factors `u`)."""
        rng = np.random.default_rng([self.retrained_seed, 1, self.seed, user])
        u_hat2 = u + rng.normal(0.0, self.cfg.retriever_noise, self.cfg.dim)
        return sigmoid(self._logit(self.V_hat2, u_hat2, self.b_hat2))

    def _logit(self, V: np.ndarray, u: np.ndarray, b: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        logit = cfg.base_logit + cfg.taste_scale * (V @ u) + b
        if cfg.sharpness != 1.0:
            logit = cfg.sharpness * logit
        return logit


def simulate_user(world: World, user: int, list_size: int):
    """Yields the logged lists (record dicts with `oracle_scores`) of one simulated user."""
    cfg = world.cfg
    rng = np.random.default_rng([world.seed, 2, user])
    u, u_hat = world.user(user)
    p = world.true_p(u)
    x = world.retriever_p(u_hat)
    x2 = world.retrained_p(user, u) if world.retrained_seed is not None else None
    warm = rng.choice(cfg.num_items, size=min(WARM_HISTORY, cfg.num_items // 4), replace=False, p=p / p.sum())
    history = [int(world.item_ids[j]) for j in warm]
    consumed = np.zeros(cfg.num_items, bool)
    consumed[warm] = True
    t = 1_000_000_000 + int(rng.integers(0, 10_000_000))
    for r in range(cfg.requests_per_user):
        t += int(rng.integers(1, 2 * _SECONDS_BETWEEN_REQUESTS))
        masked = np.where(consumed, -np.inf, x)
        k = min(list_size, int((~consumed).sum()))
        if k == 0:
            return
        cand = np.lexsort((np.arange(cfg.num_items), -masked))[:k]
        z = (rng.random(k) < p[cand]).astype(np.int64)
        record = {
            S.REQUEST_ID: f"syn-{user}-{r}",
            S.USER_ID: int(user),
            S.TIMESTAMP: t,
            S.HISTORY: list(history),
            S.ITEM_IDS: [int(world.item_ids[j]) for j in cand],
            S.RETRIEVER_SCORES: [float(v) for v in x[cand]],
            S.LABELS: [int(v) for v in z],
            S.ORACLE_SCORES: [float(v) for v in p[cand]],
        }
        if x2 is not None:
            record[S.RETRIEVER_SCORES_RETRAINED] = [float(v) for v in x2[cand]]
        yield record
        clicked = cand[z == 1]
        consumed[clicked] = True
        history.extend(int(world.item_ids[j]) for j in clicked)
