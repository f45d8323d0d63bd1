"""TransCLIP: transductive inference for vision-language models (Zanella, Gérin, Ben Ayed, "Boosting
Vision-Language Models with Transduction", NeurIPS 2024, arXiv 2406.01837; reference code
MaxZanella/transduction-for-vlms ``TransCLIP_solver/TransCLIP.py::TransCLIP_solver`` and
``TransCLIP_solver/TransCLIP_utils.py``).

The predictions of a *batch* of unlabeled images (the pool Q) are found jointly, by Block
Majorize-Minimize over soft assignments z_i ∈ Δ_K, class means μ_k and one shared diagonal
covariance Σ of a Gaussian mixture on the image features:

* GMM log-likelihood ``L_ik = −½ Σ_d (f_id − μ_kd)² / σ_d``;
* Laplacian term over the pool's k-NN graph, ``w_ij = f_i·f_j`` kept for the ``n_neighbors = 3``
  nearest other images (``build_affinity_matrix``: top-(k+1) similarities, the first dropped);
* KL term to the initial predictions ``ŷ_i`` (zero-shot CLIP, or a few-shot method's: ``base=``).

Updates as the reference implements them (one outer iteration = z, then μ, then Σ; ``max_iter = 10``
outer iterations and a last z-update; ``z_iter = 5`` inner fixed-point steps of ``update_z``):

* ``z_i ∝ ŷ_i^λ ⊙ exp( L_i / 50 + (1/(2k)) Σ_j (w_ij + w_ji) z_j )`` (the 1/50 and 1/(2k) are hard-coded);
* ``μ_k = [Σ_Q z_ik f_i / |Q| + (50γ/|S|) Σ_S y_ik f_i] / [Σ_Q z_ik / |Q| + (50γ/|S|) Σ_S y_ik]``, then
  L2-normalised;
* ``σ = Σ_{i,k} w_ik (f_i − μ_k)² / Σ_{i,k} w_ik`` with the same weights (one vector for all classes).

Initialisation: ``ŷ = z = softmax(logits)``; zero-shot μ_k = mean of ``z_ik f_i`` over the 8 images
most confident for class k (``init_mu``), normalised; few-shot μ_k = normalised sum of the class's shot
features; σ = 1/d.

Variants (``TransCLIP_utils.get_parameters``):

* TransCLIP-ZS (default): no shots, λ = 1, ŷ from the zero-shot classifier (the backbone's logit scale,
  100 for OpenAI CLIP, as the reference's ``100 · f·T``).
* On top of a few-shot method (``base="tip_adapter"`` etc., the reference's ``--method On-top``): the
  base method is fitted inductively on the support set and ŷ = softmax of its logits (the
  reference's ``initial_predictions`` path); the solver itself still sees no shot.
* TransCLIP-FS (``use_shots=True``): λ = 0.5, the support features enter the GMM with weight γ and the
  graph (their rows, z fixed to their one-hot labels), for each γ in {0.002, 0.01, 0.02, 0.2} in turn
  (the state carries over from one γ to the next, as in the reference); the γ kept is the one whose
  z scores best on the K-shot validation images, each scored by the z of its nearest pool image
  (``neighbor_index``), strict ``>``.

Where the pool comes from (see :mod:`workbench.unlabeled`): with ``unlabeled="test"`` nothing is
solved at fit time and :meth:`TransCLIP.predict_logits` solves jointly over the images it is given
(transductive: an image's prediction depends on the others in the batch; rows say
``transductive=True``). With a separate pool (a folder, CSV, npz or another split) the solver runs on
the pool at fit time and a new image is predicted *inductively* from the fitted mixture and its k
nearest pool images: ``z ∝ ŷ^λ ⊙ exp(L/50 + (1/(2k)) Σ_j w_ij z_j)`` (its own out-edges only; the
reference has no inductive mode — this is the same z-update with the pool's z held fixed).

Deliberate differences: (1) the z-update is computed in the log domain (the same numbers, without
0/0 when every entry underflows); (2) the text classifier is the run's template average (the reference
keeps only the first template; the default run has one template); (3) TransCLIP-FS: the reference
stacks the graph rows as [shots; pool] but the assignments as [pool; shots] (``update_z``), which pairs
each row with the wrong image's z; here rows and assignments are in the same order, which is the
paper's Eq. — the few-shot numbers can therefore differ from the reference's; (4) the logits returned
are ``log z`` (z itself is the prediction, its softmax is z); (5) in the μ/Σ-updates a class whose
mass underflows to 0 keeps a zero mean instead of 0/0, and the variance (computed in expanded form)
is floored at a float32 epsilon of the largest second moment: these change nothing where the
reference gives finite numbers, and turn its NaN (seen on pneumoniamnist_mini at K = 1) into a result.

Speed: the k-NN graph is built in row chunks, then ``W + Wᵀ`` is one sparse matrix (the shots' edges
into the pool, constant, are added once); the mixture terms are matrix products (``f²·σ⁻¹ − 2 f·(μ/σ)ᵀ + ...``) instead of the reference's ``[N, K, d]``
broadcasts. ``bench/transclip.py`` compares with a plain dense implementation of the same updates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...progress import progress
from ..base import Method
from ..registry import register

GAMMAS = [0.002, 0.01, 0.02, 0.2]


# -- the solver (pure tensors: tests and the benchmark call it directly) -------------------------------

def knn_graph(rows: torch.Tensor, pool: torch.Tensor, n_neighbors: int, chunk: int = 2048):
    """``(index [R, k], weight [R, k])``: for each row the pool images ranked 2..k+1 by cosine, with the
    cosine as weight (the reference's ``topk(k+1)[:, 1:]``: the first, the row itself when it is in the
    pool, is dropped)."""
    k = min(n_neighbors + 1, pool.shape[0])
    idx, val = [], []
    for start in range(0, rows.shape[0], chunk):
        sims = rows[start:start + chunk] @ pool.T
        top = sims.topk(k, dim=-1)
        idx.append(top.indices[:, 1:])
        val.append(top.values[:, 1:])
    return torch.cat(idx), torch.cat(val)


def symmetric_affinity(index: torch.Tensor, weight: torch.Tensor, n_pool: int) -> torch.Tensor:
    """``W + Wᵀ`` of the pool's k-NN graph as a sparse COO matrix ``[N, N]`` (duplicates summed: ``w_ij + w_ji``)."""
    rows = torch.arange(n_pool).repeat_interleave(index.shape[1])
    cols = index.reshape(-1)
    vals = weight.reshape(-1)
    coo = torch.sparse_coo_tensor(torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
                                  torch.cat([vals, vals]), size=(n_pool, n_pool), check_invariants=True)
    return coo.coalesce()   # COO: the fastest sparse x dense product on CPU here (CSR measured ~2x slower)


