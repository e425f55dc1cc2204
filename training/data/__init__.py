"""In-memory image datasets, augmentation and batching for training.

Loaders for fashion-mnist, cifar10, svhn and image-folder register themselves on import of this
package; :func:`load_dataset` returns an :class:`ImageDataset` of uint8 images.
"""

from training.data import cifar10, fashion_mnist, image_folder, svhn  # noqa: F401  (registers loaders)
from training.data.augment import augment_batch, random_crop, random_hflip
from training.data.dataset import ClassIndex, DatasetFormatError, DatasetNotFoundError, ImageDataset
from training.data.idx import read_idx
from training.data.loader import BatchLoader
from training.data.registry import DatasetInfo, dataset_info, list_datasets, load_dataset, register_dataset
from training.data.samplers import SPC2Sampler, sample_class_images

__all__ = [
    "BatchLoader",
    "ClassIndex",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataset",
    "SPC2Sampler",
    "augment_batch",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "random_crop",
    "random_hflip",
    "read_idx",
    "register_dataset",
    "sample_class_images",
]
