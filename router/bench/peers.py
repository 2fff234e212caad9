"""Every router the quality benchmark compares, behind one small interface.

A :class:`Learner` is driven by the harness (:mod:`router.bench.quality`) one request at a
time: ``choose`` draws a model for the prompt's features at the request's preference among
the models offered, ``learn`` gets the chosen model's quality and cost only (bandit
feedback), and ``greedy`` picks, without exploration, for a batch of held-out prompts at a
given preference. Full-information routers instead ``fit`` once on every model's labels.

Adapters:

- :class:`PolicyLearner`: any :class:`~router.policy.base.RoutingPolicy` the workers run
  (the decomposed policy with TS or UCB; BaRP as published, :mod:`router.policy.barp`).
- :class:`RiverContextFree`: River's EpsilonGreedy, UCB and ThompsonSampling. They learn
  one scalar reward per arm and have one greedy arm, so under the "barp" protocol the
  harness trains one instance per evaluated preference (``per_preference``).
  ThompsonSampling's Beta posterior needs rewards in {0, 1}: the reward, shifted into
  [0, 1] by ``+ (1 - w_q)``, is turned into a Bernoulli draw (Agrawal & Goyal's trick).
- :class:`RiverLinUCB`: River's LinUCBDisjoint on the sketched features, with the
  preference in the context (``w_q * z`` and ``w_c * z``), so one linear model per arm can
  represent w_q * q(x) - w_c * c(x) and serve any preference. River 0.26.1's LinUCBDisjoint
  passes ``burn_in`` positionally into the ``reward_scaler`` slot of ``Policy.__init__``
  (``super().__init__(reward_obj, burn_in)``): the burn-in is silently 0, and any
  ``burn_in > 0`` becomes an int "reward scaler" that crashes the first ``update`` with
  ``AttributeError: 'int' object has no attribute '_update'``. The adapter constructs it
  with ``burn_in=0`` and sets the ``burn_in`` attribute afterwards.
- :class:`ParetoBanditLearner`: ParetoBandit's core ``DisjointLinUCBPolicy`` fed our
  features (PCA-whitened, as its FeatureService does), learning quality as its reward with
  the per-model cost as a selection-time penalty, as ParetoBandit routes.
- :class:`VWLearner`: Vowpal Wabbit ``--cb_explore_adf`` (epsilon-greedy), cost = -reward,
  the preference folded into the shared features the same way as for LinUCB.
- :class:`KNNRouter`, :class:`MLPRouter`: offline full-information routers (RouterBench's
  kNN and MLP baselines): predict every model's quality and cost from the embedding, then
  route by the reward at the requested preference. numpy only.

Optional peers that cannot be imported are reported by :func:`optional_peers` with the
reason, and the harness skips them.
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass

import numpy as np

from router.datasets import RoutingDataset
from router.policy.barp import BaRPPolicy
from router.policy.base import RoutingPolicy
from router.policy.decomposed import DecomposedPolicy
from router.policy.pooled import PooledDecomposedPolicy
from schemas.reward import reward as barp_reward


def sketch_matrix(dim: int, m: int, seed: int = 0) -> np.ndarray:
    """The Gaussian JL projection the decomposed policy uses (same seed, same matrix)."""
    return np.random.default_rng(seed).standard_normal((dim, m)) / np.sqrt(m)


def _masked_argmax(scores: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    return scores.argmax(axis=1)


class Learner(abc.ABC):
    """One router under test."""

    name: str = "learner"
    #: Context-free scalar-reward learners: the barp protocol trains one per preference.
    per_preference: bool = False
    #: Offline routers trained with every model's labels: ``fit`` instead of choose/learn.
    full_information: bool = False

    def choose(self, x: np.ndarray, w_quality: float, allowed: np.ndarray,
               rng: np.random.Generator) -> int:
        raise NotImplementedError

    def learn(self, arm: int, x: np.ndarray, quality: float, cost_usd: float, w_quality: float) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def greedy(self, X: np.ndarray, w_quality: float, allowed: np.ndarray) -> np.ndarray: ...

    def fit(self, dataset: RoutingDataset, X: np.ndarray) -> None:
        raise NotImplementedError


class PolicyLearner(Learner):
    """A routeloop RoutingPolicy, exactly as the workers run it."""

    def __init__(self, policy: RoutingPolicy, name: str | None = None) -> None:
        self.policy = policy
        self.name = name or policy.name
        self._wants_preference = isinstance(policy, BaRPPolicy)

    def choose(self, x, w_quality, allowed, rng):
        return self.policy.decide(x, w_quality, allowed, rng=rng).arm

    def learn(self, arm, x, quality, cost_usd, w_quality):
        if self._wants_preference:
            self.policy.learn(arm, x, quality, cost_usd, w_quality=w_quality)
        else:
            self.policy.learn(arm, x, quality, cost_usd)

    def greedy(self, X, w_quality, allowed):
        return self.policy.greedy(X, w_quality, allowed)


class IncrementalInverse:
    """Mixin for the decomposed policies: update only the inverse of the arm an outcome changed.

    DecomposedPolicy drops every arm's derived estimates on each ``learn`` and inverts all K
    matrices at the next decision: O(K d^3) a step. Here the changed arm's inverse gets a
    Sherman-Morrison rank-one update, O(d^2), and is recomputed exactly by ``np.linalg.inv``
    every ``refresh`` updates of that arm so rounding cannot drift. The state (the sums) and
    the decisions are the policy's own, up to float rounding. Used by the benchmark for speed.
    """

    refresh = 256
    _A_inv: np.ndarray | None = None

    def _inverse(self) -> np.ndarray:
        if self._A_inv is None or self._A_inv.shape != self.A.shape:
            self._A_inv = np.linalg.inv(self.A)
        return self._A_inv

    def _thetas(self, A_inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.einsum("kij,kj->ki", A_inv, self.b_quality),
                np.einsum("kij,kj->ki", A_inv, self.b_cost))

    def estimates(self):
        if self._derived is None:
            A_inv = self._inverse()
            self._derived = (*self._thetas(A_inv), A_inv)
        return self._derived

    def learn(self, arm, x, quality, cost_usd):
        A_inv = self._inverse()
        super().learn(arm, x, quality, cost_usd)
        if self.counts[arm] % self.refresh == 0:
            A_inv[arm] = np.linalg.inv(self.A[arm])
        else:
            z = self.features(x)
            u = A_inv[arm] @ z
            A_inv[arm] -= np.outer(u, u) / (1.0 + z @ u)


class IncrementalDecomposedPolicy(IncrementalInverse, DecomposedPolicy):
    """:class:`DecomposedPolicy` with incremental inverses (see :class:`IncrementalInverse`)."""


class IncrementalPooledPolicy(IncrementalInverse, PooledDecomposedPolicy):
    """:class:`PooledDecomposedPolicy` with incremental inverses."""

    _thetas = PooledDecomposedPolicy._thetas


# River's context-free policies.


class RiverContextFree(Learner):
    """River EpsilonGreedy / UCB / ThompsonSampling on the scalar reward."""

    per_preference = True

    def __init__(self, kind: str, arms: list[str], tau: float, seed: int,
                 epsilon: float = 0.1, delta: float = 0.5) -> None:
        from river import bandit, proba

        self.kind, self.arms, self.tau = kind, list(arms), tau
        self._coin = random.Random(seed + 101)
        if kind == "epsilon-greedy":
            self.policy = bandit.EpsilonGreedy(epsilon=epsilon, seed=seed)
        elif kind == "ucb":
            self.policy = bandit.UCB(delta=delta, seed=seed)
        elif kind == "thompson":
            self.policy = bandit.ThompsonSampling(reward_obj=proba.Beta(), seed=seed)
        else:
            raise ValueError(f"unknown River policy {kind!r}")
        self.name = f"river-{kind}"

    def choose(self, x, w_quality, allowed, rng):
        offered = [k for k in range(len(self.arms)) if allowed[k]]
        return int(self.policy.pull(offered))

    def learn(self, arm, x, quality, cost_usd, w_quality):
        r = float(barp_reward(quality, cost_usd, w_quality, self.tau))
        if self.kind == "thompson":
            scaled = min(max(r + (1.0 - w_quality), 0.0), 1.0)  # [-(1-w), w] -> [0, 1]
            self.policy.update(arm, self._coin.random() < scaled)
        else:
            self.policy.update(arm, r)

    def _means(self) -> np.ndarray:
        means = np.full(len(self.arms), -np.inf)
        for arm, stat in self.policy._rewards.items():
            if self.policy._counts[arm] == 0:
                continue
            if hasattr(stat, "alpha"):  # Beta posterior: its mean
                means[arm] = stat.alpha / (stat.alpha + stat.beta)
            else:
                means[arm] = stat.get()
        return means

    def greedy(self, X, w_quality, allowed):
        scores = np.broadcast_to(self._means(), allowed.shape)
        return _masked_argmax(np.array(scores), allowed)


def preference_context(z: np.ndarray, w_quality: float) -> np.ndarray:
    """[w_q * z, w_c * z]: a linear model on this serves w_q * q(x) - w_c * c(x) for every w."""
    return np.concatenate([w_quality * z, (1.0 - w_quality) * z], axis=-1)


class RiverLinUCB(Learner):
    """River's LinUCBDisjoint on sketched features with the preference in the context."""

    def __init__(self, arms: list[str], dim: int, tau: float, seed: int, sketch_dim: int = 32,
                 alpha: float = 1.0, beta: float = 1.0, burn_in: int = 1) -> None:
        from river import bandit

        self.arms, self.tau = list(arms), tau
        self.sketch = sketch_matrix(dim, sketch_dim) if sketch_dim and sketch_dim < dim else None
        # River 0.26.1: LinUCBDisjoint(burn_in=n) hands n to Policy.__init__ as reward_scaler,
        # so construct with burn_in=0 and set the attribute the base class reads.
        self.policy = bandit.LinUCBDisjoint(alpha=alpha, beta=beta, burn_in=0, seed=seed)
        self.policy.burn_in = burn_in
        self.name = "river-linucb"
        n = (self.sketch.shape[1] if self.sketch is not None else dim) + 1
        self._keys = [f"q{j}" for j in range(n)] + [f"c{j}" for j in range(n)]

    def _context(self, x: np.ndarray, w_quality: float) -> dict:
        z = x @ self.sketch if self.sketch is not None else np.asarray(x)
        z = np.append(z, 1.0)
        return dict(zip(self._keys, preference_context(z, w_quality).tolist()))

    def choose(self, x, w_quality, allowed, rng):
        offered = [k for k in range(len(self.arms)) if allowed[k]]
        return int(self.policy.pull(offered, self._context(x, w_quality)))

    def learn(self, arm, x, quality, cost_usd, w_quality):
        r = float(barp_reward(quality, cost_usd, w_quality, self.tau))
        self.policy.update(arm, self._context(x, w_quality), r)

    def greedy(self, X, w_quality, allowed):
        scores = np.full(allowed.shape, -np.inf)
        regs = self.policy._bayes_lin_regs
        for i, x in enumerate(X):
            context = self._context(x, w_quality)
            for k in range(len(self.arms)):
                if allowed[i, k] and k in regs:
                    scores[i, k] = regs[k].predict_one(context)
        return _masked_argmax(scores, allowed)