def support_in_edges(s_index: torch.Tensor, s_weight: torch.Tensor, labels_1h: torch.Tensor, n_pool: int):
    """``Σ_s w_sj y_s`` for every pool image j: the shots' edges into the pool (constant: their z is their label)."""
    k = labels_1h.shape[1]
    return torch.zeros(n_pool, k, dtype=labels_1h.dtype).index_add_(
        0, s_index.reshape(-1), (s_weight[..., None] * labels_1h[:, None, :]).reshape(-1, k))


def gmm_loglik(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``−½ Σ_d (x_d − μ_kd)² / σ_d`` as ``[N, K]``, by matrix products."""
    inv = 1.0 / std
    return -0.5 * ((x * x) @ inv[:, None] - 2.0 * x @ (mu * inv).T + ((mu * mu) @ inv)[None, :])


def _weighted_stats(x, w):
    """``(Σ_i w_ik x_i [K, d], Σ_i w_ik [K], Σ_i (Σ_k w_ik) x_i² [d])``."""
    return w.T @ x, w.sum(0), w.sum(1) @ (x * x)


def update_mu_sigma(x, z, support=None, labels_1h=None, gamma: float = 0.0):
    """The μ- and Σ-updates (``update_mu``, ``update_sigma``) from the current assignments."""
    wq = z / x.shape[0]
    sums, mass, sq = _weighted_stats(x, wq)
    if support is not None and gamma > 0:
        ws = labels_1h * (gamma * 50.0 / support.shape[0])
        s_sums, s_mass, s_sq = _weighted_stats(support, ws)
        sums, mass, sq = sums + s_sums, mass + s_mass, sq + s_sq
    # Guards where the reference would give NaN and nothing else: a class no image is assigned to
    # (its mass underflows to 0 in float32) keeps a zero sum instead of 0/0, and the expanded
    # variance, which cancels catastrophically in float32 on tight clusters, is kept positive.
    tiny = torch.finfo(x.dtype).tiny
    mu = F.normalize(sums / mass.clamp_min(tiny)[:, None], dim=-1)
    # Σ_{i,k} w_ik (x_i − μ_k)² = Σ_i (Σ_k w_ik) x_i² − 2 Σ_k μ_k ⊙ (Σ_i w_ik x_i) + Σ_k (Σ_i w_ik) μ_k²
    std = (sq - 2.0 * (mu * sums).sum(0) + (mass[:, None] * mu * mu).sum(0)) / mass.sum()
    return mu, std.clamp_min(torch.finfo(x.dtype).eps * float(sq.max()) + tiny)


def init_mu_zero_shot(x: torch.Tensor, z: torch.Tensor, n_most_confident: int = 8) -> torch.Tensor:
    """μ_k = mean of ``z_ik x_i`` over the ``n_most_confident`` images with the largest ``z_ik``, normalised."""
    m = min(n_most_confident, x.shape[0])
    top = z.topk(m, dim=0).indices                                          # [m, K]
    weights = z.gather(0, top)                                              # [m, K]
    return F.normalize((weights[..., None] * x[top]).mean(0), dim=-1)      # [K, d]


def transclip_solve(x: torch.Tensor, log_yhat: torch.Tensor, *, lmbda: float = 1.0, support=None, support_labels=None,
                    gammas=(0.0,), val=None, n_neighbors: int = 3, max_iter: int = 10, z_iter: int = 5,
                    n_most_confident: int = 8, std_init: float | None = None) -> dict:
    """Run TransCLIP on pool features ``x`` [N, d] (L2-normalised) with initial log-predictions
    ``log_yhat`` [N, K]. Few-shot: ``support`` [S, d], ``support_labels`` [S], ``gammas`` tried in turn and
    ``val = (features, labels)`` to choose among them. Returns ``{"z", "mu", "std", "gamma", "val_accuracy"}``."""
    n, d = x.shape
    k_classes = log_yhat.shape[1]
    few_shot = support is not None and len(support) > 0
    z = log_yhat.softmax(-1)
    weighted_prior = lmbda * log_yhat
    index, weight = knn_graph(x, x, n_neighbors)
    affinity = symmetric_affinity(index, weight, n)          # Σ_j (w_ij + w_ji) z_j = affinity @ z
    if few_shot:
        labels_1h = F.one_hot(support_labels, k_classes).to(x.dtype)
        mu = F.normalize(labels_1h.T @ support, dim=-1)
        s_index, s_weight = knn_graph(support, x, n_neighbors)
        from_shots = support_in_edges(s_index, s_weight, labels_1h, n)
    else:
        labels_1h, from_shots = None, None
        mu = init_mu_zero_shot(x, z, n_most_confident)
    std = torch.full((d,), 1.0 / d if std_init is None else std_init, dtype=x.dtype)
    coupling = 1.0 / (2 * n_neighbors)
    neighbour = None if val is None else (val[0] @ x.T).argmax(-1)
    best = {"val_accuracy": -1.0}
    bar = progress(total=len(gammas) * (max_iter + 1), desc=f"transclip ({n} images)", unit="it", delay=2)
    for gamma in gammas:
        for it in range(max_iter + 1):
            bar.update(1)
            loglik = gmm_loglik(x, mu, std) / 50.0
            fixed = weighted_prior + loglik if from_shots is None else weighted_prior + loglik + coupling * from_shots
            for _ in range(z_iter):
                z = torch.softmax(fixed + coupling * torch.sparse.mm(affinity, z), dim=-1)
            if it == max_iter:
                break
            mu, std = update_mu_sigma(x, z, support if few_shot else None, labels_1h, gamma)
        if neighbour is None:
            best = {"z": z, "mu": mu, "std": std, "gamma": gamma, "val_accuracy": float("nan")}
        else:
            acc = float((z[neighbour].argmax(-1) == val[1]).double().mean())
            if acc > best["val_accuracy"]:
                best = {"z": z, "mu": mu, "std": std, "gamma": gamma, "val_accuracy": acc}
    bar.close()
    return best


def predict_from_pool(x, log_yhat, mu, std, pool, pool_z, *, lmbda: float, n_neighbors: int = 3):
    """Inductive prediction of new images from a solved pool: the z-update with the pool's z held fixed."""
    k = min(n_neighbors, pool.shape[0])
    top = (x @ pool.T).topk(k, dim=-1)        # a new image is not in the pool: no neighbour is dropped
    graph = (top.values[..., None] * pool_z[top.indices]).sum(1)
    return torch.softmax(lmbda * log_yhat + gmm_loglik(x, mu, std) / 50.0 + graph / (2 * n_neighbors), dim=-1)


# -- the method --------------------------------------------------------------------------------------

@dataclass
class TransCLIPConfig:
    #: a registered inductive method whose predictions replace the zero-shot ones as ŷ (TransCLIP on top); None: zero-shot
    base: str | None = None
    #: parameters of the base method
    base_params: dict = field(default_factory=dict)
    #: TransCLIP-FS: the support set enters the mixture (weight γ) and the graph
    use_shots: bool = False
    #: weight of the KL term to ŷ; None: the reference's 1 (zero-shot / on top) or 0.5 (use_shots)
    lmbda: float | None = None
    #: γ values tried in turn with use_shots (weight of the support set in the mixture)
    gammas: list = field(default_factory=lambda: list(GAMMAS))
    #: neighbours per image in the affinity graph
    n_neighbors: int = 3
    #: outer Block Majorize-Minimize iterations
    max_iter: int = 10
    #: fixed-point steps of each z-update
    z_iter: int = 5
    #: confident images per class that initialise the class means (zero-shot)
    n_most_confident: int = 8


@register("transclip")
class TransCLIP(Method):
    """TransCLIP: joint GMM + Laplacian + KL-to-text inference over a pool of unlabeled images."""

    Config = TransCLIPConfig
    uses_unlabeled = "pool"
    param_bounds = {"n_neighbors": {"minimum": 1}, "z_iter": {"minimum": 1}, "n_most_confident": {"minimum": 1},
                    "lmbda": {"minimum": 0.0}}

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.base_method = None
        self.transductive = True

    @property
    def lmbda(self) -> float:
        cfg = self.config
        return float(cfg.lmbda) if cfg.lmbda is not None else (0.5 if cfg.use_shots else 1.0)

    def _make_base(self):
        from ..registry import method_class

        cfg = self.config
        if cfg.base is None:
            if cfg.base_params:
                raise ConfigError("transclip: base_params given without base=; name the base method.")
            return None
        if cfg.base == "transclip":
            raise ConfigError("transclip: base must be an inductive method, not transclip itself.")
        cls = method_class(cfg.base)
        if getattr(cls, "uses_unlabeled", None) or getattr(cls, "uses_images", False):
            raise ConfigError(f"transclip: base={cfg.base!r} must be an inductive feature method (gda, tip_adapter, "
                              "linear_probe, proker, ...): its predictions on the pool are TransCLIP's starting point.")
        return cls(**cfg.base_params)

    def fit(self, task) -> "TransCLIP":
        cfg = self.config
        if cfg.use_shots and not cfg.gammas:
            raise ConfigError("transclip: use_shots=True needs at least one γ in gammas.")
        self.base_method = self._make_base()
        if self.base_method is not None:
            self.base_method.fit(task)
        self.text_weights = task.text_classifier().float()
        self.scale = torch.tensor(float(task.backbone.logit_scale))
        self.bias = torch.tensor(float(task.backbone.logit_bias or 0.0))
        self.class_names = task.class_names
        if cfg.use_shots:
            support = task.support()
            self.support_x, self.support_y = support.x.float(), support.labels
            val = task.validation()
            self.val = None if val is None or len(val) == 0 else (val.x.float(), val.labels)
        else:
            self.support_x, self.support_y, self.val = None, None, None
        pool = task.unlabeled_features() if hasattr(task, "unlabeled_features") else None
        self.fit_info = {"lmbda": self.lmbda, "base": cfg.base, "use_shots": cfg.use_shots,
                         "templates": list(task.templates)}
        if self.base_method is not None:
            self.fit_info["base_fit_info"] = self.base_method.fit_info
        if pool is None:   # transductive: the images handed to predict_logits are the pool
            self.transductive = True
            self.pool = None
            self.fit_info["pool"] = "the images predicted (transductive)"
            return self
        self.transductive = False
        out = self._solve(pool.float())
        self.pool, self.pool_z, self.mu, self.std = pool.float(), out["z"], out["mu"], out["std"]
        self.fit_info.update(pool=f"{len(pool)} unlabeled images", gamma=out["gamma"],
                             val_accuracy=out["val_accuracy"])
        return self

    def initial_log_predictions(self, x: torch.Tensor) -> torch.Tensor:
        """``log ŷ``: log-softmax of the zero-shot logits, or of the base method's logits."""
        if self.base_method is not None:
            logits = self.base_method.predict_logits(x).float()
        else:
            logits = self.scale * (x.float() @ self.text_weights.T) + self.bias
        return torch.log_softmax(logits, dim=-1)

    def _solve(self, x: torch.Tensor) -> dict:
        cfg = self.config
        return transclip_solve(x, self.initial_log_predictions(x), lmbda=self.lmbda, support=self.support_x,
                               support_labels=self.support_y, gammas=cfg.gammas if cfg.use_shots else (0.0,),
                               val=self.val, n_neighbors=cfg.n_neighbors, max_iter=cfg.max_iter, z_iter=cfg.z_iter,
                               n_most_confident=cfg.n_most_confident)

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        x = features.float()
        if self.pool is None:
            if x.shape[0] < 2:   # no other image to learn from: the initial predictions ŷ
                return self.initial_log_predictions(x)
            out = self._solve(x)
            self.fit_info["last_batch"] = {"images": int(x.shape[0]), "gamma": out["gamma"],
                                           "val_accuracy": out["val_accuracy"]}
            z = out["z"]
        else:
            z = predict_from_pool(x, self.initial_log_predictions(x), self.mu, self.std, self.pool, self.pool_z,
                                  lmbda=self.lmbda, n_neighbors=self.config.n_neighbors)
        return torch.log(z.clamp_min(torch.finfo(z.dtype).tiny))

    # -- saving: the base method's tensors ride along under "base." ------------------------------------
    def state(self):
        state = {"text_weights": self.text_weights, "scale": self.scale, "bias": self.bias}
        if self.pool is not None:
            state.update(pool=self.pool, pool_z=self.pool_z, mu=self.mu, std=self.std)
        if self.support_x is not None:
            state.update(support_x=self.support_x, support_y=self.support_y)
            if self.val is not None:
                state.update(val_x=self.val[0], val_y=self.val[1])
        if self.base_method is not None:
            state.update({f"base.{k}": v.clone() for k, v in self.base_method.state().items()})
        return state

    def load_state(self, state):
        self.base_method = self._make_base()
        if self.base_method is not None:
            self.base_method.class_names = self.class_names
            self.base_method.load_state({k[5:]: v for k, v in state.items() if k.startswith("base.")})
        self.text_weights, self.scale, self.bias = state["text_weights"], state["scale"], state["bias"]
        self.pool = state.get("pool")
        self.transductive = self.pool is None
        if self.pool is not None:
            self.pool_z, self.mu, self.std = state["pool_z"], state["mu"], state["std"]
        self.support_x, self.support_y = state.get("support_x"), state.get("support_y")
        self.val = (state["val_x"], state["val_y"]) if "val_x" in state else None


__all__ = ["TransCLIP", "transclip_solve", "knn_graph", "symmetric_affinity", "support_in_edges", "gmm_loglik", "update_mu_sigma", "init_mu_zero_shot",
           "predict_from_pool"]
