"""Titans model zoo: image classifiers built with Flax NNX behind one factory.

    model = create_model("resnet20", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    logits = model(x, train=False)                    # (B, num_classes) float32
    logits, acts = model(x, train=False, capture=True)  # acts: 'stage1'..., 'features'

``MODEL_NAMES`` lists the registered names; ``model_kwargs(name)`` their optional arguments.
"""

from titans.models.cost import flops_per_example, param_count
from titans.models.registry import MODEL_NAMES, build_model, create_model, initialise, model_kwargs

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "create_model",
    "flops_per_example",
    "initialise",
    "model_kwargs",
    "param_count",
]
