"""The preference-decomposed policy: per arm, online ridge estimates of quality and of cost.

For each arm ``a`` it keeps the sufficient statistics of two Bayesian linear regressions on
the (sketched) prompt features z = [S x, 1]: ``A_a = lambda*I + sum z z^T``, ``b_a = sum q z``
and ``c_a = sum cost z``. A decision scores each arm for the request's own preference

    score_a = w_q * q_a - w_c * min(cost_a / tau, 1)

so one model serves every preference exactly. Exploration samples q_a and cost_a from their
posteriors (Thompson sampling) or takes optimistic bounds (UCB). Because only sums are kept,
the learner's state is exactly reproducible: the same outcomes in the same order give
bit-identical arrays, whatever crashed in between.

>>> import numpy as np
>>> policy = DecomposedPolicy(["small", "large"], dim=4, tau=0.01, seed=0)
>>> x = np.array([1.0, 0.0, 0.0, 0.0])
>>> for _ in range(50):
...     policy.learn(0, x, quality=0.5, cost_usd=0.0001)
...     policy.learn(1, x, quality=0.9, cost_usd=0.0090)
>>> [policy.arms[a] for a in policy.greedy(x[None, :], w_quality=1.0)]
['large']
>>> [policy.arms[a] for a in policy.greedy(x[None, :], w_quality=0.5)]
['small']
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_right
from itertools import accumulate
from math import sqrt
from typing import Literal

import numpy as np

from router.policy.base import Choice, RoutingPolicy

Exploration = Literal["ts", "ucb"]


def _aligned(shape: tuple[int, ...], dtype=np.float32, align: int = 64) -> np.ndarray:
    """An empty C-contiguous array whose data starts on an ``align``-byte boundary.

    OpenBLAS's float32 matrix-vector kernels run about a quarter faster on 64-byte-aligned
    rows than on numpy's default 16-byte alignment.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + align, dtype=np.uint8)
    start = -buf.ctypes.data % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)


class _Scratch:
    """One thread's preallocated buffers for decide() and learn(): no array per event.

    Every buffer is written before it is read, on every call, except the constant intercept
    entries ``z[-1]`` and ``z32[-1]`` (1.0, set here and never written elsewhere); nothing
    returned to a caller is a view of one (a Choice's distribution is a fresh array).
    """

    __slots__ = ("K", "D", "S", "dim", "x", "x32", "z", "z_head", "z32", "z32_head", "means",
                 "mean_q", "mean_c", "az", "az_rows", "out32", "az32_rows", "means32", "w2", "w2_32",
                 "width", "sw", "sw_col", "noise", "draws", "best", "outer", "zq")

    def __init__(self, K: int, D: int, dim: int, samples: int) -> None:
        self.K, self.D, self.S, self.dim = K, D, samples, dim
        self.x = np.empty(dim)                  # the request's features, as float64
        self.x32 = _aligned((dim,))             # ... as float32 (prepared, x not float32)
        self.z = np.empty(D)                    # [S x, 1]
        self.z[-1] = 1.0
        self.z_head = self.z[:-1]
        self.z32 = _aligned((D,))
        self.z32[-1] = 1.0
        self.z32_head = self.z32[:-1]
        self.means = np.empty(2 * K)            # theta_q z, theta_c z
        self.mean_q, self.mean_c = self.means.reshape(2, K, 1)  # ... as columns
        self.az = np.empty(K * D)               # A_k^-1 z, every arm at once
        self.az_rows = self.az.reshape(K, D)
        self.out32 = _aligned((K * D + 2 * K,))  # prepared: [A_k^-1 z for every k, theta z]
        self.az32_rows = self.out32[:K * D].reshape(K, D)
        self.means32 = self.out32[K * D:]
        self.w2 = np.empty(K)                   # z^T A_k^-1 z
        self.w2_32 = np.empty(K, dtype=np.float32)
        self.width = np.empty(K)
        self.sw = np.empty(K)                   # scale * width
        self.sw_col = self.sw[:, None]
        # The normal draws in the rng's order (sample, arm), then arm-major (arm, sample) so that
        # every broadcast runs along rows of `samples` values, not of K: about 8x faster.
        self.noise = np.empty((2, samples, K))
        self.draws = np.empty((2, K, samples))  # the draws, then the scores of each draw
        self.best = np.empty(samples, dtype=np.intp)
        self.outer = np.empty((D, D))           # z z^T
        self.zq = np.empty(D)                   # y z


