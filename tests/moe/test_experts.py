import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl.moe import ExpertBank, ExpertList, SwiGLUExperts
from mtl.moe.grouped import grouped_mm, looped_grouped_mm

from .reference import expert_forward, padded_grouped_mm

SEAMS = [grouped_mm, looped_grouped_mm, padded_grouped_mm]


@pytest.mark.parametrize("seam", SEAMS, ids=lambda f: f.__name__)
def test_grouped_matmul_matches_per_group_matmul(seam) -> None:
    torch.manual_seed(0)
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(4, 8, 12, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 2])  # one empty group
    y = seam(x, w, counts)
    starts = [0, 3, 3, 8]
    ref = torch.cat(
        [x[s : s + c] @ w[e] for e, (s, c) in enumerate(zip(starts, counts.tolist(), strict=True))]
    )
    torch.testing.assert_close(y, ref)
    # sum() gives a stride-0 gradient, which grouped_mm's CPU backward rejects unless handled
    y.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref.sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("seam", SEAMS, ids=lambda f: f.__name__)
def test_grouped_matmul_of_no_rows(seam) -> None:
    x, w = torch.randn(0, 8), torch.randn(3, 8, 4)
    assert seam(x, w, torch.zeros(3, dtype=torch.long)).shape == (0, 4)


@pytest.mark.parametrize(
    "kw",
    [
        dict(dims=[6, 10, 6], activation="gelu"),
        dict(dims=[6, 10, 4], activation="relu", bias=True, activate_last=True),
        dict(dims=[6, 8], activation="relu", bias=True, activate_last=True),
        dict(dims=[6, 10, 6], activation="silu", hidden_sizes=[10, 3, 7]),
        dict(swiglu=True),
        dict(swiglu=True, hidden_sizes=[10, 3, 7]),
    ],
)
def test_forward_all_and_grouped_match_per_expert_reference(kw: dict) -> None:
    torch.manual_seed(1)
    if kw.pop("swiglu", False):
        bank = SwiGLUExperts(num_experts=3, d_model=6, d_hidden=10, **kw)
    else:
        bank = ExpertBank(num_experts=3, **kw)
    x = torch.randn(9, 6)
    y_all = bank.forward_all(x)
    for e in range(3):
        torch.testing.assert_close(y_all[e], expert_forward(bank, e, x))
    counts = torch.tensor([2, 4, 3])
    ids = torch.repeat_interleave(torch.arange(3), counts)
    y_grp = bank.forward_grouped(x, counts)
    ref = torch.cat([expert_forward(bank, e, x[ids == e]) for e in range(3)])
    torch.testing.assert_close(y_grp, ref)
    # per-expert inputs (E, T, D) take each expert's own rows
    xe = torch.randn(3, 5, 6)
    y_e = bank.forward_all(xe)
    for e in range(3):
        torch.testing.assert_close(y_e[e], expert_forward(bank, e, xe[e]))


def test_hidden_sizes_really_shrink_an_expert() -> None:
    torch.manual_seed(2)
    bank = ExpertBank(num_experts=2, dims=[4, 8, 4], activation="relu", hidden_sizes=[8, 2])
    small = ExpertBank(num_experts=1, dims=[4, 2, 4], activation="relu")
    with torch.no_grad():
        small.weights[0][0].copy_(bank.weights[0][1][:, :2])
        small.weights[1][0].copy_(bank.weights[1][1][:2])
    x = torch.randn(5, 4)
    torch.testing.assert_close(bank.forward_all(x)[1], small.forward_all(x)[0])


def test_from_modules_equals_expert_list() -> None:
    torch.manual_seed(3)
    mods = [nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 5)) for _ in range(4)]
    bank = ExpertBank.from_modules(mods, activation="gelu")
    lst = ExpertList(experts=mods)
    x = torch.randn(6, 5)
    torch.testing.assert_close(bank.forward_all(x), lst.forward_all(x))
    counts = torch.tensor([1, 2, 0, 3])
    torch.testing.assert_close(bank.forward_grouped(x, counts), lst.forward_grouped(x, counts))


def test_batch_norm_experts_normalise_each_expert_separately() -> None:
    torch.manual_seed(4)
    bank = ExpertBank(
        num_experts=3, dims=[4, 6], activation="identity", norm="batch", activate_last=True
    )
    with torch.no_grad():
        bank.weights[0][1] *= 100.0  # one expert with a much larger output scale
    y = bank.forward_all(torch.randn(256, 4))
    std_E = y.std(dim=(1, 2))
    assert torch.allclose(std_E, torch.ones(3), atol=0.05), std_E
    with pytest.raises(ValueError, match="dense dispatch"):
        bank.forward_grouped(torch.randn(2, 4), torch.tensor([1, 1, 0]))


