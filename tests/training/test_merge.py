"""``mtl merge``: weighted parameter averaging of checkpoints (LM-Cocktail)."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from mtl.cli import main
from mtl.data.text import TextDataModule
from mtl.data.tokenizers import build_tokenizer
from mtl.training.build import build_lm, load_module
from mtl.training.lm_module import LMModule
from mtl.training.merge import (
    check_weights,
    cocktail_weights,
    merge_checkpoints,
    merge_state_dicts,
)

DENSE = {
    "_target_": "mtl.models.lm.TransformerLM",
    "d_model": 16,
    "n_layers": 1,
    "n_heads": 2,
    "d_ff": 32,
    "max_seq_len": 16,
}
ALPHABET = "abcdefgh "


def _text(seed: int, letters: str) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 5))) for _ in range(30)]
    return " ".join(rng.choice(words) for _ in range(500))


def _checkpoint(tmp: Path, name: str, text: str, *, steps: int, seed: int, d_ff: int = 32) -> Path:
    """A tiny LM trained ``steps`` steps on ``text``; all share one character tokenizer."""
    (tmp / f"{name}.txt").write_text(text)
    tokenizer = build_tokenizer("char", ALPHABET)
    dm = TextDataModule(
        path=str(tmp / f"{name}.txt"), tokenizer=tokenizer, block_size=16, batch_size=8
    )
    torch.manual_seed(seed)
    config = {**DENSE, "d_ff": d_ff}
    net = build_lm(config, vocab_size=tokenizer.vocab_size)
    module = LMModule(
        net=net, tokenizer=tokenizer, net_config={**config, "vocab_size": tokenizer.vocab_size}
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    path = tmp / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``a``: trained on text of letters a-d; ``b``: one step on e-h; ``wide``: another d_ff."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("merge")
    out = {
        "a": _checkpoint(tmp, "a", _text(0, "abcd"), steps=60, seed=0),
        "b": _checkpoint(tmp, "b", _text(1, "efgh"), steps=1, seed=1),
        "wide": _checkpoint(tmp, "wide", _text(1, "efgh"), steps=1, seed=2, d_ff=48),
    }
    (tmp / "examples.txt").write_text("\n".join(_text(5, "abcd")[i : i + 15] for i in (0, 40, 80)))
    out["examples"] = tmp / "examples.txt"
    torch.set_num_threads(threads)
    return out


def _logits(path: Path, idx: torch.Tensor) -> torch.Tensor:
    module = load_module(path).eval()
    with torch.no_grad():
        return module(idx).logits


def test_merging_a_model_with_itself_is_the_identity(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    out = merge_checkpoints([ckpts["a"], ckpts["a"]], [0.3, 0.7], tmp_path / "m.ckpt")
    a = torch.load(ckpts["a"], weights_only=True)["state_dict"]
    m = torch.load(out, weights_only=True)["state_dict"]
    assert a.keys() == m.keys()
    for key in a:
        assert torch.equal(a[key], m[key]), key


def test_merged_checkpoint_is_the_weighted_average_and_reloads(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.ckpt"
    argv = ["merge", str(ckpts["a"]), str(ckpts["b"]), "--weights", "0.25", "0.75"]
    assert main([*argv, "--out", str(out)]) == 0
    # naive reference: a model whose every parameter is 0.25 a + 0.75 b
    a, b = load_module(ckpts["a"]).net, load_module(ckpts["b"]).net
    with torch.no_grad():
        for p_a, p_b in zip(a.parameters(), b.parameters(), strict=True):
            p_a.copy_(0.25 * p_a + 0.75 * p_b)
    idx = torch.randint(0, 9, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = a.eval()(idx).logits
    torch.testing.assert_close(_logits(out, idx), expected, atol=1e-6, rtol=1e-6)
    merged = torch.load(out, weights_only=True)
    assert "optimizer_states" not in merged and merged["merge"]["weights"] == [0.25, 0.75]
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("ab")


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (["0.5"], "one weight per checkpoint"),
        (["0.5", "0.6"], "must sum to 1"),
        (["1.5", "-0.5"], ">= 0"),
    ],
)
def test_bad_weights_are_one_error_line(
    ckpts: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    weights: list[str],
    message: str,
) -> None:
    argv = ["merge", str(ckpts["a"]), str(ckpts["b"]), "--weights", *weights]
    assert main([*argv, "--out", str(tmp_path / "m.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "m.ckpt").exists()


def test_weights_sum_to_one() -> None:
    assert check_weights([0.2, 0.3, 0.5], 3) == [0.2, 0.3, 0.5]
    w = cocktail_weights([0.7, 1.9, 3.2], temperature=0.5)
    assert math.isclose(sum(w), 1.0, abs_tol=1e-12)
    # the formula, written out: exp(-L_i / t) / sum_j exp(-L_j / t)
    z = [math.exp(-loss / 0.5) for loss in (0.7, 1.9, 3.2)]
    assert w == pytest.approx([v / sum(z) for v in z], rel=1e-12)


def test_different_architectures_are_refused_naming_the_config_key(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    a, wide = ckpts["a"], ckpts["wide"]
    with pytest.raises(ValueError, match=re.escape(f"d_ff: {a} 32, {wide} 48")):
        merge_checkpoints([a, wide], [0.5, 0.5], tmp_path / "m.ckpt")


def test_different_weight_shapes_are_refused_naming_the_parameter() -> None:
    a = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"'w' is \(3, 2\) torch.float32 there and \(2, 3\)"):
        merge_state_dicts([a, {**a, "w": torch.zeros(3, 2)}], [0.5, 0.5], ["a", "b"])
    with pytest.raises(ValueError, match="'b' is missing from y"):
        merge_state_dicts([a, {"w": a["w"]}], [0.5, 0.5], ["x", "y"])


def test_auto_weights_prefer_the_model_with_lower_loss_on_the_examples(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "auto.ckpt"
    argv = [
        "merge",
        str(ckpts["b"]),
        str(ckpts["a"]),
        "--auto",
        "--examples",
        str(ckpts["examples"]),
    ]
    assert main([*argv, "--temperature", "1.0", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    weights = torch.load(out, weights_only=True)["merge"]["weights"]
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-9)
    assert weights[1] > 0.6 > weights[0]  # a, trained on letters a-d, fits the examples
    # the losses it printed are each model's mean loss on the examples, computed naively
    lines_examples = [ln for ln in ckpts["examples"].read_text().splitlines() if ln.strip()]
    for path, line in zip((ckpts["b"], ckpts["a"]), lines[:2], strict=True):
        module = load_module(path).eval()
        total = count = 0.0
        with torch.no_grad():
            for text in lines_examples:
                ids = module.tokenizer.encode(text)
                loss = module(ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)).loss
                total += float(loss) * (len(ids) - 1)
                count += len(ids) - 1
        assert f"loss {total / count:.4f}" in line
    assert load_module(out).net is not None


def test_auto_needs_examples_and_excludes_weights(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "m.ckpt")
    assert main(["merge", str(ckpts["a"]), "--auto", "--out", out]) == 2
    assert "--examples" in capsys.readouterr().err
    assert main(["merge", str(ckpts["a"]), "--out", out]) == 2
    assert "either --weights" in capsys.readouterr().err
    missing = str(tmp_path / "none.txt")
    assert main(["merge", str(ckpts["a"]), "--auto", "--examples", missing, "--out", out]) == 2
    assert "none.txt" in capsys.readouterr().err


def _edited(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of checkpoint ``src`` at ``dst``, changed in place by ``edit``."""
    checkpoint = torch.load(src, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, dst)
    return dst