# Optional peers.


def optional_peers() -> dict[str, str | None]:
    """{peer: None if importable, else why not}."""
    status: dict[str, str | None] = {}
    try:
        import pareto_bandit  # noqa: F401

        status["paretobandit"] = None
    except Exception as error:  # ImportError, or a broken install
        status["paretobandit"] = f"not importable ({type(error).__name__}: {error}); pip install paretobandit"
    try:
        import vowpalwabbit  # noqa: F401

        status["vowpalwabbit"] = None
    except Exception as error:
        status["vowpalwabbit"] = f"not importable ({type(error).__name__}: {error}); pip install vowpalwabbit"
    return status


@dataclass
class Whitener:
    """PCA whitening fitted on unlabelled prompt vectors (ParetoBandit's FeatureService does this)."""

    mean: np.ndarray
    components: np.ndarray  # (dim, m), scaled by 1/sqrt(variance)

    @classmethod
    def fit(cls, X: np.ndarray, m: int) -> Whitener:
        X = np.asarray(X, dtype=np.float64)
        mean = X.mean(axis=0)
        _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
        variance = s[:m] ** 2 / max(len(X) - 1, 1)
        return cls(mean, vt[:m].T / np.sqrt(np.maximum(variance, 1e-12)))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean) @ self.components


