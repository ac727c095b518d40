"""Messages of the LM data path that name the setting to change, and refusals of uneven batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl.data.domain_text import DomainBlockLoader, DomainTextDataModule
from mtl.data.text import TextDataModule
from mtl.data.tokenizers import CharTokenizer


def test_block_size_error_says_split_once(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("abcdefgh" * 10)
    dm = TextDataModule(path=str(tmp_path / "t.txt"), block_size=40, val_fraction=0.1)
    with pytest.raises(ValueError, match="block_size=40 is too large") as info:
        dm.setup("fit")
    assert str(info.value).count("split") == 2  # "the val split of ...", "the split has"
    assert "split of" in str(info.value) and " split:" not in str(info.value)


@pytest.mark.parametrize("split", ["train split", "val split"])
def test_loader_block_size_error_says_split_once(split: str) -> None:
    from mtl.data.text_loaders import check_block_size

    with pytest.raises(ValueError) as info:
        check_block_size(torch.arange(5), 8, split)
    assert f"the {split}:" in str(info.value) and "split split" not in str(info.value)


def test_char_unknown_character_hint_names_the_config_key() -> None:
    with pytest.raises(ValueError) as info:
        CharTokenizer.fit("abc").encode("abz")
    msg = str(info.value)
    assert "data.tokenizer_kwargs.unk_token" in msg
    assert "at generate time the checkpoint's vocabulary is fixed" in msg
    assert "\n" not in msg


def _tokens(n_domains: int) -> list[torch.Tensor]:
    return [torch.arange(1000 * d, 1000 * d + 40) for d in range(n_domains)]


@pytest.mark.parametrize(
    ("batch", "world", "domains"), [(3, 1, 2), (5, 1, 3), (3, 2, 4), (1, 1, 2)]
)
def test_domain_loader_refuses_unequal_shares(batch: int, world: int, domains: int) -> None:
    with pytest.raises(ValueError, match=rf"data.batch_size={batch} .* the {domains} domains"):
        DomainBlockLoader(
            tokens=_tokens(domains), block_size=4, batch_size=batch, steps=1, world_size=world
        )


@pytest.mark.parametrize(("batch", "world", "domains"), [(4, 1, 2), (3, 2, 2), (2, 3, 3)])
def test_domain_loader_gives_every_domain_the_same_share(
    batch: int, world: int, domains: int
) -> None:
    ranks = [
        next(
            iter(
                DomainBlockLoader(
                    tokens=_tokens(domains),
                    block_size=4,
                    batch_size=batch,
                    steps=1,
                    rank=r,
                    world_size=world,
                )
            )
        )
        for r in range(world)
    ]
    domains_G = torch.cat([b.domains for b in ranks])
    # counted from the rows' token values (domain d holds 1000*d ..), not from the loader's ids
    from_values = torch.cat([b.inputs[:, 0] // 1000 for b in ranks])
    assert torch.equal(domains_G, from_values)
    assert (
        torch.bincount(from_values, minlength=domains).tolist()
        == [world * batch // domains] * domains
    )


def test_domain_datamodule_refuses_a_batch_size_off_the_domain_count(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcab cabca " * 40)
    (tmp_path / "b.txt").write_text("xyzzy zyxxy " * 30)
    dm = DomainTextDataModule(
        paths=[tmp_path / "a.txt", tmp_path / "b.txt"], block_size=8, batch_size=3
    )
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"data.batch_size=3 .* the 2 domains"):
        dm.train_dataloader()
