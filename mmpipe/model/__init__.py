"""The multimodal model: encoders, fusion heads, the dual-encoder module and its losses."""

from mmpipe.model.features import Encoded, concat_encoded
from mmpipe.model.fusion import (
    FUSION_MODES,
    TOKEN_LEVEL,
    AudioConcatFusion,
    AudioLateFusion,
    apply_head,
    create_fusion_head,
)
from mmpipe.model.image import create_image_encoder
from mmpipe.model.multimodal import (
    MultimodalModel,
    audio_info_nce,
    audio_inputs,
    batch_targets,
    contrastive_objective,
    create_model,
    info_nce,
    labelled_rows,
    multi_hot,
    num_outputs,
    predict_labels,
    sigmoid_loss,
    task_loss_sum,
)
from mmpipe.model.text import create_text_encoder, hash_tokenize

__all__ = [
    "FUSION_MODES",
    "TOKEN_LEVEL",
    "AudioConcatFusion",
    "AudioLateFusion",
    "Encoded",
    "MultimodalModel",
    "apply_head",
    "audio_info_nce",
    "audio_inputs",
    "batch_targets",
    "contrastive_objective",
    "concat_encoded",
    "create_fusion_head",
    "create_image_encoder",
    "create_model",
    "create_text_encoder",
    "hash_tokenize",
    "info_nce",
    "labelled_rows",
    "multi_hot",
    "num_outputs",
    "predict_labels",
    "sigmoid_loss",
    "task_loss_sum",
]
