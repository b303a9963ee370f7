"""empirical_ntk and friends: analytic kernels, brute force on tiny models, alignment/distance/spectrum
identities, the matrix-free operator, and bad input. Everything exact is checked in float64."""

import math

import pytest
import torch
from torch import nn

import lightning_biasprobe.functional._ntk_structured as structured
from lightning_biasprobe.functional.ntk import (
    NTKOperator,
    center_kernel,
    empirical_ntk,
    kernel_alignment,
    kernel_distance,
    ntk_plan,
    ntk_spectrum,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------- references
def loop_ntk(model, inputs, forward=None):
    """Brute force: per-sample, per-output autograd gradients, stacked output-major, then J J^T."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = inputs.shape[0]
    rows = {}
    for i in range(n):
        xi = inputs[i:i + 1]
        out = (forward(model, xi) if forward else model(xi)).reshape(-1)
        for c in range(out.numel()):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            rows[c, i] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                    for g, p in zip(grads, params)])
    C = out.numel()
    J = torch.stack([rows[c, i] for c in range(C) for i in range(n)]).to(F64)
    return J @ J.T


def trace_of(K, C):
    N = K.shape[0] // C
    return torch.diagonal(K.view(C, N, C, N), dim1=0, dim2=2).sum(-1)


def diagonal_of(K, C):
    N = K.shape[0] // C
    return torch.diagonal(K.view(C, N, C, N), dim1=0, dim2=2).permute(2, 0, 1)


def assert_kernel_close(a, b, rtol=1e-8):
    assert a.dtype == F64 and a.shape == b.shape
    err = (a - b).abs().max() / b.abs().max()
    assert err < rtol, f"relative error {err:.3e}"


# ----------------------------------------------------------------------------------- models
def tanh_mlp(d=5, h=7, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, c)).double()


def small_cnn(seed=0):
    """Every Conv2d option the structured path handles: padding modes, 'same'/'valid', stride,
    dilation, groups, no bias; and ReLU(inplace=True) right after a conv."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, padding="valid"), nn.Tanh(),
        nn.Conv2d(6, 6, 3, padding="same", groups=3, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(6, 6, (3, 2), padding=(1, 2), padding_mode="circular"), nn.Tanh(),
        nn.Conv2d(6, 5, 2, bias=False, dilation=2), nn.Flatten(), nn.Linear(5 * 2 * 5, 3),
    ).double()
    return net


class SharedTwice(nn.Module):
    """A child Linear applied twice (a per-call hook would miss the cross terms) and an own weight."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x))) * self.scale


class Mixed(nn.Module):
    """Supported and unsupported modules: embeddings (one untied, one tied to an output layer),
    LayerNorm, BatchNorm (eval), a custom module with a weight used twice, a parameter read
    outside its module, and plain Linear layers."""

    def __init__(self, vocab=11, d=6, c=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.shared = SharedTwice(d)
        self.bn = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, c)
        self.tied = nn.Linear(d, vocab, bias=False)
        self.tied.weight = self.pos.weight
        self.read_outside = nn.Linear(d, d)
        self.out = nn.Linear(vocab, c)

    def forward(self, tokens):
        h = self.ln(self.emb(tokens) + self.pos(tokens.flip(1))).mean(1)
        h = self.shared(h)
        h = torch.relu(self.bn(h)) + h @ self.read_outside.weight   # read_outside is never called
        return self.head(h) + self.out(self.tied(h))


def mixed_model(seed=0):
    torch.manual_seed(seed)
    model = Mixed().double().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


class SeqModel(nn.Module):
    """A Linear applied at every position of a sequence (weight shared over S positions)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # (N, T, 4)
        return self.head(torch.tanh(self.proj(x)).sum(1))


# ----------------------------------------------------------------------------------- analytic
def test_linear_model_block_kernel_is_identity_kron_gram_plus_one():
    torch.manual_seed(0)
    N, d, C = 9, 4, 3
    model = nn.Linear(d, C).double()
    X = torch.randn(N, d, dtype=F64)
    expected = torch.kron(torch.eye(C, dtype=F64), X @ X.T + 1)
    for method in ("auto", "jacobian"):
        K = empirical_ntk(model, X, method=method)
        torch.testing.assert_close(K, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(model, X, kind="trace"), C * (X @ X.T + 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(model, X, kind="diagonal"), (X @ X.T + 1).expand(C, N, N),
                               rtol=1e-12, atol=1e-12)


def test_linear_model_kernel_and_alignment_are_constant_over_training():
    torch.manual_seed(1)
    N, d, C = 24, 5, 3
    model = nn.Linear(d, C).double()
    X = torch.randn(N, d, dtype=F64)
    y = torch.arange(N) % C
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    K0 = empirical_ntk(model, X)
    A0 = kernel_alignment(K0, y)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        K = empirical_ntk(model, X)
        torch.testing.assert_close(K, K0, rtol=1e-12, atol=1e-11)
        assert abs(float(kernel_alignment(K, y)) - float(A0)) < 1e-12
        assert float(kernel_distance(K0, K)) < 1e-12
    assert model.weight.grad.abs().sum() > 0  # training did move the weights


# ----------------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("order", [None, "gram", "jac"])
def test_mlp_structured_equals_jacobian_equals_loop(monkeypatch, order):
    monkeypatch.setattr(structured, "_FORCE_ORDER", order)
    model = tanh_mlp()
    x = torch.randn(8, 5, dtype=F64)
    plan = ntk_plan(model, x)
    assert plan.structured and not plan.per_module and not plan.jacobian
    reference = loop_ntk(model, x)
    assert_kernel_close(empirical_ntk(model, x, chunk_size=3), reference)
    assert_kernel_close(empirical_ntk(model, x, method="jacobian", chunk_size=5), reference)
    for chunk in (3, 8):
        assert_kernel_close(empirical_ntk(model, x, kind="trace", chunk_size=chunk), trace_of(reference, 3))
        assert_kernel_close(empirical_ntk(model, x, kind="diagonal", chunk_size=chunk), diagonal_of(reference, 3))


@pytest.mark.parametrize("order", [None, "gram", "jac"])
def test_cnn_structured_equals_jacobian_equals_loop(monkeypatch, order):
    monkeypatch.setattr(structured, "_FORCE_ORDER", order)
    model = small_cnn()
    x = torch.randn(5, 2, 9, 9, dtype=F64)
    plan = ntk_plan(model, x)
    assert set(plan.structured) == {n for n, _ in model.named_parameters()}
    if order is not None:  # grouped convs always sum over positions first
        assert {o for name, o in plan.orders.items() if name != "4"} == {order}
    reference = loop_ntk(model, x)
    for kind, expected in (("block", reference), ("trace", trace_of(reference, 3)),
                           ("diagonal", diagonal_of(reference, 3))):
        for chunk in (2, 64):  # several chunks; one chunk (trace/diagonal: contracted while streaming)
            assert_kernel_close(empirical_ntk(model, x, kind=kind, chunk_size=chunk), expected)
    assert_kernel_close(empirical_ntk(model, x, method="jacobian", chunk_size=2), reference)


@pytest.mark.parametrize("order", [None, "gram", "jac"])
def test_mixed_model_routes_sum_to_the_brute_force_kernel(monkeypatch, order):
    monkeypatch.setattr(structured, "_FORCE_ORDER", order)
    model = mixed_model()
    tokens = torch.randint(0, 11, (7, 5), generator=torch.Generator().manual_seed(3))
    tokens[0, :2] = 0  # padding tokens contribute no gradient to emb
    plan = ntk_plan(model, tokens)
    # every route is exercised, and the weights that a per-call hook would get wrong are not structured
    assert {"head.weight", "out.weight"} <= set(plan.structured)
    assert {"ln.weight", "ln.bias", "shared.scale", "bn.weight", "bn.bias"} <= set(plan.per_module)
    assert {"pos.weight", "shared.lin.weight", "shared.lin.bias", "read_outside.weight"} <= set(plan.jacobian)
    assert "read_outside.bias" in plan.unused
    # an Embedding is structured (token-equality Gram) unless per-sample gradients are cheaper
    # (a small vocabulary, as here): then it takes the per-module route
    assert ("emb.weight" in plan.structured) == (order == "gram")
    assert ("emb.weight" in plan.per_module) == (order != "gram")
    reference = loop_ntk(model, tokens)
    for kind, expected in (("block", reference), ("trace", trace_of(reference, 4)),
                           ("diagonal", diagonal_of(reference, 4))):
        for chunk in (3, 64):
            assert_kernel_close(empirical_ntk(model, tokens, kind=kind, chunk_size=chunk), expected)
    assert_kernel_close(empirical_ntk(model, tokens, method="jacobian", chunk_size=4), reference)


def test_sequence_linear_dict_inputs_forward_adapter_and_frozen_parameters():
    torch.manual_seed(4)
    model = SeqModel().double()
    model.head.bias.requires_grad_(False)        # frozen: not part of the kernel
    model.proj.weight.requires_grad_(False)      # only the bias of proj remains
    x = torch.randn(6, 3, 4, dtype=F64)
    forward = lambda m, inp: m(inp["x"]) * 2.0   # noqa: E731
    reference = loop_ntk(model, x, forward=lambda m, inp: m(inp) * 2.0)
    assert_kernel_close(empirical_ntk(model, {"x": x}, forward=forward, chunk_size=4), reference)
    assert_kernel_close(empirical_ntk(model, {"x": x}, forward=forward, method="jacobian"), reference)
    assert set(ntk_plan(model, {"x": x}, forward=forward).structured) == {"proj.bias", "head.weight"}


class NoGradBranch(nn.Module):
    """A trainable layer run under no_grad (a frozen teacher branch): it contributes nothing."""

    def __init__(self):
        super().__init__()
        self.student = nn.Linear(3, 4)
        self.teacher = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            t = self.teacher(x)
        return self.head(torch.tanh(self.student(x)) + t)


def test_a_layer_run_under_no_grad_contributes_nothing():
    torch.manual_seed(5)
    model = NoGradBranch().double()
    x = torch.randn(5, 3, dtype=F64)
    reference = loop_ntk(model, x)  # teacher gradients are None there: zero rows
    for kind, expected in (("block", reference), ("trace", trace_of(reference, 2))):
        assert_kernel_close(empirical_ntk(model, x, kind=kind), expected)
        assert_kernel_close(empirical_ntk(model, x, kind=kind, method="jacobian"), expected)


def test_chunk_sizes_do_not_change_the_kernel_and_the_ordering_is_output_major():
    model = mixed_model(seed=2)
    tokens = torch.randint(0, 11, (10, 4), generator=torch.Generator().manual_seed(5))
    whole = empirical_ntk(model, tokens, chunk_size=10)
    for chunk in (1, 3, 4, 7, 64):
        torch.testing.assert_close(empirical_ntk(model, tokens, chunk_size=chunk), whole, rtol=1e-12, atol=1e-12)
    # recomputing features per pair of chunks (no cache) gives the same kernel
    torch.testing.assert_close(empirical_ntk(model, tokens, chunk_size=3, max_memory=10**7), whole,
                               rtol=1e-12, atol=1e-12)
    # output-major: K[c*N + i, c'*N + j] pairs output c of sample i with output c' of sample j
    params = [p for n, p in model.named_parameters() if n != "read_outside.bias"]  # the unused one
    out_grad = lambda c, i: torch.cat([g.reshape(-1) for g in torch.autograd.grad(  # noqa: E731
        model(tokens[i:i + 1])[0, c], params)])
    N = 10
    assert torch.allclose(whole[2 * N + 3, 1 * N + 7], out_grad(2, 3).dot(out_grad(1, 7)), rtol=1e-10)
    assert torch.equal(whole, whole.T)


def test_float32_model_returns_float64_close_to_float64_kernel():
    model = tanh_mlp(seed=3)
    x = torch.randn(6, 5, dtype=F64)
    K64 = empirical_ntk(model, x)
    K32 = empirical_ntk(model.float(), x.float())
    assert K32.dtype == F64
    assert_kernel_close(K32, K64, rtol=1e-5)


# ----------------------------------------------------------------------------------- alignment
def test_alignment_of_the_ideal_kernel_is_one_and_of_the_identity_is_known():
    N, C = 12, 3
    labels = torch.arange(N) % C
    Y = nn.functional.one_hot(labels, C).to(F64)
    y = (Y - Y.mean(0)).T.reshape(-1)
    assert abs(float(kernel_alignment(torch.outer(y, y), labels)) - 1) < 1e-12
    identity = torch.eye(N * C, dtype=F64)
    assert abs(float(kernel_alignment(identity, labels)) - 1 / math.sqrt(C * (N - 1))) < 1e-12
    # trace kernel and per-class variants on identities
    assert abs(float(kernel_alignment(torch.eye(N, dtype=F64), labels))
               - float((Y - Y.mean(0)).pow(2).sum() / (math.sqrt(N - 1) * (Y - Y.mean(0)).pow(2).sum()))) < 1e-12
    per_class = kernel_alignment(torch.eye(N, dtype=F64).expand(C, N, N), labels)
    torch.testing.assert_close(per_class, torch.full((C,), 1 / math.sqrt(N - 1), dtype=F64))


def test_alignment_is_scale_invariant_bounded_and_float_targets_are_used_as_given():
    model = tanh_mlp(seed=5)
    x = torch.randn(10, 5, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
    K = empirical_ntk(model, x)
    a = kernel_alignment(K, labels)
    assert 0 <= float(a) <= 1 and a.dtype == F64
    for scale in (1e-3, 7.0):
        assert abs(float(kernel_alignment(scale * K, labels)) - float(a)) < 1e-12
    onehot = nn.functional.one_hot(labels, 3).to(F64)
    assert abs(float(kernel_alignment(K, onehot)) - float(a)) < 1e-12  # float targets: same as one-hot
    # centering: adding a constant per output block to the targets changes nothing
    assert abs(float(kernel_alignment(K, onehot + torch.tensor([1.0, -2.0, 3.0], dtype=F64))) - float(a)) < 1e-12
    # the block alignment by hand from the definition
    H = torch.eye(10, dtype=F64) - 1 / 10
    P = torch.kron(torch.eye(3, dtype=F64), H)
    y = (H @ onehot).T.reshape(-1)
    Kc = P @ K @ P
    assert abs(float(a) - float(y @ Kc @ y / (Kc.norm() * y.dot(y)))) < 1e-12
    torch.testing.assert_close(center_kernel(K, 3), Kc)
    # a single class: no variance, NaN
    assert math.isnan(float(kernel_alignment(K, torch.zeros(10, dtype=torch.long))))


# ----------------------------------------------------------------------------------- distance
def test_kernel_distance_identities():
    torch.manual_seed(6)
    A = torch.randn(8, 8, dtype=F64)
    B = torch.randn(8, 8, dtype=F64)
    K1, K2 = A @ A.T, B @ B.T
    assert float(kernel_distance(K1, K1)) == 0.0 and float(kernel_distance(K1, K1.clone())) == 0.0
    assert float(kernel_distance(K1, 3.5 * K1)) < 1e-15
    d = kernel_distance(K1, K2)
    assert abs(float(d) - float(kernel_distance(K2, K1))) < 1e-15
    assert 0 < float(d) <= 1
    expected = 1 - (K1 * K2).sum() / (K1.norm() * K2.norm())
    assert abs(float(d) - float(expected)) < 1e-15
    orthogonal = kernel_distance(torch.diag(torch.tensor([1.0, 0.0], dtype=F64)),
                                 torch.diag(torch.tensor([0.0, 2.0], dtype=F64)))
    assert float(orthogonal) == 1.0
    with pytest.raises(ValueError, match="different shapes"):
        kernel_distance(K1, K1[:4, :4])


# ----------------------------------------------------------------------------------- spectrum
def synthetic_kernel(D=30, seed=7, alpha=1.5):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    lam = torch.arange(1, D + 1, dtype=F64).pow(-alpha)
    return U, lam, (U * lam) @ U.T


def test_spectrum_of_a_synthetic_kernel_and_target_energy_of_eigenvectors():
    U, lam, K = synthetic_kernel()
    spec = ntk_spectrum(K, k=5, center=False)
    torch.testing.assert_close(spec.eigenvalues, lam, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(spec.top_eigenvalues, lam[:5], rtol=1e-10, atol=1e-13)
    p = lam / lam.sum()
    assert abs(float(spec.effective_rank) - float(torch.exp(-(p * p.log()).sum()))) < 1e-9
    assert abs(float(spec.participation_ratio) - float(lam.sum() ** 2 / lam.pow(2).sum())) < 1e-9
    # y = u_1: all its energy in the top-1 direction; y = u_m: C(k) = 1[k >= m]
    for m in (1, 4, 9):
        for k in (1, 3, 4, 8, 9, 12):
            e = ntk_spectrum(K, U[:, m - 1], k=k, center=False).target_energy
            assert abs(float(e) - float(k >= m)) < 1e-9, (m, k)
    # a flat spectrum: effective rank = rank
    flat = ntk_spectrum(torch.diag(torch.tensor([2.0] * 6 + [0.0] * 4, dtype=F64)), k=3, center=False)
    assert abs(float(flat.effective_rank) - 6) < 1e-9 and abs(float(flat.participation_ratio) - 6) < 1e-9


def test_random_target_energy_is_k_over_dim_on_average():
    _, _, K = synthetic_kernel(D=40, seed=8)
    g = torch.Generator().manual_seed(9)
    energies = [float(ntk_spectrum(K, torch.randn(40, generator=g, dtype=F64), k=10, center=False).target_energy)
                for _ in range(400)]
    # C(k) ~ Beta(k/2, (D-k)/2): mean 1/4, sd ~ 0.068; 400 draws: the mean within 4 standard errors
    assert abs(sum(energies) / 400 - 0.25) < 4 * 0.068 / 20


def test_centered_block_spectrum_uses_the_block_layout():
    model = tanh_mlp(seed=9)
    x = torch.randn(7, 5, dtype=F64)
    labels = torch.arange(7) % 3
    K = empirical_ntk(model, x)
    spec = ntk_spectrum(K, labels, k=4)
    Kc = center_kernel(K, 3)
    torch.testing.assert_close(spec.eigenvalues, torch.linalg.eigvalsh(Kc).flip(0), rtol=1e-10, atol=1e-10)
    lam, U = torch.linalg.eigh(Kc)
    Y = nn.functional.one_hot(labels, 3).to(F64)
    y = (Y - Y.mean(0)).T.reshape(-1)
    expected = (U[:, -4:].T @ y).pow(2).sum() / y.dot(y)
    assert abs(float(spec.target_energy) - float(expected)) < 1e-10


# ----------------------------------------------------------------------------------- matrix-free
def test_operator_matvec_statistics_and_lanczos_match_the_dense_kernel():
    model = mixed_model(seed=4)
    tokens = torch.randint(0, 11, (9, 4), generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1])
    K = empirical_ntk(model, tokens)
    op = NTKOperator(model, tokens, chunk_size=4)
    assert op.shape == K.shape
    v = torch.randn(K.shape[0], dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matvec(v), K @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.centered_matvec(v), center_kernel(K, 4) @ v, rtol=1e-10, atol=1e-10)
    stats = op.statistics(labels)
    Kc = center_kernel(K, 4)
    blocks = diagonal_of(K, 4)
    for got, want in ((stats.alignment, kernel_alignment(K, labels)),
                      (stats.alignment_trace, kernel_alignment(blocks.sum(0), labels)),
                      (stats.frobenius_norm, K.norm()), (stats.trace, K.trace()),
                      (stats.centered_frobenius_norm, Kc.norm()), (stats.centered_trace, Kc.trace())):
        assert abs(float(got) - float(want)) <= 1e-10 * abs(float(want)), (got, want)
    torch.testing.assert_close(stats.alignment_per_class, kernel_alignment(blocks, labels), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.trace_kernel, blocks.sum(0), rtol=1e-10, atol=1e-10)
    assert kernel_alignment(op, labels) == stats.alignment
    # Lanczos on NTK-vector products: the top eigenvalues of K_c and the target energy
    dense = ntk_spectrum(K, labels, k=3)
    free = ntk_spectrum(op, labels, k=3, tol=1e-10)
    assert free.converged
    torch.testing.assert_close(free.top_eigenvalues, dense.top_eigenvalues, rtol=1e-8, atol=0)
    assert abs(float(free.target_energy) - float(dense.target_energy)) < 1e-6


# ----------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_a_clear_message():
    model = tanh_mlp()
    x = torch.randn(4, 5, dtype=F64)
    with pytest.raises(ValueError, match="kind must be"):
        empirical_ntk(model, x, kind="full")
    with pytest.raises(ValueError, match="chunk_size"):
        empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        empirical_ntk(model, x, method="loop")
    with pytest.raises(ValueError, match="does not depend differentiably"):
        empirical_ntk(model, x, forward=lambda m, inp: m(inp).detach())
    with pytest.raises(ValueError, match="does not depend differentiably"):
        empirical_ntk(model, x, forward=lambda m, inp: m(inp).round().detach() + 0 * inp.sum(1, keepdim=True))
    frozen = tanh_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(frozen, x)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"BatchNorm.*model.eval\(\)"):
        empirical_ntk(bn, x)
    with pytest.raises(ValueError, match="Dropout"):
        empirical_ntk(nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5)).double(), x)
    with pytest.raises(ValueError, match=r"max_memory.*NTKOperator"):
        empirical_ntk(model, torch.randn(64, 5, dtype=F64), max_memory=100_000)
    with pytest.raises(ValueError, match="one sample's kernel features"):  # the kernel fits, no feature does
        empirical_ntk(model, torch.randn(64, 5, dtype=F64), kind="trace", max_memory=33_000)
    with pytest.raises(ValueError, match=r"class targets must lie in \[0, 2\]"):
        kernel_alignment(empirical_ntk(model, x), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="does not match 5 samples"):
        kernel_alignment(empirical_ntk(model, x), torch.tensor([0, 1, 2, 0, 1]))


