"""Composing the project's Hydra configs from Python (no ``@hydra.main``, no chdir).

The CLI, ``mtl compare`` and the tests all build configs the same way:
``compose_config("train", ["experiment=census_home", "trainer.max_epochs=1"])``.
The config directory is the repository's ``conf/`` (next to the ``mtl`` package),
or ``$MTL_CONF_DIR``. Group choices (``model=``, ``data=``, ``trainer=``,
``experiment=``, ...) are checked against the files on disk first, so a typo gives a
:class:`ConfigError` listing the available names instead of a Hydra stack trace.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

GROUPS: tuple[str, ...] = (
    "model",
    "data",
    "trainer",
    "optim",
    "scheduler",
    "callbacks",
    "logger",
    "experiment",
)
"""Config groups whose choices are validated (one YAML file per choice)."""

_GROUP_OVERRIDE = re.compile(r"^(?:\+\+|\+|~)?(?P<group>[A-Za-z_]+)=(?P<value>.*)$")


class ConfigError(ValueError):
    """A config name or override that does not exist; the message lists the valid ones."""


def conf_dir() -> Path:
    """The config root: ``$MTL_CONF_DIR`` if set, else ``<repo>/conf`` next to the package.

    Example:
        >>> conf_dir().name
        'conf'
    """
    env = os.environ.get("MTL_CONF_DIR")
    # Located from this file rather than ``mtl.__file__``: under some editable installs
    # ``mtl`` resolves as a namespace package whose ``__file__`` is None.
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "conf"
    if not path.is_dir():
        raise ConfigError(
            f"config directory not found: {path} (set MTL_CONF_DIR to the repository's conf/)"
        )
    return path.resolve()


def available(group: str, root: Path | None = None) -> list[str]:
    """Sorted choice names of config ``group`` (YAML files in ``conf/<group>/``).

    Files whose name starts with ``_`` hold settings other choices include
    (``experiment/_lm.yaml``) and are not choices themselves.

    Example:
        >>> "mmoe" in available("model")
        True
    """
    folder = (root or conf_dir()) / group
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def check_choice(group: str, name: str, root: Path | None = None) -> None:
    """Raise :class:`ConfigError` unless ``conf/<group>/<name>.yaml`` exists."""
    names = available(group, root)
    if name not in names:
        raise ConfigError(
            f"unknown {group} {name!r}; available {group} configs: {', '.join(names) or '(none)'}"
        )


def check_overrides(overrides: Sequence[str], root: Path | None = None) -> None:
    """Validate the group choices among Hydra ``overrides`` (``model=home``...)."""
    for item in overrides:
        match = _GROUP_OVERRIDE.match(item)
        if match is None or match["group"] not in GROUPS:
            continue
        value = match["value"].strip()
        if item.startswith("~") or value in ("", "null"):
            continue
        check_choice(match["group"], value, root)


def compose_config(
    config_name: str, overrides: Sequence[str] = (), *, resolve: bool = True
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra ``overrides``.

    Args:
        config_name: primary config (``"train"`` or ``"compare"``).
        overrides: Hydra override strings, e.g. ``["model=home", "trainer.max_epochs=2"]``.
        resolve: resolve interpolations now, so that ``${now:...}`` in ``output_dir``
            is fixed once for the whole run.

    Returns:
        The composed config (not read-only, not struct), with ``model_name``, the
        ``model`` group choice (``"home"`` for ``experiment=census_home``).

    Raises:
        ConfigError: unknown group choice, unknown key, or a malformed override.

    Example:
        >>> cfg = compose_config("train", ["model=mmoe", "trainer.max_epochs=1"])
        >>> cfg.model_name, cfg.model._target_, cfg.trainer.max_epochs
        ('mmoe', 'mtl.models.rec.MMoE', 1)
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    root = conf_dir()
    overrides = [str(o) for o in overrides]
    check_overrides(overrides, root)
    from mtl.training.gate_config import gate_overrides, name_with_gate

    overrides = gate_overrides(overrides, root)  # model.gate=top_k selects conf/gate/top_k.yaml
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(root), job_name="mtl"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        # Hydra's messages are good but arrive wrapped in a long traceback; keep the text.
        message = str(exc).strip().replace("\n\n", "\n")
        raise ConfigError(f"could not compose config {config_name!r}: {message}") from None
    OmegaConf.set_struct(cfg, False)
    # The model's name is its config file's: read it from Hydra's record of the choices,
    # then drop Hydra's own settings (a run has no use for them). An experiment that builds
    # its model from a checkpoint (no model file, e.g. lm_lora) lends its own name.
    choices = cfg.hydra.runtime.choices
    cfg.model_name = str(choices.get("model") or choices.get("experiment"))
    name_with_gate(cfg, overrides)
    del cfg["hydra"]
    if resolve:
        missing = unset_keys(cfg)
        if missing:
            examples = " ".join(f"{k}={_MISSING_EXAMPLES.get(k, '<value>')}" for k in missing)
            raise ConfigError(
                f"config {config_name!r} needs {', '.join(missing)} (marked ???), e.g. {examples}"
            )
        try:
            OmegaConf.resolve(cfg)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"could not resolve config {config_name!r}: {exc}") from None
    return cfg


_MISSING_EXAMPLES: dict[str, str] = {"model.checkpoint": "runs/x/checkpoints/last.ckpt"}
"""Example values shown for required keys the user has not set."""


def unset_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Dotted keys whose value is the literal ``???``, sorted.

    Nodes are read without resolving: a key that only interpolates a missing one
    (``checkpoint: ${model.checkpoint}``) is not listed, so the message names the
    key to set once (``OmegaConf.missing_keys`` instead raises on such a key).

    Example:
        >>> unset_keys(OmegaConf.create({"model": {"checkpoint": "???", "c": "${model.checkpoint}"}}))
        ['model.checkpoint']
    """
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else cfg.keys()
    out: list[str] = []
    for key in keys:
        node = cfg._get_node(key)
        name = f"{prefix}{key}" if isinstance(cfg, DictConfig) else f"{prefix.rstrip('.')}[{key}]"
        if node is None or node._is_interpolation():
            continue
        if node._is_missing():
            out.append(name)
        elif isinstance(node, DictConfig | ListConfig):
            out.extend(unset_keys(node, f"{name}."))
    return sorted(out)


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML text (for ``--print-config`` and the run directory)."""
    return OmegaConf.to_yaml(cfg)


def resume_checkpoint_path(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """The checkpoint ``cfg.resume`` names: None, ``last`` (``ckpt_dir/last.ckpt``) or a path.

    Raises:
        FileNotFoundError: the named checkpoint does not exist.
    """
    resume = cfg.get("resume")
    if resume in (None, "", "null"):
        return None
    path = ckpt_dir / "last.ckpt" if str(resume) == "last" else Path(str(resume)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    return str(path)
