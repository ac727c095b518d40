"""``mtl generate CKPT_OR_DIR --prompt TEXT``: sample text from a trained LM or a transformers checkpoint.

``CKPT_OR_DIR`` is either a Lightning checkpoint of an mtl language-model run
(its tokenizer is stored in it; a run folder stands for its ``checkpoints/last.ckpt``)
or a transformers checkpoint directory of a
supported architecture (:mod:`mtl.models.lm.hf`), whose tokenizer is the
directory's ``tokenizer.json`` (read with the ``tokenizers`` package) or, when
there is none, bytes (ids 0-255, for models with at least 256 tokens).
User errors raise ValueError / FileNotFoundError, which ``mtl`` prints as one
``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtl.models.lm.generate import generate


class DirectoryTokenizer:
    """Text <-> ids for a transformers directory: its ``tokenizer.json``, else bytes.

    Args:
        directory: the checkpoint directory.
        vocab_size: the model's vocabulary (ids must fit in it).

    Example:
        >>> import tempfile
        >>> tok = DirectoryTokenizer(Path(tempfile.mkdtemp()), vocab_size=300)  # no tokenizer.json
        >>> tok.encode("hé").tolist(), tok.decode(tok.encode("hé"))
        ([104, 195, 169], 'hé')
    """

    def __init__(self, directory: Path, *, vocab_size: int) -> None:
        path = directory / "tokenizer.json"
        self._hf: Any = None
        if path.is_file():
            try:
                import tokenizers
            except ImportError as err:  # the [hf] extra installs it
                raise ValueError(
                    f"{path} needs the 'tokenizers' package: pip install tokenizers"
                ) from err
            self._hf = tokenizers.Tokenizer.from_file(str(path))
        elif vocab_size < 256:
            raise ValueError(
                f"{directory} has no tokenizer.json and its vocabulary ({vocab_size}) is too small for bytes"
            )
        self.vocab_size = vocab_size

    def encode(self, text: str) -> Tensor:
        ids = self._hf.encode(text).ids if self._hf is not None else list(text.encode("utf-8"))
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"the tokenizer gives id {bad[0]}, outside the model's vocabulary {self.vocab_size}"
            )
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        if self._hf is not None:
            return str(self._hf.decode(ids.tolist(), skip_special_tokens=False))
        return bytes(i for i in ids.tolist() if i < 256).decode("utf-8", errors="replace")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtl generate",
        description="Sample a continuation of a prompt from an mtl LM checkpoint or a transformers directory.",
    )
    p.add_argument(
        "path",
        help="a Lightning checkpoint (.ckpt) of an LM run, or a transformers checkpoint directory",
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the k most likely tokens only"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the sampler (reproducible output)"
    )
    return p


def generate_text(
    path: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """Prompt + sampled continuation from a checkpoint file or a transformers directory.

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a folder that is neither
            a run folder (``checkpoints/last.ckpt``) nor a transformers directory.
        ValueError: ``path`` is not an LM checkpoint, or has no usable tokenizer.

    Example:
        >>> generate_text("runs/lm/checkpoints/last.ckpt", "ROMEO:", temperature=0)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (expected an LM checkpoint or a transformers directory)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        run_checkpoint = path / "checkpoints" / "last.ckpt"
        if not run_checkpoint.is_file():
            raise FileNotFoundError(
                f"{path} has neither config.json nor checkpoints/last.ckpt: expected an LM "
                "checkpoint file, a run folder of `mtl train`, or a transformers checkpoint directory"
            )
        print(f"{path} is a run folder: generating from {run_checkpoint}", file=sys.stderr)
        path = run_checkpoint
    if path.is_dir():
        from mtl.models.lm.hf import load_hf_checkpoint

        lm = load_hf_checkpoint(path)
        tok = DirectoryTokenizer(path, vocab_size=lm.vocab_size)
        ids = tok.encode(prompt)
        if ids.numel() == 0:
            raise ValueError("the prompt encodes to no token: give a non-empty --prompt")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        out = generate(
            lm,
            ids.view(1, -1),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=gen,
        )
        return tok.decode(out[0])
    from mtl.training.build import load_module
    from mtl.training.lm_module import LMModule

    module = load_module(path)
    if not isinstance(module, LMModule):
        raise ValueError(
            f"{path} is a checkpoint of a {type(module.net).__name__}, not of a language model"
        )
    if module.tokenizer is None:
        raise ValueError(f"{path} holds no tokenizer: cannot turn the prompt into token ids")
    return module.generate(prompt, max_new_tokens, temperature, top_k, seed=seed)


def main(argv: Sequence[str]) -> int:
    """The ``mtl generate`` sub-command; prints the prompt and its continuation."""
    args = _parser().parse_args(list(argv))
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    print(
        generate_text(
            args.path,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    )
    return 0
