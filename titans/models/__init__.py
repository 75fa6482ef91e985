"""Titans model zoo: image and text classifiers built with Flax NNX behind one factory.

    model = create_model("resnet20", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    logits = model(x, train=False)                    # (B, num_classes) float32
    logits, acts = model(x, train=False, capture=True)  # acts: 'stage1'..., 'features'

Text models (``modality(name) == "text"``: text_bag, text_cnn, transformer, transformer_small) take int32
token ids (B, L), 0 = padding, ``input_shape=(max_tokens,)`` and ``vocab_size``.
``MODEL_NAMES`` lists the registered names; ``model_kwargs(name)`` their optional arguments.
"""

from titans.models.cost import flops_per_example, param_count
from titans.models.mlm import MaskedLM, build_masked_lm
from titans.models.registry import MODEL_NAMES, build_model, create_model, initialise, modality, model_kwargs

__all__ = [
    "MODEL_NAMES",
    "MaskedLM",
    "build_masked_lm",
    "build_model",
    "create_model",
    "flops_per_example",
    "initialise",
    "modality",
    "model_kwargs",
    "param_count",
]
