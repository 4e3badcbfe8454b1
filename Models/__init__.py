"""Model zoo: `get_model(name, model_class, input_shape, num_classes)` and its registries.

Classes (`MODEL_CLASSES`): ``default`` (small nets for Fashion-MNIST / CIFAR / MNIST-1D,
including the demo model ``vgg-demo``), ``tinyimagenet`` (VGG / ResNet / wide ResNet written
for small images), ``imagenet`` (torchvision VGG / ResNet) and ``torchvision`` (any torchvision
classification builder). Importing this package registers all of them.
"""

from Models import default, imagenet, tinyimagenet  # noqa: F401  (register the models)
from Models.registry import (
    MODEL_CLASSES,
    check_input_shape,
    get_model,
    list_models,
    pretrained_path,
    register_model,
)

__all__ = [
    "MODEL_CLASSES",
    "check_input_shape",
    "get_model",
    "list_models",
    "pretrained_path",
    "register_model",
]
