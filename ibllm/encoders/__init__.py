"""The encoders: ImageBind (six modalities) and Point-Bind (3D), in the official checkpoint layout."""

from ibllm.encoders.imagebind import (
    LOGIT_SCALES,
    EncoderOutput,
    ImageBind,
    input_shape,
    num_tokens,
    patch_grid,
)
from ibllm.encoders.loading import KEY_MAP, POINT_PREFIXES, load_imagebind_weights, official_key
from ibllm.encoders.pointbind import (
    PointBindTrunk,
    PointFeatures,
    PointGroups,
    PointTransformer,
    farthest_point_sample,
    group_points,
    knn_indices,
)

__all__ = [
    "ImageBind", "EncoderOutput", "LOGIT_SCALES", "input_shape", "num_tokens", "patch_grid",
    "load_imagebind_weights", "official_key", "KEY_MAP", "POINT_PREFIXES",
    "PointBindTrunk", "PointTransformer", "PointFeatures", "PointGroups", "farthest_point_sample", "group_points",
    "knn_indices",
]