class ParetoBanditLearner(Learner):
    """ParetoBandit's DisjointLinUCBPolicy (library defaults) on PCA-whitened features.

    ParetoBandit learns quality as the reward and subtracts a per-model cost penalty at
    selection (its paper's Eq. 4); here the penalty is our reward's own cost term, from the
    running mean cost of each model's observed calls, rescaled so that the arm maximising
    ``q_ucb - penalty`` maximises w_q * q - w_c * min(c / tau, 1).
    """

    def __init__(self, arms: list[str], tau: float, seed: int, whitener: Whitener,
                 alpha: float | None = None) -> None:
        from pareto_bandit import DisjointLinUCBPolicy

        self.arms, self.tau, self.whitener = list(arms), tau, whitener
        dim = whitener.components.shape[1] + 1
        kwargs = {} if alpha is None else {"alpha": alpha}
        self.policy = DisjointLinUCBPolicy(list(range(len(arms))), dim=dim, seed=seed, **kwargs)
        self.cost_sum = np.zeros(len(arms))
        self.cost_n = np.zeros(len(arms))
        self.name = "paretobandit"

    def _z(self, X: np.ndarray) -> np.ndarray:
        Z = self.whitener(np.atleast_2d(X))  # unit variance per component, as A_0 = I assumes
        return np.concatenate([Z, np.ones((len(Z), 1))], axis=1)

    def _penalties(self, w_quality: float) -> np.ndarray:
        mean_cost = np.where(self.cost_n > 0, self.cost_sum / np.maximum(self.cost_n, 1), 0.0)
        w = max(w_quality, 1e-3)
        return (1.0 - w) / w * np.minimum(mean_cost / self.tau, 1.0)

    def choose(self, x, w_quality, allowed, rng):
        z = self._z(x)[0]
        penalties = self._penalties(w_quality)
        offered = [k for k in range(len(self.arms)) if allowed[k]]
        arm, _ = self.policy.select_arm(z, candidates=offered,
                                        cost_penalties={k: penalties[k] for k in offered})
        return int(arm)

    def learn(self, arm, x, quality, cost_usd, w_quality):
        self.policy.update(arm, self._z(x)[0], float(quality))
        self.cost_sum[arm] += cost_usd
        self.cost_n[arm] += 1

    def greedy(self, X, w_quality, allowed):
        Z = self._z(X)
        theta = np.stack([self.policy.theta[k] for k in range(len(self.arms))])
        scores = Z @ theta.T - self._penalties(w_quality)[None, :]
        return _masked_argmax(scores, allowed)


