"""Writers of tiny dataset files in each loader's real on-disk format."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_fashion_mnist(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> Path:
    """Random 28x28 images; labels cycle 0..9. Returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz)
    return root


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 4, seed: int = 0, bytes_keys: bool = True) -> Path:
    """``root/cifar-10-batches-py`` with five train batches, a test batch and the meta file; image 0
    of every batch is pure red. Returns the batch directory."""
    rng = np.random.default_rng(seed)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)

    def key(k: str) -> bytes | str:
        return k.encode() if bytes_keys else k

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        images[0] = 0
        images[0, 0] = 255
        batch = {
            key("batch_label"): key(name),
            key("labels"): [int(v) for v in rng.integers(0, 10, size=per_batch)],
            key("data"): images.reshape(per_batch, 3 * 32 * 32),
            key("filenames"): [key(f"img_{i}.png") for i in range(per_batch)],
        }
        with (directory / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {key("label_names"): [key(n) for n in CIFAR_NAMES], key("num_vis"): 3072}
    with (directory / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return directory


def write_svhn(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> Path:
    """``train_32x32.mat``/``test_32x32.mat`` with X [32, 32, 3, N] and y [N, 1] in 1..10; in image 0
    only pixel (row 0, column 1) of channel 0 is set (200). Returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[:, :, :, 0] = 0
        x[0, 1, 0, 0] = 200
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return root


FOLDER_COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}


def write_image_folder(root: Path, per_class: int = 3, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """``root/<split>/<class>/`` with solid-colour 10x12 images per class: PNGs plus one JPEG."""
    for split in splits:
        for name, colour in FOLDER_COLOURS.items():
            class_dir = root / split / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.new("RGB", (12, 10), colour)
                if i == per_class - 1:
                    img.save(class_dir / f"{i}.JPG", quality=95)
                else:
                    img.save(class_dir / f"{i}.png")
            (class_dir / "notes.txt").write_text("not an image")
    return root