@pytest.mark.parametrize("kind", ["block", "trace"])
def test_a_tight_memory_budget_shrinks_the_chunk_instead_of_failing(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.LayerNorm(40), nn.Linear(40, 3)).double()
    x = torch.randn(24, 6, dtype=F64)
    whole = empirical_ntk(model, x, kind=kind)
    kernel_bytes = whole.numel() * 8
    # Room for about 3 samples' features beside the kernel: the default chunk (24) would not fit.
    from lightning_biasprobe.functional._ntk_structured import Engine, make_plan
    plan = make_plan(model, x, None, "auto", kind=kind, chunk_size=24)
    per_sample = Engine(model, x, None, plan, kind, None).features(0, 1).nbytes()
    tight = empirical_ntk(model, x, kind=kind, max_memory=kernel_bytes + 6 * per_sample + 8)
    torch.testing.assert_close(tight, whole, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- memory-saving paths
def mixed_model_many_outputs(seed=0, c=7):
    torch.manual_seed(seed)
    model = Mixed(c=c).double().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def conv_head(c=7, seed=0):
    """small_cnn's convolutions with a 7-output head: enough outputs for the grouped one-chunk pass."""
    net = small_cnn(seed)
    torch.manual_seed(seed + 1)
    net[-1] = nn.Linear(5 * 2 * 5, c).double()
    return net


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("order", [None, "gram", "jac"])
def test_one_chunk_block_kernel_by_output_groups_equals_brute_force(monkeypatch, groups, order):
    """One chunk, C = 7: the features of one group of outputs are held at a time and the earlier
    outputs recomputed (every route: structured gram/jac, per-module, whole-model Jacobian)."""
    monkeypatch.setattr(structured, "_FORCE_ORDER", order)
    monkeypatch.setattr(structured, "_OUTPUT_GROUPS", groups)
    monkeypatch.setattr(structured, "_PATCH_ELEMENTS", 50)  # conv patches rebuilt a few samples at a time
    tokens = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(4))
    tokens[1, :3] = 0
    cases = [(mixed_model_many_outputs(), tokens), (conv_head(), torch.randn(5, 2, 9, 9, dtype=F64)),
             (tanh_mlp(c=7, seed=2), torch.randn(6, 5, dtype=F64))]
    for model, x in cases:
        reference = loop_ntk(model, x)
        K = empirical_ntk(model, x)
        assert_kernel_close(K, reference)
        assert torch.equal(K, K.T)
        # several chunks (no grouping) and the reference method give the same kernel
        assert_kernel_close(empirical_ntk(model, x, chunk_size=2), reference)
        assert_kernel_close(empirical_ntk(model, x, method="jacobian"), reference)


