"""per_sample_gradients(method="auto"): structured linear layers + vmap for the rest equal the vmap path and a loop."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_biasprobe.cli.demo import make_mlp
from lightning_biasprobe.functional._per_sample import make_plan
from lightning_biasprobe.functional.noise import gradient_noise_statistics, per_sample_gradients

F64 = torch.float64


def loop_rows(model, inputs, targets, loss=None, forward=None):
    """The brute force: one torch.autograd.grad of one sample's loss (a batch of one), flattened."""
    loss = loss or (lambda o, y: F.cross_entropy(o, y) if not y.is_floating_point() else F.mse_loss(o, y))
    forward = forward or (lambda m, x: m(x))
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(targets.shape[0]):
        g = torch.autograd.grad(loss(forward(model, inputs[i:i + 1]), targets[i:i + 1]), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(g, params)]))
    return torch.stack(rows)


def assert_same(a, b, rel):
    """Equal up to ``rel`` times the largest entry (float rounding differs between the routes)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = b.abs().max()
    assert scale > 1e-3  # not vacuous
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(scale))


def routes(model, x, **kwargs):
    """Names of the structured parameters of the plan."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plan = make_plan(model, params, x[:1], kwargs.get("forward"))
    return {params[j][0] for r in plan.routes for j in (r.weight, r.bias) if j is not None}


