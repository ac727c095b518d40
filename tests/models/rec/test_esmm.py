import pytest
import torch

from mtl.models.rec import ESMM


def _esmm(**kw: object) -> ESMM:
    torch.manual_seed(0)
    return ESMM(d_in=16, tasks=["ctr", "ctcvr"], tower_hidden=[8], **kw)


def test_ctcvr_is_exactly_ctr_times_cvr() -> None:
    model = _esmm(cvr_task="cvr")
    out = model(torch.randn(64, 16))
    assert list(out.logits) == ["ctr"] and sorted(out.probs) == ["ctcvr", "cvr"]
    p_ctr = torch.sigmoid(out.logits["ctr"])
    assert torch.equal(out.probs["ctcvr"], p_ctr * out.probs["cvr"])
    assert torch.all(out.probs["ctcvr"] <= p_ctr)  # conversion needs a click
    assert out.gate_weights == {} and out.expert_outputs is None and out.aux_loss.item() == 0


def test_towers_are_separate_and_cvr_is_hidden_by_default() -> None:
    model = _esmm()
    out = model(torch.randn(8, 16))
    assert sorted(out.probs) == ["ctcvr"]
    assert model.ctr_tower is not model.cvr_tower
    # the ctcvr loss trains both towers (that is how CVR learns on the entire space)
    loss = torch.nn.functional.binary_cross_entropy(out.probs["ctcvr"], torch.ones(8))
    g_ctr, g_cvr = torch.autograd.grad(
        loss, [model.ctr_tower.head.weight, model.cvr_tower.head.weight]
    )
    assert g_ctr.abs().sum() > 0 and g_cvr.abs().sum() > 0


def test_custom_task_names_and_shared_bottom() -> None:
    model = ESMM(
        d_in=16,
        tasks=["buy", "click"],
        ctr_task="click",
        ctcvr_task="buy",
        bottom_hidden=[12],
        tower_hidden=[4],
    )
    out = model(torch.randn(4, 16))
    assert list(out.logits) == ["click"] and list(out.probs) == ["buy"]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (["ctr"], r"lack \['ctcvr'\]"),
        (["ctr", "ctcvr", "like"], r"unknown \['like'\]"),
        (["click", "ctcvr"], r"lack \['ctr'\] and have unknown \['click'\]"),
    ],
)
def test_tasks_must_match_the_ctr_and_ctcvr_names(tasks: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ESMM(d_in=4, tasks=tasks)


def test_supervised_cvr_task_is_allowed() -> None:
    model = ESMM(d_in=4, tasks=["ctr", "ctcvr", "cvr"], cvr_task="cvr", tower_hidden=[4])
    assert sorted(model(torch.randn(3, 4)).probs) == ["ctcvr", "cvr"]
    with pytest.raises(ValueError, match="must differ"):
        ESMM(d_in=4, tasks=["ctr", "ctcvr"], cvr_task="ctr")
