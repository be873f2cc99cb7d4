"""The identity of a checkpoint that needs moepress's modules: its own model_type and class names.

Such a checkpoint must not carry its source's `model_type` (`deepseek_v2`): plain transformers, or a
serving engine, would build the uncompressed architecture, drop the tensors it does not know, randomly
initialise the ones it misses and return a silently wrong model. Under `moepress_deepseek_v2`, with an
`auto_map` to the folder's `modeling_moepress.py`, transformers refuses it unless trust_remote_code is
given, and then loads it right.
"""

from __future__ import annotations

MODEL_TYPE_PREFIX = "moepress_"
CLASS_PREFIX = "Moepress"


def compressed_model_type(model_type: str) -> str:
    """The model_type of a compressed checkpoint whose source has `model_type`."""
    return model_type if is_compressed_model_type(model_type) else MODEL_TYPE_PREFIX + model_type


def is_compressed_model_type(model_type: str) -> bool:
    return model_type.startswith(MODEL_TYPE_PREFIX)


def source_model_type(model_type: str) -> str:
    """The source family's model_type for a (possibly compressed) checkpoint's `model_type`."""
    return model_type.removeprefix(MODEL_TYPE_PREFIX)


def compressed_class_name(source_class_name: str) -> str:
    """The name of a compressed checkpoint's config or model class (`MoepressDeepseekV2ForCausalLM`)."""
    return source_class_name if is_compressed_class(source_class_name) else CLASS_PREFIX + source_class_name


def is_compressed_class(class_name: str) -> bool:
    return class_name.startswith(CLASS_PREFIX)
