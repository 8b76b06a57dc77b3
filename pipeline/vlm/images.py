"""Image references and safe, lazy image loading for the teacher dump.

Every image of a sample becomes an `ImageSpec`: the reference the cache's sample
table stores (`path:<posix path relative to image_root>` or `sha256:<hex of the
encoded bytes>`) plus a `load()` that opens and fully decodes it only when called.

    spec = path_image("train/0001.jpg", image_root="/data/coco")
    spec.ref            # "path:train/0001.jpg"
    img = spec.load()   # RGB PIL image, or ImageError naming the file

Path images are refused at load time when they resolve outside `image_root`
(`..`, absolute paths, symlinks leading out) or when no root was given.
`Image.MAX_IMAGE_PIXELS` is left at PIL's default (decompression-bomb guard).
`load` callables are `functools.partial`s of module functions, so specs pickle.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Callable

from PIL import Image

from schemas import image_file, parse_image_ref, sha256_ref
from pipeline.store.backend import is_url, open_storage
from schemas import path_ref as format_path_ref


class ImageError(ValueError):
    """An image cannot be used: missing, undecodable, outside the image root, ..."""


@dataclass
class ImageSpec:
    """One image of a sample: its cache reference and a lazy loader."""

    ref: str
    load: Callable[[], Image.Image]


def _decode(source, name: str) -> Image.Image:
    """Open `source` (a path or a file object), decode every pixel, return RGB."""
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image file not found: {name}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {name} is too large to decode safely: {exc}") from None
    except Exception as exc:  # PIL raises many types on corrupt data
        raise ImageError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from None


def resolve_under(image_root: str | os.PathLike | None, rel: str) -> Path:
    """Return the real path of `rel` under `image_root`; ImageError if it escapes the root."""
    if image_root is None:
        raise ImageError(f"image {rel!r} is a file path but no image root was given: "
                         "pass --image-root")
    root = Path(image_root).resolve()
    target = (root / rel).resolve()  # follows symlinks; an absolute `rel` replaces the root
    if not target.is_relative_to(root):
        raise ImageError(f"image {rel!r} resolves to {target}, outside the image root {root}: "
                         "refused")
    return target


def _load_path(image_root: str | None, rel: str) -> Image.Image:
    target = resolve_under(image_root, rel)
    if not target.is_file():
        raise ImageError(f"image file not found: {target} (reference {rel!r})")
    return _decode(target, str(target))


def _load_bytes(data: bytes, name: str) -> Image.Image:
    return _decode(io.BytesIO(data), name)


def _load_pil(img: Image.Image) -> Image.Image:
    try:
        img.load()
        return img.convert("RGB")
    except Exception as exc:
        raise ImageError(f"cannot decode in-memory image: {type(exc).__name__}: {exc}") from None


def path_ref(path: str, image_root: str | None) -> str:
    """`path:<posix path relative to image_root>`; absolute paths lexically under the root
    are made relative, anything else is kept as written (load refuses what escapes)."""
    posix = PurePosixPath(path.replace(os.sep, "/"))
    if posix.is_absolute() and image_root is not None:
        root = PurePosixPath(os.path.abspath(image_root).replace(os.sep, "/"))
        if posix.is_relative_to(root):
            posix = posix.relative_to(root)
    return format_path_ref(posix.as_posix())


def path_image(path: str, image_root: str | None) -> ImageSpec:
    """An image given as a file path (relative to `image_root`)."""
    ref = path_ref(path, image_root)
    return ImageSpec(ref, partial(_load_path, image_root, parse_image_ref(ref)[1]))


def bytes_image(data: bytes, name: str | None = None) -> ImageSpec:
    """An image given as encoded bytes (PNG, JPEG, ...); `name` is used in error messages."""
    ref = sha256_ref(hashlib.sha256(data).hexdigest())
    label = f"{name} ({ref[:19]}...)" if name else f"in-memory image {ref}"
    return ImageSpec(ref, partial(_load_bytes, bytes(data), label))


def pil_image(img: Image.Image) -> ImageSpec:
    """An image given as a PIL image; its reference hashes its PNG encoding."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    ref = sha256_ref(hashlib.sha256(buf.getvalue()).hexdigest())
    return ImageSpec(ref, partial(_load_pil, img))



def cached_image_path(cache_dir: str | os.PathLike, ref: str) -> Path:
    """Where a `sha256:` image lives in a cache: images/<2 hex>/<64 hex>.png."""
    kind, digest = _parse(ref)
    if kind != "sha256":
        raise ImageError(f"image reference {ref!r} is not stored in the cache (not a sha256: reference)")
    return Path(cache_dir) / image_file(digest)


def store_image(cache_dir: str | os.PathLike, ref: str, image: Image.Image) -> None:
    """Keep the pixels of an in-memory image in the cache (PNG, lossless), so a student run
    that has no access to the original data set can still open it. Atomic and idempotent.
    `cache_dir` may be an object-store URL (the PNG is then one conditional PUT)."""
    kind, digest = _parse(ref)
    if kind != "sha256":
        return
    if is_url(str(cache_dir)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        open_storage(str(cache_dir)).create_exclusive(image_file(digest), buf.getvalue())
        return
    path = cached_image_path(cache_dir, ref)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{os.urandom(3).hex()}.png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def open_image_ref(ref: str, cache_dir: str | os.PathLike | None, image_root: str | None) -> Image.Image:
    """Open an image reference from a cache's sample table: `path:` under image_root, `sha256:` from the cache."""
    kind, value = _parse(ref)
    if kind == "path":
        return _load_path(image_root, value)
    if cache_dir is None:
        raise ImageError(f"image {ref} is stored in a cache, but no cache folder was given")
    if is_url(str(cache_dir)):
        try:
            data = open_storage(str(cache_dir)).read_bytes(image_file(value))
        except FileNotFoundError as err:
            raise ImageError(f"image file not found: {err}") from None
        return _decode(io.BytesIO(data), f"{cache_dir}/{image_file(value)}")
    path = cached_image_path(cache_dir, ref)
    return _decode(path, str(path))


def _parse(ref: str) -> tuple[str, str]:
    try:
        return parse_image_ref(ref)
    except ValueError as err:
        raise ImageError(str(err)) from None
