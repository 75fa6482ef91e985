"""Static facts about each dataset Titans knows: classes, shapes, normalization, splits.

`dataset_info(name)` never touches the data, so a trainer can build its model before the
data is prepared. `image_shape` is the shape of the images the pipelines hand out (for
imagenet2012 that is after resizing/cropping to 224x224, not the stored variable size).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, ...]  # (H, W, C) of the batches the loaders yield; text: (max tokens,)
    mean: tuple[float, ...]  # per channel, on the [0, 255] scale
    std: tuple[float, ...]
    splits: dict[str, int]  # split name -> number of examples
    augment: str  # 'none' | 'crop_flip' | 'imagenet'
    # "image": uint8 pixels, normalised with mean/std. "text": int32 token ids (0 = padding), of at most
    # `image_shape[0]` tokens, from a vocabulary of `vocab_size` ids; mean/std are empty and unused.
    modality: str = "image"
    vocab_size: int = 0


def _scaled(values):
    return tuple(round(v * 255.0, 4) for v in values)


# mean/std of digits and fashion_mnist were measured on their train splits (digits: the fixed
# 1437-example split); CIFAR and ImageNet use the customary published values.
_INFOS = {
    "digits": dict(
        num_classes=10,
        image_shape=(8, 8, 1),
        mean=(77.9014,),
        std=(95.8478,),
        splits={"train": 1437, "test": 360},
        augment="none",
    ),
    "fashion_mnist": dict(
        num_classes=10,
        image_shape=(28, 28, 1),
        mean=(72.9404,),
        std=(90.0212,),
        splits={"train": 60000, "test": 10000},
        augment="none",
    ),
    "cifar10": dict(
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=_scaled((0.4914, 0.4822, 0.4465)),
        std=_scaled((0.2470, 0.2435, 0.2616)),
        splits={"train": 50000, "test": 10000},
        augment="crop_flip",
    ),
    "cifar100": dict(
        num_classes=100,
        image_shape=(32, 32, 3),
        mean=_scaled((0.5071, 0.4865, 0.4409)),
        std=_scaled((0.2673, 0.2564, 0.2762)),
        splits={"train": 50000, "test": 10000},
        augment="crop_flip",
    ),
    # Google Speech Commands v0.02, 12 classes, as uint8 log-mel spectrograms (titans/data/speech.py).
    # mean/std: a rough guess on the 0..255 feature scale, not measured on the train split.
    # Split sizes: TFDS's speech_commands (Titans' own builder cuts its silence differently).
    "speech_commands": dict(
        num_classes=12,
        image_shape=(49, 40, 1),
        mean=(110.0,),
        std=(45.0,),
        splits={"train": 85511, "validation": 10102, "test": 4890},
        augment="none",
    ),
    "imagenet2012": dict(
        num_classes=1000,
        image_shape=(224, 224, 3),
        mean=_scaled((0.485, 0.456, 0.406)),
        std=_scaled((0.229, 0.224, 0.225)),
        splits={"train": 1281167, "validation": 50000},
        augment="imagenet",
    ),
    # WordNet 3.0 synsets ("lemmas : gloss") -> their 45 lexicographer files (titans/data/text.py): int32
    # WordPiece ids, at most 128 a text; the split sizes are those of text.split_of's synset-id hash.
    "wordnet": dict(
        num_classes=45,
        image_shape=(128,),
        mean=(),
        std=(),
        splits={"train": 94080, "validation": 11819, "test": 11760},
        augment="none",
        modality="text",
        vocab_size=8192,
    ),
}

DATASETS = tuple(_INFOS)


def dataset_info(name: str) -> DatasetInfo:
    """Returns the static `DatasetInfo` of `name` (one of `DATASETS`)."""
    try:
        fields = _INFOS[name]
    except KeyError:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
    return DatasetInfo(name=name, **{**fields, "splits": dict(fields["splits"])})
