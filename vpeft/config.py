"""OmegaConf resolvers the configs use (registered once, on import), and the check of a config group's keys."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import OmegaConf

from vpeft.errors import ConfigError
from vpeft.vtab import VPT_PROMPT_TOKENS


def check_keys(group: str, given: Mapping[str, Any], valid: Iterable[str]) -> None:
    """A key the group does not have is bad input, not a silent extra: name the closest valid key and them all.

    Hydra answers ``trainer.epoch=3`` with "to append to your config use +trainer.epoch=3"; taking that advice
    must end here, with ``did you mean trainer.epochs=3?``, not in an error from deep inside a run.
    """
    valid = sorted(set(valid))
    for key in given:
        if key in valid:
            continue
        close = difflib.get_close_matches(str(key), valid, n=1)
        value = given[key]
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        hint = f"; did you mean {group}.{close[0]}={shown}?" if close else ""
        raise ConfigError(f"unknown key {group}.{key}{hint} ({group} keys: {', '.join(valid)})")


def vpt_prompt_tokens(task: str, default: int = 10) -> int:
    """VPT's published prompt length for a VTAB-1k task; ``default`` for any other dataset."""
    return VPT_PROMPT_TOKENS.get(str(task), int(default))


if not OmegaConf.has_resolver("vpeft.vpt_tokens"):
    OmegaConf.register_new_resolver("vpeft.vpt_tokens", vpt_prompt_tokens)
if not OmegaConf.has_resolver("vpeft.pid"):  # hydra.run.dir and hydra.sweep.dir: cached, so every job of a sweep
    OmegaConf.register_new_resolver("vpeft.pid", os.getpid, use_cache=True)  # names its folder as the sweep did