def _as_ranker(checkpoint: dict[str, Any]) -> None:
    checkpoint["hyper_parameters"]["net_config"] = {"_target_": "mtl.models.rec.ranker.Ranker"}
    checkpoint.pop("lm_tokenizer", None)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    return err


def test_out_that_is_an_input_is_refused_and_the_input_kept(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a.ckpt"
    a.write_bytes(ckpts["a"].read_bytes())
    before = a.read_bytes()
    # another spelling of the same file, and --force does not change it
    for out, extra in ((str(a), []), (f"{tmp_path}/../{tmp_path.name}/a.ckpt", ["--force"])):
        argv = ["merge", str(a), str(ckpts["b"]), "--weights", ".5", ".5", "--out", out]
        assert main([*argv, *extra]) == 2
        assert "one of the checkpoints to merge" in _error_line(capsys)
    assert a.read_bytes() == before


def test_existing_out_needs_force_and_is_replaced_whole(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.ckpt"
    out.write_bytes(b"previous")
    argv = ["merge", str(ckpts["a"]), str(ckpts["b"]), "--weights", ".5", ".5", "--out", str(out)]
    assert main(argv) == 2
    assert "exists; pass --force" in _error_line(capsys)
    assert out.read_bytes() == b"previous"
    assert main([*argv, "--force"]) == 0
    assert torch.load(out, weights_only=True)["merge"]["weights"] == [0.5, 0.5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]  # no temporary file left


def test_a_failed_save_leaves_the_previous_out_whole(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.ckpt"
    out.write_bytes(b"previous")

    def save_half_then_fail(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(ValueError, match=r"could not write --out .*No space left"):
        merge_checkpoints([ckpts["a"], ckpts["b"]], [0.5, 0.5], out, force=True)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]

    # torch.save reports a full disk from its zip writer as a RuntimeError
    def save_half_then_fail_in_torch(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64\nmore")

    monkeypatch.setattr(torch, "save", save_half_then_fail_in_torch)
    with pytest.raises(ValueError, match=r"could not write --out .*unexpected pos 64\)$"):
        merge_checkpoints([ckpts["a"], ckpts["b"]], [0.5, 0.5], out, force=True)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


def test_training_only_settings_do_not_stop_a_merge(ckpts: dict[str, Path], tmp_path: Path) -> None:
    # dropout and the longest input (from the run's block size) change no merged weight
    def trained_otherwise(checkpoint: dict[str, Any]) -> None:
        net = checkpoint["hyper_parameters"]["net_config"]
        net["dropout"] = 0.3
        net["max_seq_len"] = 2 * int(net.get("max_seq_len") or 64)

    other = _edited(ckpts["b"], tmp_path / "other.ckpt", trained_otherwise)
    out = merge_checkpoints([ckpts["a"], other], [0.5, 0.5], tmp_path / "m.ckpt")
    assert torch.load(out, weights_only=True)["merge"]["weights"] == [0.5, 0.5]


def test_same_shapes_with_another_model_config_are_refused(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    # n_heads changes no weight shape, only how the model computes
    def more_heads(checkpoint: dict[str, Any]) -> None:
        checkpoint["hyper_parameters"]["net_config"]["n_heads"] = 4

    a = ckpts["a"]
    other = _edited(ckpts["b"], tmp_path / "heads4.ckpt", more_heads)
    with pytest.raises(ValueError, match=re.escape(f"n_heads: {a} 2, {other} 4")):
        merge_checkpoints([a, other], [0.5, 0.5], tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()


def test_another_model_class_is_named_before_the_tokenizer(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    a = ckpts["a"]
    ranker = _edited(a, tmp_path / "r.ckpt", _as_ranker)
    with pytest.raises(ValueError, match=re.escape(f"{a} is a TransformerLM, {ranker} a Ranker")):
        merge_checkpoints([a, ranker], [0.5, 0.5], tmp_path / "m.ckpt")


def test_different_tokenizers_name_both_files(ckpts: dict[str, Path], tmp_path: Path) -> None:
    def other_tokenizer(checkpoint: dict[str, Any]) -> None:
        checkpoint["lm_tokenizer"]["fingerprint"] = "another"

    a = ckpts["a"]
    other = _edited(a, tmp_path / "tok.ckpt", other_tokenizer)
    with pytest.raises(ValueError, match=f"different tokenizers: {re.escape(f'{a} and {other}')}"):
        merge_checkpoints([a, other], [0.5, 0.5], tmp_path / "m.ckpt")


def test_auto_refuses_checkpoints_that_are_not_language_models(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ranker = str(_edited(ckpts["a"], tmp_path / "r.ckpt", _as_ranker))
    argv = ["merge", ranker, ranker, "--auto", "--examples", str(ckpts["examples"])]
    assert main([*argv, "--out", str(tmp_path / "m.ckpt")]) == 2
    err = _error_line(capsys)
    assert f"--auto needs language-model checkpoints; {ranker} is a Ranker" in err