class _Hot:
    """What decisions read, derived from one ``estimates()`` tuple (rebuilt when it changes).

    Unprepared (a decision right after a ``learn()``), everything is float64: ``a_flat`` is
    every arm's A^-1 stacked, (K*D, D), for the variances z^T A_k^-1 z, and a decision is
    bit-identical to the batch formulas of :meth:`DecomposedPolicy.decide`.

    A prepared state (``prepare()``, which the router runs on every snapshot before the swap)
    computes S x, every A_k^-1 z and the means theta z in float32, from float32 copies of the
    sketch and of [A^-1 stacked; theta] (``w32``: the D - 1 columns that multiply S x, 64-byte
    rows at D = 129; ``col32``: the intercept's). The product streams half the bytes of the
    float64 one (0.7 MB instead of 1.5 MB at K = 11, D = 129: what counts once other work has
    evicted it from the cache), 128-float aligned rows run about 1.3x faster than 129-float
    ones, and the means come out of the same product. The scores, the distribution and the
    draw are float64 as unprepared. The price, measured at
    K = 11, d = 384 up to some 600 thousand outcomes an arm, and bounded with margin by
    tests/test_bench_speed.py: z within 1.3e-7 of the float64 z (unit x, absolute; bound
    1e-6), the means within 1.1e-7 of their scale |theta| |z| (bound 1e-6), the variances
    within 3e-7 relative (bound 1e-5). A UCB decision changes only when two arms' bounds tie to
    that, a Thompson-sampling one only when two draws do (against a Monte-Carlo error of the
    128-draw distribution of several percent). The exploration floor and the propensities are
    exact either way: the arm is drawn from exactly the distribution returned. The learner's
    state stays float64 throughout.
    """

    __slots__ = ("source", "K", "D", "prepared", "theta", "a_flat", "w32", "col32", "sketch32",
                 "uniform", "greedy_mass")

    def __init__(self, source: tuple[np.ndarray, np.ndarray, np.ndarray], epsilon: float,
                 prepared: bool = False, sketch: np.ndarray | None = None) -> None:
        theta_q, theta_c, A_inv = source
        K, D = A_inv.shape[0], A_inv.shape[1]
        self.source = source
        self.K, self.D, self.prepared = K, D, prepared
        self.theta = np.concatenate([theta_q, theta_c])       # (2K, D): both means in one product
        self.uniform = epsilon * np.ones(K, dtype=bool) / K   # the floor when every arm is offered
        self.greedy_mass = 1.0 - epsilon
        if not prepared:  # no copy: the float64 inverse itself
            self.a_flat = np.ascontiguousarray(A_inv).reshape(K * D, D)
            self.w32 = self.col32 = self.sketch32 = None
            return
        self.a_flat = None
        # Every arm's A^-1 and both thetas stacked, (K*D + 2K, D), split into the columns that
        # multiply S x (D - 1 of them: 64-byte rows at D = 129) and the intercept's column.
        self.w32 = _aligned((K * D + 2 * K, D - 1))
        self.col32 = _aligned((K * D + 2 * K,))
        for rows, block in ((slice(0, K * D), A_inv.reshape(K * D, D)), (slice(K * D, None), self.theta)):
            np.copyto(self.w32[rows], block[:, :-1], casting="same_kind")
            np.copyto(self.col32[rows], block[:, -1], casting="same_kind")
        if sketch is None:
            self.sketch32 = None
        else:
            self.sketch32 = _aligned(sketch.shape)
            np.copyto(self.sketch32, sketch, casting="same_kind")


