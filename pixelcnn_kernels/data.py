"""Image data sets for training: embedded ones and the user's own.

Every loader returns an :class:`ImageDataset`: integer images as ``uint8``
tensors of shape (N, C, H, W) holding bins ``0..num_bins-1``, split into a
training and a held-out part, with optional class labels.

- ``"digits"``: scikit-learn's bundled 8×8 handwritten digits (1797 images,
  grey levels 0..16, so ``num_bins=17``, labels 0..9), shuffled with a seeded
  generator and split 1500 train / 297 held out.
- ``"photos"``: 32×32 RGB patches cut (non-overlapping) from the colour sample
  photographs that ship inside scikit-image (:data:`PHOTO_NAMES`: no download),
  ``num_bins=256``, no labels.
- a folder of PNG/JPEG files (read with Pillow; all the same size; greyscale if
  every file is greyscale, else RGB; ``num_bins=256``, 16-bit greyscale rescaled to it);
- an ``.npz`` file: key ``images``, an integer array (N, H, W), (N, H, W, C)
  (channels last, C in 1 or 3) or (N, C, H, W) (C in 1 or 3 and the last
  dimension not), values ``0..num_bins-1`` where ``num_bins`` is the file's
  ``num_bins`` entry if present, else 256; optional key ``labels``, integers
  (N,) in ``0..num_classes-1``.

``quantize`` maps bins to fewer bins (e.g. 256 colour levels to 8 for a quick
CPU run); every loader takes ``num_bins=`` to do it on load.
"""

from __future__ import annotations

import importlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DIGITS_TRAIN = 1500
DIGITS_BINS = 17  # load_digits holds grey levels 0..16
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_HELD_OUT = 0.1  # fraction held out from the photos and from the user's images


@dataclass
class ImageDataset:
    """Integer images (uint8, (N, C, H, W), bins 0..num_bins-1), a train/held-out split, optional labels."""

    name: str
    train: torch.Tensor
    held_out: torch.Tensor
    num_bins: int
    train_labels: torch.Tensor | None = None
    held_out_labels: torch.Tensor | None = None
    num_classes: int = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.train.shape[1:])

    def __str__(self) -> str:
        c, h, w = self.image_shape
        labels = f", {self.num_classes} classes" if self.num_classes else ""
        return f"{self.name}: {len(self.train)} train / {len(self.held_out)} held out, {c}×{h}×{w}, {self.num_bins} bins{labels}"