def test_grouped_pass_holds_one_group_plus_one_output_and_recomputes_the_earlier_ones(monkeypatch):
    C, h = 7, 4  # groups of 4 and 3 outputs
    model = tanh_mlp(c=C, seed=5)
    x = torch.randn(6, 5, dtype=F64)
    held, backwards = [], []
    contract, gradient = structured.Engine.contract, structured.Engine._gradient
    monkeypatch.setattr(structured.Engine, "contract",
                        lambda self, FI, FJ, out, lower=False: held.append((FI.m, FJ.m, lower)) or
                        contract(self, FI, FJ, out, lower))
    monkeypatch.setattr(structured.Engine, "_gradient",
                        lambda self, out, zs, c, retain: backwards.append(c) or gradient(self, out, zs, c, retain))
    K = empirical_ntk(model, x)
    assert_kernel_close(K, loop_ntk(model, x))
    # group [0, 4): itself; group [4, 7): itself, then outputs 0..3 recomputed one at a time
    assert held == [(4, 4, True), (3, 3, True), (3, 1, False), (3, 1, False), (3, 1, False), (3, 1, False)]
    assert backwards == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    assert h == -(-C // structured._OUTPUT_GROUPS)
    # fewer than _GROUP_MIN_OUTPUTS outputs: one pass over all outputs, still only the blocks c' <= c
    held.clear()
    backwards.clear()
    empirical_ntk(tanh_mlp(c=5), x)
    assert held == [(5, 5, True)] and backwards == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("order", [None, "gram", "jac"])
def test_small_contraction_tiles_change_nothing(monkeypatch, order):
    """Tiles smaller than one output's rows and columns (partial spans of samples), every kind."""
    monkeypatch.setattr(structured, "_FORCE_ORDER", order)
    monkeypatch.setattr(structured, "_SLAB", 7)
    model = mixed_model()
    tokens = torch.randint(0, 11, (7, 5), generator=torch.Generator().manual_seed(3))
    reference = loop_ntk(model, tokens)
    for chunk in (3, 64):
        assert_kernel_close(empirical_ntk(model, tokens, chunk_size=chunk), reference)
        assert_kernel_close(empirical_ntk(model, tokens, kind="trace", chunk_size=chunk), trace_of(reference, 4))
        assert_kernel_close(empirical_ntk(model, tokens, kind="diagonal", chunk_size=chunk), diagonal_of(reference, 4))
    model, x = small_cnn(), torch.randn(5, 2, 9, 9, dtype=F64)
    assert_kernel_close(empirical_ntk(model, x, chunk_size=2), loop_ntk(model, x))


def test_conv_patches_match_unfold_for_every_conv_option():
    model = small_cnn()
    x = torch.randn(3, 2, 9, 9, dtype=F64)
    seen = 0
    for m in model:
        if isinstance(m, nn.Conv2d):
            padded = structured._conv_pad(m, x)
            expected = nn.functional.unfold(padded, m.kernel_size, dilation=m.dilation, stride=m.stride)
            assert torch.equal(structured._conv_patches(m, x), expected)
            seen += 1
        x = m(x)
    assert seen == 5


@pytest.mark.parametrize("D", [1, 31, 33, 100, 300])
def test_symmetrize_copies_the_lower_triangle_exactly(D):
    A = torch.randn(D, D, dtype=F64, generator=torch.Generator().manual_seed(D))
    expected = torch.tril(A) + torch.tril(A, -1).T
    got = structured.symmetrize_(A.clone(), tile=64)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("n_i, n_j", [(3, 2), (70, 65)])  # one output at a time; one pair of outputs at a time
def test_mirror_block_fills_the_transposed_block(n_i, n_j):
    C, N = 3, n_i + n_j
    K = torch.randn(C, N, C, N, dtype=F64, generator=torch.Generator().manual_seed(0))
    before = K.clone()
    structured.mirror_block_(K, n_j, N, 0, n_j)  # chunk i = [n_j, N), chunk j = [0, n_j)
    torch.testing.assert_close(K[:, :n_j, :, n_j:], before[:, n_j:, :, :n_j].permute(2, 3, 0, 1), rtol=0, atol=0)
    assert torch.equal(K[:, n_j:, :, :n_j], before[:, n_j:, :, :n_j])   # the source is untouched
    assert torch.equal(K[:, :n_j, :, :n_j], before[:, :n_j, :, :n_j])


def test_float32_model_by_output_groups_is_close_to_float64():
    model = tanh_mlp(c=8, seed=6)
    x = torch.randn(9, 5, dtype=F64)
    K64 = empirical_ntk(model, x)
    K32 = empirical_ntk(model.float(), x.float())  # float32 products, float64 accumulation
    assert K32.dtype == F64 and torch.equal(K32, K32.T)
    assert_kernel_close(K32, K64, rtol=1e-5)
