"""The ``compile`` config key: validation, runs equal to eager ones, checkpoints that resume either way."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from mtl.training.build import build_lm
from mtl.training.compile import compile_model, compile_options
from mtl.training.config import compose_config
from mtl.training.train import train

LM = [
    "experiment=lm_mixtral",
    "model.n_layers=2",
    "data.block_size=32",
    "data.batch_size=8",
    "data.steps_per_epoch=3",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "generate.max_new_tokens=20",
]
AOT = "compile={backend:aot_eager}"  # dynamo + AOTAutograd, what inductor receives, no C++
TINY_LM = {
    "_target_": "mtl.models.lm.TransformerLM",
    "d_model": 16,
    "n_layers": 1,
    "n_heads": 2,
    "d_ff": 32,
    "max_seq_len": 8,
}


def run_from_overrides(overrides: list[str]) -> dict:
    return train(compose_config("train", overrides))


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_options_accept_bools_and_torch_compile_keys() -> None:
    assert compile_options(None) is None and compile_options(False) is None
    assert compile_options(True) == {}
    assert compile_options({"mode": "max-autotune", "dynamic": False}) == {
        "mode": "max-autotune",
        "dynamic": False,
    }


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"backend": "eager", "modee": "x"}, r"unknown key\(s\) \['modee'\]"),
        ("yes", "compile must be true, false or a mapping.*got 'yes' \\(str\\)"),
        (1, "got 1 \\(int\\)"),
    ],
)
def test_bad_compile_values_name_what_is_wrong(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compile_options(value)


def test_compile_model_hands_torch_compile_the_mapping() -> None:
    class Recorder(torch.nn.Linear):
        def compile(self, **kwargs: object) -> None:  # type: ignore[override]
            self.kwargs = kwargs

    model = Recorder(2, 2)
    value = {"backend": "inductor", "options": {"max_autotune": True}}
    assert compile_model(model, value) is True
    assert model.kwargs == {"backend": "inductor", "options": {"max_autotune": True}}
    assert compile_model(model, False) is False


def test_compiled_model_keeps_its_state_dict_keys() -> None:
    model = build_lm(TINY_LM, vocab_size=11)
    keys = list(model.state_dict())
    assert compile_model(model, {"backend": "aot_eager"}) is True
    model(torch.randint(0, 11, (2, 8)))
    assert list(model.state_dict()) == keys


def test_compiled_lm_run_equals_eager_and_its_checkpoint_resumes_eagerly(tmp_path: Path) -> None:
    eager = run_from_overrides([*LM, "trainer.max_steps=4", f"output_dir={tmp_path / 'eager'}"])
    comp = run_from_overrides(
        [*LM, "trainer.max_steps=4", AOT, f"output_dir={tmp_path / 'compiled'}"]
    )
    assert comp["global_step"] == eager["global_step"] == 4
    assert comp["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-5)
    assert comp["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-5)
    assert comp["sample"] == eager["sample"]  # generation runs eagerly (same seed, same weights)
    a = torch.load(eager["last_ckpt"], weights_only=False)["state_dict"]
    b = torch.load(comp["last_ckpt"], weights_only=False)["state_dict"]
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    # a compiled run's checkpoint resumes without compile (and the other way round)
    ckpt = tmp_path / "compiled.ckpt"
    shutil.copy(comp["last_ckpt"], ckpt)
    more = run_from_overrides(
        [*LM, "trainer.max_steps=6", f"resume={ckpt}", f"output_dir={tmp_path / 'resumed'}"]
    )
    assert more["global_step"] == 6


def test_compiled_rec_run_equals_eager(tmp_path: Path) -> None:
    small = [
        "data.source_kwargs.n=3000",
        "data.source_kwargs.n_users=100",
        "data.source_kwargs.n_items=50",
        "data.batch_size=512",
        "model.num_experts=2",
        "model.expert_hidden=[16]",
        "model.tower_hidden=[8]",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "num_threads=1",
    ]
    eager = train(compose_config("train", [*small, f"output_dir={tmp_path / 'e'}"]))
    comp = train(compose_config("train", [*small, AOT, f"output_dir={tmp_path / 'c'}"]))
    for key, value in eager["test"].items():
        assert comp["test"][key] == pytest.approx(value, abs=1e-5), key


def test_compiled_census_mmoe_does_not_keep_recompiling(tmp_path: Path, census_path: Path) -> None:
    """Several embedding tables, folded and gathered: a frame specialised per table or per
    fold-plan list length would recompile for every one of them and hit the limit."""
    overrides = [
        "experiment=census_mmoe",
        f"data.path={census_path}",
        "data.batch_size=1024",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "num_threads=1",
    ]
    eager = train(compose_config("train", [*overrides, f"output_dir={tmp_path / 'e'}"]))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=4):
        comp = train(compose_config("train", [*overrides, AOT, f"output_dir={tmp_path / 'c'}"]))
    for key, value in eager["test"].items():
        assert comp["test"][key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow
def test_inductor_compiled_moe_lm_trains_like_eager() -> None:
    """Inductor itself (C++ codegen) on an OLMoE-style and a Switch-style LM, 3 AdamW steps."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.fail("inductor needs a C++ compiler (g++) on PATH")
    for E, k, dispatch in ((8, 2, "DroplessDispatch"), (4, 1, "CapacityDispatch")):
        moe = {
            "_target_": "mtl.models.lm.MoEFFN",
            "num_experts": E,
            "gate": {"_target_": "mtl.moe.TopKGate", "_partial_": True, "k": k},
            "experts": {"_target_": "mtl.moe.SwiGLUExperts", "_partial_": True, "d_hidden": 16},
            "dispatch": {"_target_": f"mtl.moe.{dispatch}", "_partial_": True},
            "aux_loss_weights": {"load_balance": 0.01, "z_loss": 0.001},
        }
        cfg = {**TINY_LM, "d_model": 32, "n_layers": 2, "d_ff": 64, "max_seq_len": 16, "moe": moe}
        torch.manual_seed(0)
        eager = build_lm(cfg, vocab_size=17)
        compiled = build_lm(cfg, vocab_size=17)
        compiled.load_state_dict(eager.state_dict())
        compile_model(compiled, True)
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, compiled)]
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randint(0, 17, (4, 16), generator=gen)
            y = torch.randint(0, 17, (4, 16), generator=gen)
            losses = []
            for model, opt in zip((eager, compiled), opts, strict=True):
                out = model(x)
                loss = F.cross_entropy(out.logits.reshape(-1, 17), y.reshape(-1)) + out.aux_loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            assert losses[1] == pytest.approx(losses[0], abs=1e-4), moe