def quantize(images: torch.Tensor, from_bins: int, to_bins: int) -> torch.Tensor:
    """Maps integer images with bins 0..from_bins-1 onto 0..to_bins-1 (equal-width bins)."""
    if isinstance(to_bins, bool) or not isinstance(to_bins, int) or not 2 <= to_bins <= from_bins:
        raise ValueError(f"num_bins (--num-bins) must be between 2 and the data's {from_bins} bins, got {to_bins}")
    if to_bins == from_bins:
        return images
    return (images.to(torch.int64) * to_bins // from_bins).to(torch.uint8)


def _split(
    name: str, images: torch.Tensor, labels: torch.Tensor | None, num_bins: int, num_classes: int, n_train: int, seed: int
) -> ImageDataset:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, held_out = order[:n_train], order[n_train:]
    return ImageDataset(
        name,
        images[train].contiguous(),
        images[held_out].contiguous(),
        num_bins,
        None if labels is None else labels[train],
        None if labels is None else labels[held_out],
        num_classes,
    )


def _held_out_split(n: int, held_out: float) -> int:
    """Number of training images when ``held_out`` of ``n`` are held out (at least one each)."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    if n < 2:
        raise ValueError(f"need at least 2 images to hold some out, got {n}")
    return min(n - 1, max(1, round(n * (1.0 - held_out))))


def _optional_import(module: str, package: str):
    """Imports a data-loading dependency, or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{package} is needed to load this data: pip install 'pixelcnn-kernels[data]' (or pip install {package})") from exc


def load_digits(*, num_bins: int = DIGITS_BINS, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8×8 digits: 1500 train / 297 held out after a seeded shuffle, labels 0..9."""
    bunch = _optional_import("sklearn.datasets", "scikit-learn").load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    images = quantize(images, DIGITS_BINS, num_bins)
    return _split("digits", images, labels, num_bins, 10, DIGITS_TRAIN, seed)


def load_photos(*, patch_size: int = 32, num_bins: int = 256, held_out: float = DEFAULT_HELD_OUT, seed: int = 0) -> ImageDataset:
    """Non-overlapping RGB patches of the colour photographs bundled with scikit-image."""
    skimage_data = _optional_import("skimage.data", "scikit-image")
    patches = []
    for name in PHOTO_NAMES:
        photo = torch.from_numpy(np.ascontiguousarray(getattr(skimage_data, name)()[..., :3]))  # (H, W, 3) uint8
        rows, cols = photo.shape[0] // patch_size, photo.shape[1] // patch_size
        tiles = photo[: rows * patch_size, : cols * patch_size].reshape(rows, patch_size, cols, patch_size, 3)
        patches.append(tiles.permute(0, 2, 4, 1, 3).reshape(rows * cols, 3, patch_size, patch_size))
    images = quantize(torch.cat(patches), 256, num_bins)
    return _split("photos", images, None, num_bins, 0, _held_out_split(len(images), held_out), seed)


def _read_folder(folder: Path) -> tuple[torch.Tensor, None, int]:
    Image = _optional_import("PIL.Image", "pillow")

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
    arrays = [_read_image(Image, file) for file in files]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"{folder}: images must all have one size, found sizes {sorted(sizes)}")
    if all(a.ndim == 2 for a in arrays):
        return torch.from_numpy(np.stack(arrays)).unsqueeze(1).contiguous(), None, 256
    rgb = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]  # grey among colour: R = G = B
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).contiguous(), None, 256


GREY_MODES = ("L", "1")
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I")  # 16-bit PNGs open as one of these


def _read_image(Image, file: Path) -> np.ndarray:
    """One image file, read and closed: uint8 (H, W) for grey, (H, W, 3) RGB otherwise.

    16-bit grey is rescaled to 8 bits (v · 255 / 65535, rounded): converting it to "L", as
    PIL would, clips every value above 255.
    """
    try:
        with Image.open(file) as image:
            if image.mode in SIXTEEN_BIT_GREY_MODES:
                values = np.asarray(image).astype(np.int64)
                if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
                    raise ValueError(f"{file}: a {image.mode} image with values outside 0..65535")
                return ((values * 255 + 32767) // 65535).astype(np.uint8)
            return np.asarray(image.convert("L" if image.mode in GREY_MODES else "RGB"))
    except OSError as exc:  # PIL's UnidentifiedImageError: a PNG/JPEG name on something else
        raise ValueError(f"{file}: not a readable image ({exc})") from exc


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    files = None  # one .npy array under an .npz name has no named arrays
    try:
        archive = np.load(path, allow_pickle=False)
        if isinstance(archive, np.lib.npyio.NpzFile):
            with archive:
                files = sorted(archive.files)
                if "images" in files:
                    array = archive["images"]
                    labels = archive["labels"] if "labels" in archive else None
                    num_bins = archive["num_bins"] if "num_bins" in archive else np.array(256)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:  # empty, truncated, not a .npz
        raise ValueError(f"{path}: not a readable .npz file of arrays ({exc or type(exc).__name__})") from exc
    except ValueError as exc:  # arrays of pickled objects
        raise ValueError(f"{path}: not a readable .npz file of arrays ({exc})") from exc
    if files is None or "images" not in files:
        found = "one unnamed array" if files is None else f"arrays {files}"
        raise ValueError(f"{path}: an .npz data set needs an 'images' array, found {found}")
    if num_bins.ndim != 0 or not np.issubdtype(num_bins.dtype, np.integer):
        raise ValueError(f"{path}: 'num_bins' must be one integer, got {num_bins.dtype} of shape {num_bins.shape}")
    num_bins = int(num_bins)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{path}: 'images' must hold integer bins, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif not (array.ndim == 4 and array.shape[1] in (1, 3)):
        raise ValueError(f"{path}: 'images' must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3, got shape {array.shape}")
    if 0 in array.shape[2:]:
        raise ValueError(f"{path}: 'images' must have a height and width >= 1, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= num_bins):
        raise ValueError(f"{path}: 'images' values must lie in 0..{num_bins - 1}, got {array.min()}..{array.max()}")
    if not 2 <= num_bins <= 256:
        raise ValueError(f"{path}: num_bins must be between 2 and 256, got {num_bins}")
    images = torch.from_numpy(np.ascontiguousarray(array).astype(np.uint8))
    if labels is not None:
        if labels.shape != (len(array),) or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
            raise ValueError(f"{path}: 'labels' must be non-negative integers of shape ({len(array)},), got {labels.dtype} {labels.shape}")
        labels = torch.from_numpy(labels.astype(np.int64))
    return images, labels, num_bins


def load_images(path: str | Path, *, num_bins: int | None = None, held_out: float = DEFAULT_HELD_OUT, seed: int = 0) -> ImageDataset:
    """The user's images: a folder of PNG/JPEG files or an ``.npz`` file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        images, labels, data_bins = _read_folder(path)
    elif path.suffix.lower() == ".npz" and path.is_file():
        images, labels, data_bins = _read_npz(path)
    elif not path.exists():
        raise ValueError(f"data must be 'digits', 'photos', a folder of PNG/JPEG images or an .npz file; {path} does not exist")
    else:
        raise ValueError(f"data must be 'digits', 'photos', a folder of PNG/JPEG images or an .npz file; {path} is none of them")
    bins = data_bins if num_bins is None else num_bins
    images = quantize(images, data_bins, bins)
    num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    return _split(path.name, images, labels, bins, num_classes, _held_out_split(len(images), held_out), seed)


def save_image_grid(images: torch.Tensor, num_bins: int, path: str | Path, columns: int = 8, scale: int = 4) -> Path:
    """Saves integer images (N, C, H, W) of bins 0..num_bins-1 as one PNG grid (``scale``× nearest upsampling)."""
    Image = _optional_import("PIL.Image", "pillow")

    n, channels, height, width = images.shape
    rows = -(-n // columns)
    pixels = (images.to(torch.float64) * (255.0 / (num_bins - 1))).round().to(torch.uint8)
    grid = torch.full((channels, rows * (height + 1) + 1, columns * (width + 1) + 1), 255, dtype=torch.uint8)
    for k in range(n):
        top, left = 1 + (k // columns) * (height + 1), 1 + (k % columns) * (width + 1)
        grid[:, top : top + height, left : left + width] = pixels[k]
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = grid[0].numpy() if channels == 1 else grid.permute(1, 2, 0).contiguous().numpy()
    path = Path(path)
    Image.fromarray(array).save(path)
    return path


def load_dataset(spec: str, *, num_bins: int | None = None, seed: int = 0) -> ImageDataset:
    """``"digits"``, ``"photos"`` or a path (folder or .npz); ``num_bins`` quantises (default: the data's own)."""
    if spec == "digits":
        return load_digits(num_bins=DIGITS_BINS if num_bins is None else num_bins, seed=seed)
    if spec == "photos":
        return load_photos(num_bins=256 if num_bins is None else num_bins, seed=seed)
    return load_images(spec, num_bins=num_bins, seed=seed)
