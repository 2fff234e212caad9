"""BaRP as published: a preference-conditioned softmax policy trained by REINFORCE.

Wang et al., "Learning to Route LLMs from Bandit Feedback: One Policy, Many Trade-offs"
(arXiv 2510.07429). The prompt encoder is frozen (the featuriser's vector ``h(x)``, MiniLM
in the paper); a small MLP embeds the preference ``phi(w)`` of w = (w_q, w_c) on the
simplex; a lightweight MLP head maps ``[h(x); phi(w)]`` to logits over the K models and a
softmax gives the routing distribution

    pi(a | x, w) = softmax(f([h(x); phi(w)]))_a.

Training sees bandit feedback only: the chosen model's quality q and cost c give the scalar
reward r = w_q * q - w_c * min(c / tau, 1) (:func:`schemas.reward.reward`), and each outcome
takes one step of entropy-regularised REINFORCE with a baseline,

    loss = -(r - b) * log pi(a | x, w) - beta * H(pi(. | x, w)),

with Adam on every weight except the frozen encoder's. ``b`` is an exponential moving
average of the rewards (``baseline="ema"``) or a linear function of w_q fitted online
(``baseline="linear"``), which removes the large reward offset between preferences. Unlike
the decomposed policy it learns one scalar reward, so ``learn`` needs the preference the
decision was made at: pass ``w_quality=`` (the outcome records it); without it the
preference of the most recent ``decide`` is used.

Pure numpy, state as plain arrays (``params``/``arrays``/``from_state``), so routing
workers can run it from a snapshot like any other policy.

>>> import numpy as np
>>> policy = BaRPPolicy(["a", "b"], dim=3, tau=0.01, seed=0)
>>> choice = policy.decide(np.array([1.0, 0.0, 0.0]), w_quality=0.7)
>>> bool(np.isclose(choice.distribution.sum(), 1.0))
True
"""

from __future__ import annotations

import numpy as np

from router.policy.base import Choice, RoutingPolicy
from schemas.reward import reward as barp_reward

_LAYERS = ("P1", "p1", "P2", "p2", "W1", "b1", "W2", "b2")


