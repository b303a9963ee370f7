"""What the report knows about each probe: titles, papers, axis labels, how nested keys read.

Everything here is optional: a probe or quantity missing from these tables still gets its panels,
titled with its log name (``biasprobe/<probe>/<quantity>``) and no paper. A new probe adds one row
to ``PROBE_TITLES`` (and, if it wants them, rows to the other tables).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Optional

#: probe log name -> (human title, short citation of the paper shown on every panel)
PROBE_TITLES: dict[str, tuple[str, str]] = {
    "gc": ("Geometric complexity", "Dherin et al. 2022"),
    "ntk": ("Neural tangent kernel", "Baratin et al. 2021"),
    "hessian": ("Loss curvature (Hessian)", "Yao et al. 2020 (PyHessian)"),
    "igr": ("Implicit gradient regularization", "Barrett & Dherin 2021"),
    "noise": ("Stochastic-gradient noise", "Şimşekli et al. 2019"),
    "diffusion": ("Weight diffusion", "Kunin et al. 2021"),
    "rank": ("Effective rank of representations", "Huh et al. 2023"),
    "ncc": ("Nearest-class-center separability and effective depth", "Galanti et al. 2022"),
    "freq": ("Function frequency along interpolation paths", "Fridovich-Keil et al. 2022"),
    "simplicity": ("Simplicity bias (S- and Sᶜ-randomized accuracy)", "Shah et al. 2020"),
}

#: probe log name -> the papers in full, for the section heading
PROBE_CITATIONS: dict[str, str] = {
    "gc": "Dherin, Munn, Rosca, Barrett, “Why neural networks find simple solutions: the many regularizers of "
          "geometric complexity”, NeurIPS 2022",
    "ntk": "Baratin et al., “Implicit Regularization via Neural Feature Alignment”, AISTATS 2021; Fort et al., "
           "“Deep learning versus kernel learning”, NeurIPS 2020; Ortiz-Jiménez, Moosavi-Dezfooli, Frossard, "
           "“What can linearized neural networks actually say about generalization?”, NeurIPS 2021; Xiao, "
           "“Eigenspace Restructuring”, COLT 2022",
    "hessian": "Yao, Gholami, Keutzer, Mahoney, “PyHessian: Neural Networks Through the Lens of the Hessian”, 2020; "
               "Meyer, Musco, Musco, Woodruff, “Hutch++”, SOSA 2021; Ghorbani, Krishnan, Xiao, “An Investigation "
               "into Neural Net Optimization via Hessian Eigenvalue Density”, ICML 2019",
    "igr": "Barrett & Dherin, “Implicit Gradient Regularization”, ICLR 2021; Smith, Dherin, Barrett, De, “On the "
           "Origin of Implicit Regularization in Stochastic Gradient Descent”, ICLR 2021",
    "noise": "Şimşekli, Sagun, Gürbüzbalaban, “A Tail-Index Analysis of Stochastic Gradient Noise in Deep Neural "
             "Networks”, ICML 2019; McCandlish et al., “An Empirical Model of Large-Batch Training”, 2018; Liu et "
             "al., “Understanding Why Neural Networks Generalize Well Through GSNR of Parameters”, ICLR 2020",
    "diffusion": "Kunin et al., “Limiting Dynamics of SGD: Modified Loss, Phase Space Oscillations, and Anomalous "
                 "Diffusion”, 2021",
    "rank": "Huh, Mobahi, Zhang, Cheung, Agrawal, Isola, “The Low-Rank Simplicity Bias in Deep Networks”, TMLR 2023; "
            "Roy & Vetterli, “The effective rank”, 2007; Garrido, Balestriero, Najman, LeCun, “RankMe”, ICML 2023",
    "ncc": "Galanti, Galanti, Ben-Shaul, “On the Implicit Bias Towards Minimal Depth of Deep Neural Networks”, 2022; "
           "Papyan, Han, Donoho, “Prevalence of neural collapse during the terminal phase of deep learning "
           "training”, PNAS 2020; Galanti, György, Hutter, “On the role of neural collapse in transfer learning”, "
           "ICLR 2022",
    "freq": "Fridovich-Keil, Gontijo-Lopes, Roelofs, “Spectral Bias in Practice: The Role of Function Frequency in "
            "Generalization”, NeurIPS 2022",
    "simplicity": "Shah, Tamuly, Raghunathan, Jain, Netrapalli, “The Pitfalls of Simplicity Bias in Neural "
                  "Networks”, NeurIPS 2020",
}

#: (probe, quantity pattern) -> the paper a quantity comes from, where it is not the probe's first paper
QUANTITY_PAPERS: dict[tuple[str, str], str] = {
    ("ntk", "distance*"): "Fort et al. 2020",
    ("ntk", "velocity*"): "Fort et al. 2020",
    ("ntk", "target_energy_*"): "Ortiz-Jiménez et al. 2021",
    ("ntk", "eigenvalue"): "Xiao 2022",
    ("ntk", "effective_rank"): "Xiao 2022",
    ("ntk", "participation_ratio"): "Xiao 2022",
    ("ntk", "spectrum_log10"): "Xiao 2022",
    ("hessian", "trace*"): "Yao et al. 2020; Hutch++ (Meyer et al. 2021)",
    ("hessian", "spectral_density"): "Ghorbani et al. 2019",
    ("noise", "b_simple"): "McCandlish et al. 2018",
    ("noise", "snr"): "McCandlish et al. 2018",
    ("noise", "grad_sq_norm"): "McCandlish et al. 2018",
    ("noise", "trace_cov"): "McCandlish et al. 2018",
    ("noise", "gsnr"): "Liu et al. 2020",
    ("rank", "rankme"): "Garrido et al. 2023",
    ("rank", "stable_rank*"): "Huh et al. 2023 (stable rank)",
    ("ncc", "nc1"): "Papyan et al. 2020",
    ("ncc", "cdnv"): "Galanti, György, Hutter 2022",
}

#: (probe, quantity pattern) -> axis label, with units where the quantity has them
QUANTITY_LABELS: dict[tuple[str, str], str] = {
    ("gc", "*"): "GC = mean ‖∂f/∂x‖²_F  (output²/input²)",
    ("ntk", "alignment"): "alignment yᵀK_c y / (‖K_c‖_F ‖y‖²)",
    ("ntk", "alignment_trace"): "alignment of the trace kernel",
    ("ntk", "alignment_per_class"): "mean per-class alignment",
    ("ntk", "frobenius_norm"): "‖K‖_F",
    ("ntk", "trace"): "tr K",
    ("ntk", "distance*"): "d(K₀, K_t) = 1 − cos(K₀, K_t)",
    ("ntk", "velocity*"): "d(K_prev, K_t) per step  (1/step)",
    ("ntk", "eigenvalue"): "eigenvalue λ_i of K_c",
    ("ntk", "effective_rank"): "effective rank exp H(λ/Σλ)",
    ("ntk", "participation_ratio"): "participation ratio (Σλ)²/Σλ²",
    ("ntk", "target_energy_*"): "fraction of ‖y‖² in the top eigenvectors",
    ("ntk", "spectrum_log10"): "log₁₀(λ / Σλ)",
    ("hessian", "top_eigenvalue"): "λ_max(H)",
    ("hessian", "eigenvalue"): "eigenvalue λ_i(H)",
    ("hessian", "min_eigenvalue"): "λ_min(H)",
    ("hessian", "trace"): "tr H  (± standard error)",
    ("hessian", "num_products"): "Hessian-vector products",
    ("hessian", "spectral_density"): "eigenvalue of H",
    ("igr", "igr_term"): "(h/4)‖∇L‖²",
    ("igr", "grad_norm_sq"): "‖∇L‖²",
    ("igr", "lr"): "learning rate h",
    ("noise", "tail_index*"): "tail index α̂  (2 = Gaussian)",
    ("noise", "b_simple"): "B_simple = tr Σ/‖G‖²  (examples)",
    ("noise", "snr"): "‖G‖²/tr Σ  (1/examples)",
    ("noise", "gsnr"): "mean GSNR  ḡ²/σ²",
    ("noise", "grad_sq_norm"): "‖G‖²",
    ("noise", "trace_cov"): "tr Σ",
    ("noise", "num_*"): "count",
    ("noise", "batch_size"): "examples per minibatch",
    ("diffusion", "distance"): "‖θ_t − θ_ref‖",
    ("diffusion", "update_size"): "‖θ_t − θ_prev‖",
    ("diffusion", "weight_norm"): "‖θ_t‖",
    ("diffusion", "exponent"): "c in ‖θ_t − θ_ref‖ ∝ t^c",
    ("diffusion", "exponent_r2"): "R² of the log-log fit",
    ("diffusion", "fit_points"): "points in the fit",
    ("diffusion", "fit_t_start"): "first step of the fit",
    ("rank", "erank_features"): "erank of Z  exp H(σ/Σσ)",
    ("rank", "erank_features_centered"): "erank of centered Z",
    ("rank", "erank_gram"): "erank of ZZᵀ",
    ("rank", "rankme"): "RankMe of Z",
    ("rank", "stable_rank_features"): "stable rank ‖Z‖²_F/‖Z‖²₂",
    ("rank", "singular_values"): "singular value σ of Z",
    ("ncc", "train_acc"): "NCC accuracy, training examples",
    ("ncc", "heldout_acc"): "NCC accuracy, held-out examples",
    ("ncc", "nc1"): "NC1 = tr(Σ_W Σ_B⁺)/C",
    ("ncc", "cdnv"): "CDNV (mean over class pairs)",
    ("ncc", "effective_depth"): "effective depth d_ε  (layer)",
    # exact names: "*fraction" used to label flat_fraction as a share of power
    ("freq", "mean_frequency"): "mean frequency  (cycles per path length)",
    ("freq", "mean_frequency_hist"): "mean frequency  (cycles per path length)",
    ("freq", "mean_frequency_per_distance"): "mean frequency  (cycles per unit input distance)",
    ("freq", "high_frequency_fraction"): "fraction of power at or above the cutoff",
    ("freq", "high_frequency_power"): "variance of s at or above the cutoff",
    ("freq", "max_distance"): "max_t ‖p(x(t)) − p(x₀)‖",
    ("freq", "flat_fraction"): "fraction of paths with a constant signal",
    ("*", "*seconds"): "seconds per measurement",
}

#: probe -> how a key ``<a>/<b>`` under the probe reads. ``"layer"``: ``<layer>/<quantity>`` (per-layer
#: profiles are drawn over depth); ``"block"``: ``<quantity>/<layer>`` (also drawn over depth);
#: ``"group"`` (the default for probes not listed): ``<group>/<quantity>``, groups are curves in one
#: panel with no depth profile.
NESTED_KEYS: dict[str, str] = {"rank": "layer", "ncc": "layer", "hessian": "block"}

#: (probe, quantity) -> (indexed family, index): a quantity that is element ``index`` of a family
#: logged as ``<family>_<i>`` (the Hessian logs its top eigenvalue apart from ``eigenvalue_2..k``).
ALIASES: dict[tuple[str, str], tuple[str, int]] = {("hessian", "top_eigenvalue"): ("eigenvalue", 1)}

#: (probe, quantity pattern) of counts and settings: drawn small, under "details"
DETAILS: tuple[tuple[str, str], ...] = (
    ("noise", "num_*"), ("noise", "batch_size"), ("noise", "tail_index*_values"), ("noise", "tail_index_zeros"),
    ("diffusion", "fit_points"), ("diffusion", "fit_t_start"), ("hessian", "num_products"), ("igr", "lr"),
)

#: a quantity ``<q>_std_error`` is the standard error of ``<q>``: drawn as a band on ``<q>``'s panel
STD_ERROR_SUFFIX = "_std_error"


def _lookup(table: dict, probe: str, quantity: str) -> Optional[str]:
    for (p, pattern), value in table.items():
        if fnmatchcase(probe, p) and fnmatchcase(quantity, pattern):
            return value
    return None


def probe_title(probe: str) -> str:
    return PROBE_TITLES.get(probe, (f"biasprobe/{probe}", ""))[0]


def probe_citation(probe: str) -> str:
    return PROBE_CITATIONS.get(probe, PROBE_TITLES.get(probe, ("", ""))[1])


def paper(probe: str, quantity: str) -> str:
    """The short citation shown on a panel ('' for a probe the tables do not know)."""
    return _lookup(QUANTITY_PAPERS, probe, quantity) or PROBE_TITLES.get(probe, ("", ""))[1]


def label(probe: str, quantity: str) -> str:
    """The value-axis label of a quantity: its formula and units where known, else its name."""
    return _lookup(QUANTITY_LABELS, probe, quantity) or quantity.replace("_", " ")


def is_detail(probe: str, quantity: str) -> bool:
    return any(fnmatchcase(probe, p) and fnmatchcase(quantity, q) for p, q in DETAILS)


def nested_keys(probe: str) -> str:
    return NESTED_KEYS.get(probe, "group")