class VWLearner(Learner):
    """Vowpal Wabbit contextual bandit, ``--cb_explore_adf`` with epsilon-greedy exploration.

    Shared features: the sketched prompt vector times w_q (namespace ``q``) and times w_c
    (namespace ``c``), each crossed with the action's model id (namespace ``a``), so VW's
    linear cost model can represent -(w_q * q_a(x) - w_c * c_a(x)) for any preference.
    """

    def __init__(self, arms: list[str], dim: int, tau: float, seed: int, sketch_dim: int = 64,
                 epsilon: float = 0.05, learning_rate: float = 0.5) -> None:
        import vowpalwabbit

        self.arms, self.tau = list(arms), tau
        self.sketch = sketch_matrix(dim, sketch_dim) if sketch_dim and sketch_dim < dim else None
        self.vw = vowpalwabbit.Workspace(
            f"--cb_explore_adf --epsilon {epsilon} -q qa -q ca -l {learning_rate} "
            f"--random_seed {seed} --quiet"
        )
        self.name = "vowpalwabbit"

    def _shared(self, x: np.ndarray, w_quality: float) -> str:
        z = x @ self.sketch if self.sketch is not None else np.asarray(x)
        q = " ".join(f"{j}:{v:.6g}" for j, v in enumerate(w_quality * z))
        c = " ".join(f"{j}:{v:.6g}" for j, v in enumerate((1.0 - w_quality) * z))
        return f"shared |q bias:{w_quality:.6g} {q} |c bias:{1.0 - w_quality:.6g} {c}"

    def _example(self, shared: str, offered: list[int], label: tuple[int, float, float] | None = None):
        lines = [shared]
        for k in offered:
            prefix = ""
            if label is not None and label[0] == k:
                prefix = f"0:{label[1]:.6g}:{label[2]:.6g} "
            lines.append(f"{prefix}|a m{k}")
        return lines

    def choose(self, x, w_quality, allowed, rng):
        offered = [k for k in range(len(self.arms)) if allowed[k]]
        pmf = np.asarray(self.vw.predict(self._example(self._shared(x, w_quality), offered)))
        pmf = pmf / pmf.sum()
        index = int(rng.choice(len(offered), p=pmf))
        self._last = (offered, float(pmf[index]))
        return offered[index]

    def learn(self, arm, x, quality, cost_usd, w_quality):
        offered, probability = self._last
        cost = -float(barp_reward(quality, cost_usd, w_quality, self.tau))
        self.vw.learn(self._example(self._shared(x, w_quality), offered, (arm, cost, probability)))

    def greedy(self, X, w_quality, allowed):
        choices = np.empty(len(X), dtype=int)
        for i, x in enumerate(X):
            offered = [k for k in range(len(self.arms)) if allowed[i, k]]
            pmf = np.asarray(self.vw.predict(self._example(self._shared(x, w_quality), offered)))
            choices[i] = offered[int(pmf.argmax())]  # epsilon-greedy: the mode is the greedy action
        return choices