class BaRPPolicy(RoutingPolicy):
    """Softmax routing policy over [h(x); phi(w)] trained by entropy-regularised REINFORCE.

    Parameters
    ----------
    arms, dim, tau
        Model names, the (frozen) prompt vector's dimension and the cost cap in USD.
    pref_hidden
        Width of the two-layer preference encoder phi (tanh).
    hidden
        Width of the decision head's hidden layer (ReLU).
    lr
        Adam step size.
    entropy
        The entropy bonus beta.
    baseline
        ``"ema"`` (moving average of rewards) or ``"linear"`` (b = v0 + v1 * w_q, fitted online).
    baseline_decay
        Decay of the moving average (and the step size of the linear baseline is 1 - decay).
    grad_clip
        Clip on the global gradient norm of one update (0 disables).
    seed
        Seeds the initial weights and the sampling of decisions.
    """

    name = "barp"

    def __init__(
        self,
        arms: list[str],
        dim: int,
        tau: float = 0.01,
        pref_hidden: int = 16,
        hidden: int = 128,
        lr: float = 1e-3,
        entropy: float = 0.01,
        baseline: str = "ema",
        baseline_decay: float = 0.99,
        grad_clip: float = 5.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(arms, dim, tau)
        if baseline not in ("ema", "linear"):
            raise ValueError(f"baseline must be 'ema' or 'linear', got {baseline!r}")
        self.pref_hidden, self.hidden = int(pref_hidden), int(hidden)
        self.lr, self.entropy = float(lr), float(entropy)
        self.baseline, self.baseline_decay = baseline, float(baseline_decay)
        self.grad_clip = float(grad_clip)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        init = np.random.default_rng(None if seed is None else seed + 7919)
        K, P, H = len(self.arms), self.pref_hidden, self.hidden

        def glorot(n_in, n_out):
            return init.uniform(-1.0, 1.0, (n_in, n_out)) * np.sqrt(6.0 / (n_in + n_out))

        self.weights = {
            "P1": glorot(2, P), "p1": np.zeros(P),
            "P2": glorot(P, P), "p2": np.zeros(P),
            "W1": glorot(dim + P, H), "b1": np.zeros(H),
            "W2": glorot(H, K) * 0.1, "b2": np.zeros(K),  # near-uniform start
        }
        self.adam_m = {k: np.zeros_like(v) for k, v in self.weights.items()}
        self.adam_v = {k: np.zeros_like(v) for k, v in self.weights.items()}
        self.steps = 0
        self.baseline_state = np.zeros(2)  # ema: [value, 0]; linear: [v0, v1]
        self._last_w: float | None = None

    # The network.

    def _forward(self, X: np.ndarray, w_quality):
        """Logits (n, K) and the activations backprop needs, for rows of X and preferences w."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if X.shape[1] != self.dim:
            raise ValueError(f"features have dimension {X.shape[1]}, the policy expects {self.dim}")
        wq = np.broadcast_to(np.asarray(w_quality, dtype=np.float64), (X.shape[0],))
        W = np.stack([wq, 1.0 - wq], axis=1)
        g = self.weights
        u1 = np.tanh(W @ g["P1"] + g["p1"])
        phi = np.tanh(u1 @ g["P2"] + g["p2"])
        inp = np.concatenate([X, phi], axis=1)
        pre = inp @ g["W1"] + g["b1"]
        h = np.maximum(pre, 0.0)
        logits = h @ g["W2"] + g["b2"]
        return logits, (W, u1, phi, inp, pre, h)

    @staticmethod
    def _softmax(logits: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        if allowed is not None:
            logits = np.where(allowed, logits, -np.inf)
        z = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def action_distribution(self, X, w_quality, allowed=None) -> np.ndarray:
        """(n, K) routing probabilities pi(. | x, w) for rows of ``X``."""
        logits, _ = self._forward(X, w_quality)
        return self._softmax(logits, None if allowed is None else np.asarray(allowed, dtype=bool))

    # RoutingPolicy.

    def decide(self, x, w_quality, allowed=None, rng=None) -> Choice:
        rng = rng or self.rng
        K = len(self.arms)
        offered = np.ones(K, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
        if not offered.any():
            raise ValueError("no arm is offered")
        distribution = self.action_distribution(np.asarray(x)[None, :], w_quality, offered[None, :])[0]
        arm = int(rng.choice(K, p=distribution))
        self._last_w = float(w_quality)
        return Choice(arm=arm, distribution=distribution)

    def greedy(self, X, w_quality, allowed=None) -> np.ndarray:
        logits, _ = self._forward(X, w_quality)
        if allowed is not None:
            logits = np.where(allowed, logits, -np.inf)
        return logits.argmax(axis=1)

    def _baseline_value(self, w_quality: float) -> float:
        if self.baseline == "ema":
            return float(self.baseline_state[0])
        return float(self.baseline_state[0] + self.baseline_state[1] * w_quality)

    def _update_baseline(self, r: float, w_quality: float) -> None:
        step = 1.0 - self.baseline_decay
        if self.baseline == "ema":
            self.baseline_state[0] += step * (r - self.baseline_state[0])
        else:
            error = r - self._baseline_value(w_quality)
            self.baseline_state += step * error * np.array([1.0, w_quality])

    def learn(self, arm: int, x: np.ndarray, quality: float, cost_usd: float,
              w_quality: float | None = None) -> None:
        """One REINFORCE step on the outcome of ``arm`` for features ``x`` at preference w."""
        if w_quality is None:
            if self._last_w is None:
                raise ValueError("BaRPPolicy.learn needs the decision's w_quality")
            w_quality = self._last_w
        w_quality = float(w_quality)
        r = float(barp_reward(quality, cost_usd, w_quality, self.tau))
        advantage = r - self._baseline_value(w_quality)
        self._update_baseline(r, w_quality)

        logits, (W, u1, phi, inp, pre, h) = self._forward(np.asarray(x)[None, :], w_quality)
        p = self._softmax(logits, None)[0]
        logp = np.log(np.maximum(p, 1e-300))
        entropy = -(p * logp).sum()
        # d loss / d logits: policy-gradient term plus the entropy bonus's gradient.
        onehot = np.zeros_like(p)
        onehot[arm] = 1.0
        d_logits = -advantage * (onehot - p)
        d_logits += self.entropy * p * (logp + entropy)  # d(-beta*H)/dz = beta * p * (log p + H)
        d_logits = d_logits[None, :]

        g = self.weights
        grads = {"W2": h.T @ d_logits, "b2": d_logits[0]}
        d_h = d_logits @ g["W2"].T
        d_pre = d_h * (pre > 0.0)
        grads["W1"] = inp.T @ d_pre
        grads["b1"] = d_pre[0]
        d_inp = d_pre @ g["W1"].T
        d_phi = d_inp[:, self.dim:]
        d_u2 = d_phi * (1.0 - phi**2)
        grads["P2"] = u1.T @ d_u2
        grads["p2"] = d_u2[0]
        d_u1 = (d_u2 @ g["P2"].T) * (1.0 - u1**2)
        grads["P1"] = W.T @ d_u1
        grads["p1"] = d_u1[0]
        self._adam(grads)
        self.n_updates += 1

    def _adam(self, grads: dict[str, np.ndarray], beta1: float = 0.9, beta2: float = 0.999,
              eps: float = 1e-8) -> None:
        if self.grad_clip > 0:
            norm = np.sqrt(sum(float((v**2).sum()) for v in grads.values()))
            if norm > self.grad_clip:
                grads = {k: v * (self.grad_clip / norm) for k, v in grads.items()}
        self.steps += 1
        correction1 = 1.0 - beta1**self.steps
        correction2 = 1.0 - beta2**self.steps
        for key, grad in grads.items():
            m, v = self.adam_m[key], self.adam_v[key]
            m *= beta1
            m += (1.0 - beta1) * grad
            v *= beta2
            v += (1.0 - beta2) * grad**2
            self.weights[key] -= self.lr * (m / correction1) / (np.sqrt(v / correction2) + eps)

    def add_arm(self, name: str) -> None:
        """Add a candidate model at run time: a new zero-initialised output unit."""
        if name in self.arms:
            raise ValueError(f"arm {name!r} exists")
        self.arms.append(name)
        for store in (self.weights, self.adam_m, self.adam_v):
            store["W2"] = np.concatenate([store["W2"], np.zeros((self.hidden, 1))], axis=1)
            store["b2"] = np.append(store["b2"], 0.0)

    # State, for snapshots.

    def params(self) -> dict[str, float | int | str]:
        return {
            "tau": self.tau, "pref_hidden": self.pref_hidden, "hidden": self.hidden, "lr": self.lr,
            "entropy": self.entropy, "baseline": self.baseline,
            "baseline_decay": self.baseline_decay, "grad_clip": self.grad_clip,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"w_{k}": v for k, v in self.weights.items()}
        out.update({f"m_{k}": v for k, v in self.adam_m.items()})
        out.update({f"v_{k}": v for k, v in self.adam_v.items()})
        out["baseline_state"] = self.baseline_state
        out["steps"] = np.array([self.steps], dtype=np.int64)
        return out

    @classmethod
    def from_state(cls, arms, dim, params, arrays, n_updates, seed=None) -> BaRPPolicy:
        policy = cls(
            list(arms), dim, tau=float(params["tau"]), pref_hidden=int(params["pref_hidden"]),
            hidden=int(params["hidden"]), lr=float(params["lr"]), entropy=float(params["entropy"]),
            baseline=str(params["baseline"]), baseline_decay=float(params["baseline_decay"]),
            grad_clip=float(params["grad_clip"]), seed=seed,
        )
        expected = {k: v.shape for k, v in policy.arrays().items()}
        got = {k: np.asarray(v).shape for k, v in arrays.items()}
        if expected != got:
            raise ValueError(f"state arrays {got} do not fit the policy {expected}")
        for key in _LAYERS:
            policy.weights[key] = np.array(arrays[f"w_{key}"], dtype=np.float64)
            policy.adam_m[key] = np.array(arrays[f"m_{key}"], dtype=np.float64)
            policy.adam_v[key] = np.array(arrays[f"v_{key}"], dtype=np.float64)
        policy.baseline_state = np.array(arrays["baseline_state"], dtype=np.float64)
        policy.steps = int(np.asarray(arrays["steps"])[0])
        policy.n_updates = int(n_updates)
        return policy