@pytest.mark.parametrize(
    ("kw", "arg"),
    [
        (dict(num_experts=0, dims=[4, 4]), "num_experts"),
        (dict(num_experts=2, dims=[4]), "dims"),
        (dict(num_experts=2, dims=[4, 4], activation="tanhh"), "activation"),
        (dict(num_experts=2, dims=[4, 4, 4], hidden_sizes=[4]), "hidden_sizes"),
        (dict(num_experts=2, dims=[4, 4], norm="layer"), "norm"),
        (dict(num_experts=2, dims=[4, 4], dropout=1.0), "dropout"),
    ],
)
def test_bad_expert_arguments_name_the_argument(kw: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        ExpertBank(**kw)


def test_mismatched_input_width_is_a_clear_error() -> None:
    bank = ExpertBank(num_experts=2, dims=[4, 4])
    with pytest.raises(ValueError, match="width 5"):
        bank.forward_all(torch.randn(3, 5))


def _dropout_mask(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The mask (kept values scaled by ``1 / (1 - p)``) that ``F.dropout`` draws next for ``shape``."""
    return F.dropout(torch.ones(shape), p, training=True)


@pytest.mark.parametrize("shared_input", [True, False])
def test_expert_dropout_drops_each_experts_hidden_units_with_its_own_mask(
    shared_input: bool,
) -> None:
    torch.manual_seed(6)
    bank = ExpertBank(num_experts=3, dims=[5, 7, 4], activation="relu", bias=True, dropout=0.25)
    x = torch.randn(3, 11, 5) if not shared_input else torch.randn(11, 5)
    torch.manual_seed(8)
    y_ETD = bank.forward_all(x)
    # one mask per activated layer, in layer order, drawn over the hidden units in
    # memory order: (T, E, H) for a shared input, (E, T, H) for per-expert inputs
    torch.manual_seed(8)
    if shared_input:
        mask_TEH = _dropout_mask((11, 3, 7), 0.25)
    else:
        mask_TEH = _dropout_mask((3, 11, 7), 0.25).transpose(0, 1)
    for e in range(3):
        x_e = x if shared_input else x[e]
        h = torch.relu(x_e @ bank.weights[0][e] + bank.biases[0][e]) * mask_TEH[:, e]
        ref = h @ bank.weights[1][e] + bank.biases[1][e]
        torch.testing.assert_close(y_ETD[e], ref)
    assert float((mask_TEH == 0).float().mean()) > 0.0
    bank.eval()
    no_drop = ExpertBank(num_experts=3, dims=[5, 7, 4], activation="relu", bias=True)
    no_drop.load_state_dict(bank.state_dict())
    torch.testing.assert_close(bank.forward_all(x), no_drop.eval().forward_all(x))


def test_expert_dropout_applies_on_grouped_rows() -> None:
    torch.manual_seed(9)
    bank = ExpertBank(num_experts=2, dims=[4, 6, 4], activation="gelu", bias=True, dropout=0.5)
    x = torch.randn(5, 4)
    counts = torch.tensor([3, 2])
    ids = [0, 0, 0, 1, 1]
    torch.manual_seed(10)
    y = bank.forward_grouped(x, counts)
    torch.manual_seed(10)
    mask = _dropout_mask((5, 6), 0.5)
    ref = []
    for row, e in enumerate(ids):
        h = F.gelu(x[row] @ bank.weights[0][e] + bank.biases[0][e]) * mask[row]
        ref.append(h @ bank.weights[1][e] + bank.biases[1][e])
    torch.testing.assert_close(y, torch.stack(ref))


def test_batch_norm_experts_with_dropout_match_a_per_expert_loop_with_the_same_mask() -> None:
    torch.manual_seed(11)
    E, H = 3, 7
    bank = ExpertBank(
        num_experts=E, dims=[5, H, 4], activation="relu", bias=True, norm="batch", dropout=0.25
    )
    with torch.no_grad():
        bank.norms[0].weight.uniform_(0.5, 1.5)
        bank.norms[0].bias.uniform_(-0.5, 0.5)
    x = torch.randn(13, 5, requires_grad=True)
    torch.manual_seed(12)
    y_ETD = bank.forward_all(x)
    # the layer draws its (T, E, H) mask after the norm, from the same generator
    torch.manual_seed(12)
    mask_TEH = _dropout_mask((13, E, H), 0.25)
    bn = bank.norms[0]
    refs = []
    for e in range(E):
        z = x @ bank.weights[0][e] + bank.biases[0][e]
        units = slice(e * H, (e + 1) * H)
        z_hat = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + bn.eps)
        h = torch.relu(z_hat * bn.weight[units] + bn.bias[units]) * mask_TEH[:, e]
        refs.append(h @ bank.weights[1][e] + bank.biases[1][e])
    for e in range(E):
        torch.testing.assert_close(y_ETD[e], refs[e])
    g = torch.randn_like(y_ETD)
    got = torch.autograd.grad((y_ETD * g).sum(), [x, bank.weights[0], bn.weight])
    want = torch.autograd.grad(
        sum((r * g[e]).sum() for e, r in enumerate(refs)), [x, bank.weights[0], bn.weight]
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert int(bn.num_batches_tracked) == 1
    # the expert bias cancels in training but moves the running mean that eval mode uses
    z_all = torch.cat([x @ bank.weights[0][e] + bank.biases[0][e] for e in range(E)], dim=1)
    torch.testing.assert_close(bn.running_mean, bn.momentum * z_all.detach().mean(0))