# Offline full-information routers.


def _route_by_estimates(q_hat: np.ndarray, c_hat: np.ndarray, w_quality: float, tau: float,
                        allowed: np.ndarray) -> np.ndarray:
    scores = w_quality * q_hat - (1.0 - w_quality) * np.minimum(np.maximum(c_hat, 0.0) / tau, 1.0)
    return _masked_argmax(scores, allowed)


class KNNRouter(Learner):
    """k nearest train prompts by cosine similarity; each model's mean quality and cost there,
    shrunk toward the model's overall mean by ``shrink`` pseudo-neighbours (without it, small
    neighbourhoods tie many models at quality 1.0 and the tie-break decides)."""

    full_information = True

    def __init__(self, tau: float, k: int = 40, shrink: float = 5.0) -> None:
        self.tau, self.k, self.shrink = tau, k, shrink
        self.name = "knn (full-info)"

    def fit(self, dataset, X):
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        self.X = X / np.maximum(norms, 1e-12)
        available = dataset.available
        self.quality = np.where(available, dataset.quality, 0.0)
        self.cost = np.where(available, dataset.cost, 0.0)
        self.present = available.astype(np.float64)
        self.prior_q = self.quality.sum(0) / np.maximum(self.present.sum(0), 1)
        self.prior_c = self.cost.sum(0) / np.maximum(self.present.sum(0), 1)

    def estimates(self, X):
        Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        similarity = Xn @ self.X.T
        k = min(self.k, len(self.X))
        neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        counts = self.present[neighbours].sum(1)
        q = (self.quality[neighbours].sum(1) + self.shrink * self.prior_q) / (counts + self.shrink)
        c = (self.cost[neighbours].sum(1) + self.shrink * self.prior_c) / (counts + self.shrink)
        return q, c

    def greedy(self, X, w_quality, allowed):
        q, c = self.estimates(X)
        return _route_by_estimates(q, c, w_quality, self.tau, allowed)


