"""Repair generation configs that transformers' strict validation rejects.

vicuna-7b-v1.5 (and so every LLaVA-1.5 built from it) ships `temperature: 0.9, top_p: 0.6`
without `do_sample`. transformers warns at load that those flags are ignored, and refuses to
save such a config once anything in it changed ("GenerationConfig is invalid ... Fix these
issues to save the configuration"), so a fine-tuning run that sets e.g. `pad_token_id` crashes
at its very end, in `save_pretrained` (haotian-liu/LLaVA#1144, #1635).

The repair unsets exactly the flags the strict validation names (back to transformers'
defaults). Those flags were being ignored already (they only apply with `do_sample=True` or
`num_beams > 1`, which the config does not set), so generation behaves as before: vicuna's
config stays greedy. One warning names the file and every change; a config that is still
invalid afterwards is an error, not a silent save.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmjobs.logs import get_logger

log = get_logger(__name__)

_FLAG = re.compile(r"^- `(\w+)`:", re.MULTILINE)


class GenerationConfigError(ValueError):
    """A generation config is invalid in a way the repair does not cover."""


def repair_generation_config(config: Any, source: str) -> list[str]:
    """Unset the flags `config.validate(strict=True)` rejects; log one warning naming `source`.

    Args:
        config: a `transformers.GenerationConfig` (changed in place).
        source: where it came from (a file path), for the warning.

    Returns:
        The changes, e.g. `["temperature 0.9 -> None", "top_p 0.6 -> None"]`; empty if the
        config was valid.

    Raises:
        GenerationConfigError: still invalid after unsetting the named flags.
    """
    from transformers import GenerationConfig

    problem = _strict_problem(config)
    if problem is None:
        return []
    defaults = GenerationConfig()
    changes = []
    for flag in dict.fromkeys(_FLAG.findall(problem)):
        old, new = getattr(config, flag, None), getattr(defaults, flag, None)
        if old != new:
            setattr(config, flag, new)
            changes.append(f"{flag} {old!r} -> {new!r}")
    remaining = _strict_problem(config)
    if remaining is not None or not changes:
        raise GenerationConfigError(
            f"{source}: transformers rejects this generation config and mmjobs cannot repair "
            f"it by unsetting flags: {(remaining or problem).strip()}")
    log.warning("%s: transformers rejects this generation config (flags set that the generation "
                "mode ignores); repaired by unsetting them: %s. Generation is unchanged.",
                source, ", ".join(changes))
    return changes


def repair_generation_config_file(path: str | Path, *, source: str | None = None) -> list[str]:
    """Repair `path` (a `generation_config.json`) in place when transformers rejects it.

    `source` names the file in the warning when `path` is a copy of it (default `path`).
    Returns the changes (empty, and the file untouched, when it was valid).
    """
    from transformers import GenerationConfig

    path = Path(path)
    config = GenerationConfig.from_pretrained(path.parent, config_file_name=path.name)
    changes = repair_generation_config(config, source or str(path))
    if changes:
        config.save_pretrained(path.parent, config_file_name=path.name)
    return changes


def repair_model_generation_config(model: Any, source_dir: str | Path | None) -> list[str]:
    """`repair_generation_config` on `model.generation_config` (if it has one); the warning
    names `source_dir/generation_config.json`, or the model class when there is no source.

    For the load and export paths: a config the repair cannot fix is left as it is, with a
    warning (transformers may still refuse to save it), rather than failing a model load.
    """
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    source = (str(Path(source_dir) / "generation_config.json") if source_dir is not None
              else f"{type(model).__name__}.generation_config")
    try:
        return repair_generation_config(config, source)
    except GenerationConfigError as e:
        log.warning("%s", e)
        return []


def _strict_problem(config: Any) -> str | None:
    try:
        config.validate(strict=True)
    except ValueError as e:
        return str(e)
    return None