# --------------------------------------------------------------------------------------- models
class UsedTwice(nn.Module):
    """A custom module whose one weight is used twice in its forward."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(0.4 * torch.randn(d, d))

    def forward(self, x):
        return torch.tanh(x @ self.weight) @ self.weight.T


class Mixed(nn.Module):
    """Conv1d, Linear, LayerNorm, a custom module, a Linear called twice, a weight read outside its layer."""

    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.lin1 = nn.Linear(12, 8)
        self.norm = nn.LayerNorm(8)
        self.twice = UsedTwice(8)
        self.shared = nn.Linear(8, 8)  # called twice
        self.proj = nn.Linear(8, 8)  # its weight is also read outside the layer
        self.act = nn.ReLU(inplace=True)  # in place, right after a structured layer
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, c)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        h = self.norm(torch.tanh(self.lin1(h)))
        h = self.twice(h)
        h = self.shared(torch.tanh(self.shared(h)))
        h = torch.tanh(self.proj(h)) + 0.3 * F.linear(h, self.proj.weight)
        h = self.act(self.mid(h))
        return self.head(h)


class Sequence(nn.Module):
    """Linear layers on (N, T, D) inputs; per-position outputs (N, T, C) or pooled (N, C)."""

    def __init__(self, d=5, h=6, c=3, pool=False):
        super().__init__()
        self.inp, self.out, self.pool = nn.Linear(d, h), nn.Linear(h, c), pool
        self.gate = nn.Linear(h, 1, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h * torch.sigmoid(self.gate(h))
        return self.out(h.mean(1) if self.pool else h)


class Encoder(nn.Module):
    """A batch-first transformer layer: its feed-forward Linears are structured, attention is vmapped."""

    def __init__(self, d=8, c=3):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, c)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class TimeFirst(nn.Module):
    """A linear layer applied to (T, N, D): its first dimension is not the sample."""

    def __init__(self, d=3, c=2):
        super().__init__()
        self.lin, self.head = nn.Linear(d, d), nn.Linear(d, c)

    def forward(self, x):  # x: (N, T, D)
        h = torch.tanh(self.lin(x.transpose(0, 1)))  # (T, N, D)
        return self.head(h.sum(0))


def check_all_methods(model, x, y, rel=1e-10, loss=None, forward=None, **kwargs):
    auto = per_sample_gradients(model, x, y, flatten=True, loss_fn=loss, forward=forward, **kwargs)
    vmapped = per_sample_gradients(model, x, y, flatten=True, loss_fn=loss, forward=forward, method="vmap")
    assert_same(auto, vmapped, rel)
    assert_same(auto, loop_rows(model, x, y, loss, forward), rel)
    return auto


# --------------------------------------------------------------------------------------- equality
def test_demo_mlp_is_fully_structured_and_equals_vmap_and_loop():
    torch.manual_seed(0)
    model = make_mlp().to(F64).eval()
    x, y = torch.rand(40, 64, dtype=F64), torch.randint(0, 10, (40,))
    assert routes(model, x) == {n for n, _ in model.named_parameters()}  # no vmap at all
    auto = check_all_methods(model, x, y)
    as_dict = per_sample_gradients(model, x, y)
    assert list(as_dict) == [n for n, _ in model.named_parameters()]
    assert as_dict["2.weight"].shape == (40, 128, 128) and as_dict["4.bias"].shape == (40, 10)
    assert_same(torch.cat([g.reshape(40, -1) for g in as_dict.values()], 1), auto, 1e-15)


def test_demo_mlp_float32_agrees_with_vmap_to_1e_6():
    torch.manual_seed(0)
    model = make_mlp().eval()
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    auto = per_sample_gradients(model, x, y, flatten=True)
    assert auto.dtype == torch.float32
    assert_same(auto, per_sample_gradients(model, x, y, flatten=True, method="vmap"), 1e-6)
    assert_same(auto, per_sample_gradients(model, x, y, flatten=True, method="loop"), 1e-6)


def test_mixed_model_routes_and_equals_vmap_and_loop():
    torch.manual_seed(1)
    model = Mixed().to(F64).eval()
    model.head.bias.requires_grad_(False)  # a frozen parameter is left out
    x, y = torch.randn(9, 2, 4, dtype=F64), torch.randint(0, 3, (9,))
    # Only the plain, once-called layers whose parameters nothing else reads are structured.
    assert routes(model, x) == {"lin1.weight", "lin1.bias", "proj.bias", "mid.weight", "mid.bias", "head.weight"}
    auto = check_all_methods(model, x, y)
    assert auto.shape == (9, sum(p.numel() for p in model.parameters() if p.requires_grad))


def test_sequence_model_per_position_pooled_mse_and_custom_loss():
    torch.manual_seed(2)
    x = torch.randn(7, 4, 5, dtype=F64)
    model = Sequence().to(F64).eval()
    assert routes(model, x) == {n for n, _ in model.named_parameters()}
    y = torch.randint(0, 3, (7, 4))  # a label per position: the default loss averages over positions

    def seq_ce(o, t):
        return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1))

    check_all_methods(model, x, y, loss=seq_ce)  # a custom loss (vmapped over the samples)
    auto = per_sample_gradients(model, x, y, flatten=True)  # the default loss (closed per-sample form)
    assert_same(auto, loop_rows(model, x, y, seq_ce), 1e-10)
    y[2, 1] = y[5, 0] = -100  # ignored positions: the mean runs over each sample's other positions
    assert_same(per_sample_gradients(model, x, y, flatten=True), loop_rows(model, x, y, seq_ce), 1e-10)
    yf = torch.randn(7, 4, 3, dtype=F64)  # mean squared error per position
    assert_same(per_sample_gradients(model, x, yf, flatten=True), loop_rows(model, x, yf, F.mse_loss), 1e-10)
    pooled = Sequence(pool=True).to(F64).eval()
    check_all_methods(pooled, x, torch.randint(0, 3, (7,)))
    smooth = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2)  # noqa: E731
    check_all_methods(pooled, x, torch.randint(0, 3, (7,)), loss=smooth)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_transformer_layer_on_sequences():
    torch.manual_seed(9)
    model = Encoder().to(F64).eval()
    x = torch.randn(5, 4, 8, dtype=F64)
    assert routes(model, x) == {f"{m}.{p}" for m in ("enc.linear1", "enc.linear2", "head") for p in ("weight", "bias")}
    check_all_methods(model, x, torch.randint(0, 3, (5,)))


def test_layer_whose_first_dimension_is_not_the_sample_is_left_to_vmap():
    torch.manual_seed(3)
    model = TimeFirst().to(F64).eval()
    x = torch.randn(4, 4, 3, dtype=F64)  # T == N: a shape check alone would not notice
    assert routes(model, x) == {"head.weight", "head.bias"}
    check_all_methods(model, x, torch.randint(0, 2, (4,)))


def test_weight_read_by_the_forward_adapter_and_a_loss_vmap_cannot_run():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64).eval()
    x, y = torch.randn(8, 5, dtype=F64), torch.randint(0, 3, (8,))

    def forward(m, inp):  # reads the first layer's weight outside the layer
        return m(inp) + 0.1 * (inp @ m[0].weight.T).sum(1, keepdim=True)

    assert routes(model, x, forward=forward) == {"0.bias", "2.weight", "2.bias"}
    check_all_methods(model, x, y, forward=forward)

    def data_dependent(o, t):  # .item(): vmap cannot run it, the structured route calls it per sample
        return F.cross_entropy(o, t) * (2.0 if o.sum().item() > 0 else 1.0)

    auto = per_sample_gradients(model, x, y, flatten=True, loss_fn=data_dependent)
    assert_same(auto, per_sample_gradients(model, x, y, flatten=True, loss_fn=data_dependent, method="loop"), 1e-10)


def test_batchnorm_in_eval_mode_is_left_to_vmap():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(F64)
    x, y = torch.randn(10, 5, dtype=F64), torch.randint(0, 3, (10,))
    model(x)  # non-trivial running statistics
    model.eval()
    assert routes(model, x) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    check_all_methods(model, x, y)


# --------------------------------------------------------------------------------------- chunks, .grad, errors
def test_chunk_sizes_do_not_change_the_results():
    torch.manual_seed(6)
    model = Mixed().to(F64).eval()
    x, y = torch.randn(11, 2, 4, dtype=F64), torch.randint(0, 3, (11,))
    whole = per_sample_gradients(model, x, y, flatten=True)
    for chunk in (1, 3, 11, 100):
        assert_same(per_sample_gradients(model, x, y, flatten=True, chunk_size=chunk), whole, 1e-13)
        parts = per_sample_gradients(model, x, y, chunk_size=chunk)
        assert all(g.is_contiguous() for g in parts.values())
        assert_same(torch.cat([g.reshape(11, -1) for g in parts.values()], 1), whole, 1e-13)
    mlp = make_mlp(16).to(F64).eval()
    xm, ym = torch.rand(13, 64, dtype=F64), torch.randint(0, 10, (13,))
    ref = per_sample_gradients(mlp, xm, ym, flatten=True, method="vmap")
    for chunk in (1, 5, None):
        assert_same(per_sample_gradients(mlp, xm, ym, flatten=True, chunk_size=chunk), ref, 1e-12)


def test_noise_statistics_use_the_structured_route_and_agree_with_vmap():
    torch.manual_seed(7)
    model = Mixed().to(F64).eval()
    x, y = torch.randn(48, 2, 4, dtype=F64), torch.randint(0, 3, (48,))
    auto = gradient_noise_statistics(model, x, y, batch_size=4, chunk_size=12)
    vmapped = gradient_noise_statistics(model, x, y, batch_size=4, chunk_size=12, method="vmap")
    assert auto.tail.alpha == pytest.approx(vmapped.tail.alpha, rel=1e-8)
    assert auto.tail_standardized.alpha == pytest.approx(vmapped.tail_standardized.alpha, rel=1e-8)
    for field in ("trace_cov", "grad_sq_norm", "gsnr"):
        assert getattr(auto.noise_scale, field) == pytest.approx(getattr(vmapped.noise_scale, field), rel=1e-9)


def test_grad_and_rng_are_untouched():
    torch.manual_seed(8)
    model = Mixed().to(F64).eval()
    x, y = torch.randn(6, 2, 4, dtype=F64), torch.randint(0, 3, (6,))
    sentinel = torch.full_like(model.lin1.weight, 7.0)
    model.lin1.weight.grad = sentinel.clone()
    state = torch.get_rng_state()
    per_sample_gradients(model, x, y)
    per_sample_gradients(model, x, y, flatten=True, chunk_size=2)
    gradient_noise_statistics(model, x, y, batch_size=2)
    assert torch.equal(model.lin1.weight.grad, sentinel)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lin1.weight")
    assert torch.equal(torch.get_rng_state(), state)


def test_batchnorm_in_train_mode_is_a_clear_error_and_bad_method():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(F64).train()
    x, y = torch.randn(10, 5, dtype=F64), torch.randint(0, 3, (10,))
    running = model[1].running_mean.clone()
    for method in ("auto", "vmap"):
        with pytest.raises(ValueError, match=r"BatchNorm.*train mode.*model\.eval\(\)"):
            per_sample_gradients(model, x, y, method=method)
    with pytest.raises(ValueError, match="BatchNorm"):
        gradient_noise_statistics(model, x, y, batch_size=2)
    assert torch.equal(model[1].running_mean, running)
    with pytest.raises(ValueError, match="'auto', 'vmap' or 'loop'"):
        per_sample_gradients(model.eval(), x, y, method="structured")


def test_a_loss_that_is_not_a_scalar_is_explained():
    model = nn.Sequential(nn.Linear(5, 3)).to(F64).eval()
    x, y = torch.randn(4, 5, dtype=F64), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="scalar"):
        per_sample_gradients(model, x, y, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