class MLPRouter(Learner):
    """A one-hidden-layer MLP on the embedding predicting every model's quality (sigmoid,
    cross-entropy) and cost (in units of tau, squared error), masked where a model has no
    record; full-batch Adam. numpy only."""

    full_information = True

    def __init__(self, tau: float, seed: int, hidden: int = 128, epochs: int = 300,
                 lr: float = 3e-3, weight_decay: float = 1e-4) -> None:
        self.tau, self.seed, self.hidden = tau, seed, hidden
        self.epochs, self.lr, self.weight_decay = epochs, lr, weight_decay
        self.name = "mlp (full-info)"

    def fit(self, dataset, X):
        rng = np.random.default_rng(self.seed)
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        K = len(dataset.models)
        mask = dataset.available.astype(np.float64)
        Q = np.where(dataset.available, dataset.quality, 0.0)
        C = np.where(dataset.available, dataset.cost, 0.0) / self.tau
        H = self.hidden
        params = {
            "W1": rng.standard_normal((d, H)) * np.sqrt(2.0 / d), "b1": np.zeros(H),
            "Wq": rng.standard_normal((H, K)) * np.sqrt(1.0 / H), "bq": np.zeros(K),
            "Wc": rng.standard_normal((H, K)) * np.sqrt(1.0 / H), "bc": np.zeros(K),
        }
        m = {k: np.zeros_like(v) for k, v in params.items()}
        v = {k: np.zeros_like(v) for k, v in params.items()}
        for step in range(1, self.epochs + 1):
            pre = X @ params["W1"] + params["b1"]
            h = np.maximum(pre, 0.0)
            logits = h @ params["Wq"] + params["bq"]
            q_hat = 1.0 / (1.0 + np.exp(-logits))
            c_hat = h @ params["Wc"] + params["bc"]
            scale = mask.sum()
            d_logits = (q_hat - Q) * mask / scale
            d_c = 2.0 * (c_hat - C) * mask / scale
            grads = {
                "Wq": h.T @ d_logits, "bq": d_logits.sum(0),
                "Wc": h.T @ d_c, "bc": d_c.sum(0),
            }
            d_h = (d_logits @ params["Wq"].T + d_c @ params["Wc"].T) * (pre > 0)
            grads["W1"] = X.T @ d_h
            grads["b1"] = d_h.sum(0)
            for key in params:
                grad = grads[key] + (self.weight_decay * params[key] if key.startswith("W") else 0.0)
                m[key] = 0.9 * m[key] + 0.1 * grad
                v[key] = 0.999 * v[key] + 0.001 * grad**2
                params[key] -= self.lr * (m[key] / (1 - 0.9**step)) / (np.sqrt(v[key] / (1 - 0.999**step)) + 1e-8)
        self.params = params

    def estimates(self, X):
        p = self.params
        h = np.maximum(np.asarray(X, dtype=np.float64) @ p["W1"] + p["b1"], 0.0)
        q = 1.0 / (1.0 + np.exp(-(h @ p["Wq"] + p["bq"])))
        c = (h @ p["Wc"] + p["bc"]) * self.tau
        return q, c

    def greedy(self, X, w_quality, allowed):
        q, c = self.estimates(X)
        return _route_by_estimates(q, c, w_quality, self.tau, allowed)
