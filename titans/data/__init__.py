"""Titans data layer: TFDS ArrayRecord sources, grain-ordered loaders, augmentation.

    info = dataset_info(name)
    src = get_source(name, split, data_dir=None)        # len(src), src[i], src.__getitems__(idx)
    src = load_in_memory(src)                           # optional, for small datasets
    loader = TrainLoader(src, info, global_batch_size=..., seed=..., process_index=...,
                         process_count=..., augment=True)
    batch = next(loader); state = loader.get_state(); loader.set_state(state)
    for batch in eval_batches(src, info, global_batch_size=..., ...): ...
    x = normalize(batch['image'], info)                 # on device, inside jit
    tokenizer, sha256 = tokenizer_for(data_dir)         # text (wordnet): the dataset's tokenizer

Pipelines ship uint8 images, or for text (`info.modality == "text"`) int32 token ids cut to a length
bucket (titans/data/text.py); TensorFlow is never imported.
"""

from titans.data.augment import normalize
from titans.data.info import DATASETS, DatasetInfo, dataset_info
from titans.data.loaders import TrainLoader, eval_batches, eval_images, num_eval_batches
from titans.data.sources import (
    ArraySource,
    DatasetNotFoundError,
    Source,
    check_tokenizer,
    default_data_dir,
    get_source,
    load_in_memory,
    overlap,
    split_ranges,
    tokenizer_for,
)
from titans.data.text import TokenizerMismatchError

__all__ = [
    "ArraySource",
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "Source",
    "TokenizerMismatchError",
    "TrainLoader",
    "check_tokenizer",
    "dataset_info",
    "default_data_dir",
    "eval_batches",
    "eval_images",
    "get_source",
    "load_in_memory",
    "normalize",
    "num_eval_batches",
    "overlap",
    "split_ranges",
    "tokenizer_for",
]