class DecomposedPolicy(RoutingPolicy):
    """Preference-decomposed contextual bandit (BaRP's reward, learned per objective).

    Parameters
    ----------
    arms, dim, tau
        Model names, the featuriser's dimension, and the cost cap in USD.
    exploration
        ``"ts"`` (Thompson sampling) or ``"ucb"``.
    sketch_dim
        Features are projected to this many dimensions by a fixed random matrix (seeded by
        ``sketch_seed``) before learning; ``None`` or a value >= dim keeps them as they are.
        The projection keeps snapshots and decisions small: the state is O(K * sketch_dim^2).
    prior
        Ridge strength lambda (the prior precision of every weight).
    scale
        Posterior scale of the quality estimate (TS) or the UCB width, in quality units.
    cost_scale
        The same for the cost estimate, in USD.
    epsilon
        Share of uniform exploration mixed into every distribution: every offered arm keeps
        a propensity of at least epsilon / K, which off-policy evaluation needs.
    samples
        Posterior draws used to compute the Thompson-sampling action distribution.
    """

    def __init__(
        self,
        arms: list[str],
        dim: int,
        tau: float = 0.01,
        exploration: Exploration = "ts",
        sketch_dim: int | None = 128,
        sketch_seed: int = 0,
        prior: float = 1.0,
        scale: float = 0.25,
        cost_scale: float | None = None,
        epsilon: float = 0.02,
        samples: int = 128,
        seed: int | None = None,
    ) -> None:
        super().__init__(arms, dim, tau)
        if exploration not in ("ts", "ucb"):
            raise ValueError(f"exploration must be 'ts' or 'ucb', got {exploration!r}")
        self.exploration = exploration
        self.name = f"decomposed-{exploration}"
        self.sketch_dim = sketch_dim if sketch_dim and sketch_dim < dim else None
        self.sketch_seed = sketch_seed
        self.prior = float(prior)
        self.scale = float(scale)
        self.cost_scale = float(cost_scale) if cost_scale is not None else 0.25 * tau
        self.epsilon = float(epsilon)
        self.samples = int(samples)
        self.rng = np.random.default_rng(seed)
        self._sketch = self._make_sketch()
        n_features = (self.sketch_dim or dim) + 1  # + intercept
        K = len(arms)
        self.A = np.tile(np.eye(n_features) * self.prior, (K, 1, 1))
        self.b_quality = np.zeros((K, n_features))
        self.b_cost = np.zeros((K, n_features))
        self.counts = np.zeros(K, dtype=np.int64)
        #: The price each arm's cost sums are expressed at (0: no price registered yet).
        self.prices = np.zeros(K)
        self._derived: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._hot: _Hot | None = None
        self._local = threading.local()  # per-thread scratch buffers (see _scratch)

    @property
    def n_features(self) -> int:
        return self.A.shape[1]

    def _make_sketch(self) -> np.ndarray | None:
        if self.sketch_dim is None:
            return None
        # Gaussian JL projection scaled so that inner products are preserved in expectation.
        rng = np.random.default_rng(self.sketch_seed)
        return rng.standard_normal((self.dim, self.sketch_dim)) / np.sqrt(self.sketch_dim)

    def features(self, X: np.ndarray) -> np.ndarray:
        """The learning features z = [S x, 1] for each row of ``X`` (n, dim) or one ``x``."""
        X = np.asarray(X, dtype=np.float64)
        if X.shape[-1] != self.dim:
            raise ValueError(f"features have dimension {X.shape[-1]}, the policy expects {self.dim}")
        Z = X @ self._sketch if self._sketch is not None else X
        return np.concatenate([Z, np.ones(Z.shape[:-1] + (1,))], axis=-1)

    # The per-event hot path: one thread's buffers, no temporary arrays. Every operation is
    # the one the batch formulas above and below spell out, in the same order, so the results
    # are bit-identical to them (tests/test_bench_speed.py checks this against a reference).

    def _scratch(self) -> _Scratch:
        scratch = getattr(self._local, "scratch", None)
        K, D = self.A.shape[0], self.A.shape[1]
        if scratch is None or scratch.K != K or scratch.D != D or scratch.S != self.samples:
            scratch = self._local.scratch = _Scratch(K, D, self.dim, self.samples)
        return scratch

    def _check_shape(self, x: np.ndarray) -> None:
        if x.shape != (self.dim,):
            if x.shape[-1:] != (self.dim,):
                raise ValueError(f"features have dimension {x.shape[-1]}, the policy expects {self.dim}")
            raise ValueError(f"expected one feature vector of shape ({self.dim},), got {x.shape}")

    def _features_into(self, x: np.ndarray, scratch: _Scratch) -> np.ndarray:
        """``features(x)`` for one vector, into ``scratch.z`` (returned), in float64."""
        x = np.asarray(x)
        self._check_shape(x)
        if self._sketch is not None:
            np.copyto(scratch.x, x)  # float64 first: the product must be the float64 one
            np.matmul(scratch.x, self._sketch, out=scratch.z_head)
        else:
            np.copyto(scratch.z_head, x)
        return scratch.z  # z[-1] is 1.0 for good

    # Learning: sums only, so that the state is exactly reproducible.

    def learn(self, arm: int, x: np.ndarray, quality: float, cost_usd: float) -> None:
        scratch = self._scratch()
        x = np.asarray(x)
        z = self._features_into(x[0] if x.shape == (1, self.dim) else x, scratch)
        A = self.A[arm]
        np.add(A, np.multiply(z[:, None], z[None, :], out=scratch.outer), out=A)  # A += z z^T
        b = self.b_quality[arm]
        np.add(b, np.multiply(quality, z, out=scratch.zq), out=b)
        b = self.b_cost[arm]
        np.add(b, np.multiply(cost_usd, z, out=scratch.zq), out=b)
        self.counts[arm] += 1
        self.n_updates += 1
        self._derived = None

    def add_arm(self, name: str) -> None:
        """Add a candidate model at run time; it starts from the prior."""
        if name in self.arms:
            raise ValueError(f"arm {name!r} exists")
        d = self.n_features
        self.arms.append(name)
        self.A = np.concatenate([self.A, np.eye(d)[None] * self.prior])
        self.b_quality = np.concatenate([self.b_quality, np.zeros((1, d))])
        self.b_cost = np.concatenate([self.b_cost, np.zeros((1, d))])
        self.counts = np.append(self.counts, 0)
        self.prices = np.append(self.prices, 0.0)
        self._derived = None
        self._hot = None

    def set_price(self, arm: int, price: float) -> None:
        """Rescale ``arm``'s cost sums from the price they are expressed at to ``price``.

        Cost is linear in the price, and A does not depend on cost, so scaling b_cost scales
        the cost estimate exactly: the state is that of having seen every cost at ``price``.
        """
        if not price > 0:
            raise ValueError(f"price must be positive, got {price!r}")
        old = self.prices[arm]
        if old == price:
            return
        if old > 0:
            self.b_cost[arm] *= price / old
        self.prices[arm] = price
        self._derived = None

    # Estimates: derived from the sums when first needed after a change.

    def estimates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(theta_quality, theta_cost, A^-1): per-arm posterior means and covariances."""
        if self._derived is None:
            A_inv = np.linalg.inv(self.A)
            theta_q = np.einsum("kij,kj->ki", A_inv, self.b_quality)
            theta_c = np.einsum("kij,kj->ki", A_inv, self.b_cost)
            self._derived = (theta_q, theta_c, A_inv)
        return self._derived

    def prepare(self) -> None:
        """Derive what decisions read (estimates and their float32 products, see _Hot) now."""
        self._hot = self._make_hot(self.estimates(), prepared=True)

    def _scores(self, q: np.ndarray, c: np.ndarray, w_quality: float) -> np.ndarray:
        return w_quality * q - (1.0 - w_quality) * np.minimum(np.maximum(c, 0.0) / self.tau, 1.0)

    def _hot_arrays(self) -> _Hot:
        derived = self.estimates()
        hot = self._hot
        if hot is None or hot.source is not derived:  # a learn() or a new snapshot since
            hot = self._hot = self._make_hot(derived, prepared=False)
        return hot

    def _make_hot(self, derived: tuple[np.ndarray, np.ndarray, np.ndarray], prepared: bool) -> _Hot:
        return _Hot(derived, self.epsilon, prepared=prepared, sketch=self._sketch)

    def decide(self, x, w_quality, allowed=None, rng=None) -> Choice:
        """Draw an arm for ``x`` at preference ``w_quality``.

        The Thompson-sampling distribution, for z = [S x, 1] and each arm k::

            mean_q, mean_c = theta_q z, theta_c z;   width = sqrt(z^T A_k^-1 z)
            for each of ``samples`` draws n1, n2 ~ N(0, 1):
                score_k = w_q * (mean_q + scale * width * n1)
                          - w_c * min(max(mean_c + cost_scale * width * n2, 0) / tau, 1)
            greedy_share_k = share of the draws in which arm k scores highest (offered arms)
            distribution = (1 - epsilon) * greedy_share + epsilon * uniform(offered)

        UCB scores the optimistic bounds once instead. The arm is drawn from ``distribution``.
        After ``prepare()``, z, the variances and the means are float32 products (see :class:`_Hot`).
        """
        if rng is None:
            rng = self.rng
        hot = self._hot
        if hot is None or hot.source is not self._derived:  # a learn() or a new snapshot since
            hot = self._hot_arrays()
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.K != hot.K or scratch.D != hot.D or scratch.S != self.samples:
            scratch = self._scratch()
        K = hot.K
        if type(x) is not np.ndarray:
            x = np.asarray(x)
        if x.shape != (scratch.dim,):
            self._check_shape(x)
        # z = [S x, 1], then every arm's A_k^-1 z in one (K*D, D) product, the variances
        # z^T A_k^-1 z and the means theta z.
        if hot.prepared:
            # One float32 product gives [A_k^-1 z for every k, theta_q z, theta_c z]: the columns
            # times S x, plus the intercept's column (see _Hot).
            z32 = scratch.z32
            if hot.sketch32 is None:
                np.copyto(scratch.z32_head, x, casting="same_kind")
            else:
                if x.dtype != np.float32:
                    np.copyto(scratch.x32, x, casting="same_kind")
                    x = scratch.x32
                np.matmul(x, hot.sketch32, out=scratch.z32_head)
            out = np.matmul(hot.w32, scratch.z32_head, out=scratch.out32)
            np.add(out, hot.col32, out=out)
            w2 = np.matmul(scratch.az32_rows, z32, out=scratch.w2_32)
            means = scratch.means32
        else:
            z = scratch.z
            if self._sketch is not None:
                np.copyto(scratch.x, x)  # float64 first: the product must be the float64 one
                np.matmul(scratch.x, self._sketch, out=scratch.z_head)
            else:
                np.copyto(scratch.z_head, x)
            np.matmul(hot.a_flat, z, out=scratch.az)
            w2 = np.matmul(scratch.az_rows, z, out=scratch.w2)
            means = np.matmul(hot.theta, z, out=scratch.means)
        if allowed is None:
            offered, everyone = None, True
        else:
            offered = allowed if type(allowed) is np.ndarray and allowed.dtype == np.bool_ \
                else np.asarray(allowed, dtype=bool)
            n_offered = np.count_nonzero(offered)
            everyone = n_offered == K
            if not n_offered:
                raise ValueError("no arm is offered")
        fast = type(self)._scores is DecomposedPolicy._scores
        if self.exploration == "ucb" and fast:
            # The batch formula's operations on K floats, in Python (IEEE doubles, as numpy's):
            #   width = sqrt(max(w2, 0)); q = mean_q + scale * width; c = mean_c - cost_scale * width
            #   score = w_q * q - (1 - w_q) * min(max(c, 0) / tau, 1)
            # and the first highest score among the offered arms (a NaN score never wins); the
            # comparisons spell out max() and min(), at a fraction of the cost of the calls.
            w_quality = float(w_quality)  # a float32 weight would round every score to float32
            scale, cost_scale, tau, w_cost = self.scale, self.cost_scale, self.tau, 1.0 - w_quality
            mq = means.tolist()
            ok = None if everyone else offered.tolist()
            best, top = 0 if ok is None else ok.index(True), -math.inf
            for k, v in enumerate(w2.tolist()):
                if ok is not None and not ok[k]:
                    continue
                width = sqrt(v) if v > 0.0 else 0.0
                c = mq[K + k] - cost_scale * width
                if c < 0.0:
                    c = 0.0
                c = c / tau
                if c > 1.0:
                    c = 1.0
                score = w_quality * (mq[k] + scale * width) - w_cost * c
                if score > top:
                    top, best = score, k
            # (1 - epsilon) * one-hot + uniform, the same sums: (1 - epsilon) * 0.0 + u is u.
            distribution = hot.uniform.copy() if everyone else self.epsilon * offered / n_offered
            distribution[best] += hot.greedy_mass
        else:
            width = np.sqrt(np.maximum(w2, 0.0, out=scratch.w2), out=scratch.width)
            if means is not scratch.means:  # prepared: float32 means, the draws are float64
                np.copyto(scratch.means, means)
                means = scratch.means
            mean_q, mean_c = means[:K], means[K:]
            if self.exploration == "ts" and fast:
                draws = scratch.draws
                np.copyto(draws, rng.standard_normal(out=scratch.noise).transpose(0, 2, 1))
                q, c = draws[0], draws[1]  # (K, samples)
                sw = scratch.sw_col
                # q = mean_q + (scale * width) * n1; c = mean_c + (cost_scale * width) * n2
                np.multiply(self.scale, width, out=scratch.sw)
                np.add(np.multiply(q, sw, out=q), scratch.mean_q, out=q)
                np.multiply(self.cost_scale, width, out=scratch.sw)
                np.add(np.multiply(c, sw, out=c), scratch.mean_c, out=c)
                # scores = w_q * q - (1 - w_q) * min(max(c, 0) / tau, 1), in q
                np.minimum(np.divide(np.maximum(c, 0.0, out=c), self.tau, out=c), 1.0, out=c)
                np.subtract(np.multiply(w_quality, q, out=q), np.multiply(1.0 - w_quality, c, out=c), out=q)
                if not everyone:
                    q[~offered] = -np.inf
                greedy_share = np.bincount(np.argmax(q, axis=0, out=scratch.best), minlength=K) / self.samples
            elif self.exploration == "ts":  # a subclass scores differently: the batch formula
                noise = rng.standard_normal((2, self.samples, K))
                scores = self._scores(mean_q + (self.scale * width) * noise[0],
                                      mean_c + (self.cost_scale * width) * noise[1], w_quality)
                if not everyone:
                    scores[:, ~offered] = -np.inf
                greedy_share = np.bincount(scores.argmax(axis=1), minlength=K) / self.samples
            else:
                scores = self._scores(mean_q + self.scale * width, mean_c - self.cost_scale * width, w_quality)
                if not everyone:
                    scores[~offered] = -np.inf
                greedy_share = np.zeros(K)
                greedy_share[int(scores.argmax())] = 1.0
            uniform = hot.uniform if everyone else self.epsilon * offered / n_offered
            distribution = (1.0 - self.epsilon) * greedy_share + uniform
        # The arm is drawn from exactly the distribution that is logged: propensities are exact.
        # (Inverse CDF by hand: rng.choice validates p at several times the cost.)
        # np.cumsum and np.searchsorted(side="right") on K floats, in Python: the same sums in
        # the same order, at a fraction of the cost of two numpy calls.
        cdf = list(accumulate(distribution.tolist()))
        arm = min(bisect_right(cdf, rng.random() * cdf[-1]), K - 1)
        return Choice(arm=arm, distribution=distribution)

    def expected_rewards(self, X, w_quality) -> np.ndarray:
        """(n, K) reward estimates w_q * q_hat - w_c * min(c_hat / tau, 1) for rows of ``X``."""
        theta_q, theta_c, _ = self.estimates()
        Z = self.features(np.atleast_2d(X))
        return self._scores(Z @ theta_q.T, Z @ theta_c.T, w_quality)

    def greedy(self, X, w_quality, allowed=None) -> np.ndarray:
        scores = self.expected_rewards(X, w_quality)
        if allowed is not None:
            scores = np.where(allowed, scores, -np.inf)
        return scores.argmax(axis=1)

    # State, for snapshots: the sums and the hyperparameters, nothing derived.

    def params(self) -> dict[str, float | int | str]:
        return {
            "exploration": self.exploration,
            "tau": self.tau,
            "sketch_dim": self.sketch_dim or 0,
            "sketch_seed": self.sketch_seed,
            "prior": self.prior,
            "scale": self.scale,
            "cost_scale": self.cost_scale,
            "epsilon": self.epsilon,
            "samples": self.samples,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        # A is symmetric: its upper triangle is the whole of it, at half the size.
        upper = np.triu_indices(self.n_features)
        return {"A_upper": self.A[:, upper[0], upper[1]], "b_quality": self.b_quality,
                "b_cost": self.b_cost, "counts": self.counts, "prices": self.prices}

    @classmethod
    def from_state(cls, arms, dim, params, arrays, n_updates, seed=None) -> DecomposedPolicy:
        policy = cls(
            list(arms), dim,
            tau=float(params["tau"]),
            exploration=str(params["exploration"]),  # type: ignore[arg-type]
            sketch_dim=int(params["sketch_dim"]) or None,
            sketch_seed=int(params["sketch_seed"]),
            prior=float(params["prior"]),
            scale=float(params["scale"]),
            cost_scale=float(params["cost_scale"]),
            epsilon=float(params["epsilon"]),
            samples=int(params["samples"]),
            seed=seed,
        )
        if "prices" not in arrays:  # a snapshot from before the registry: no price known
            arrays = {**arrays, "prices": policy.prices}
        expected = {k: v.shape for k, v in policy.arrays().items()}
        got = {k: np.asarray(v).shape for k, v in arrays.items()}
        if expected != got:
            raise ValueError(f"state arrays {got} do not fit the policy {expected}")
        upper = np.triu_indices(policy.n_features)
        policy.A = np.empty_like(policy.A)
        policy.A[:, upper[0], upper[1]] = arrays["A_upper"]
        policy.A[:, upper[1], upper[0]] = arrays["A_upper"]
        policy.b_quality = np.array(arrays["b_quality"], dtype=np.float64)
        policy.b_cost = np.array(arrays["b_cost"], dtype=np.float64)
        policy.counts = np.array(arrays["counts"], dtype=np.int64)
        policy.prices = np.array(arrays["prices"], dtype=np.float64)
        policy.n_updates = int(n_updates)
        return policy
