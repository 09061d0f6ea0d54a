"""DEO's models: dual-stem Swin/ViT encoders, projection heads, the EMA and optical teachers.

The entry point is :func:`build_encoder` (``build_encoder("deo_swin_b")``); weights files are
read, checked and written by :mod:`deo_cli.models.weights`.
"""

from deo_cli.models.build import build_encoder, load_encoder
from deo_cli.models.ema import EmaTeacher, build_ema_teacher, ema_update
from deo_cli.models.encoder import DeoEncoder, num_parameters
from deo_cli.models.heads import ProjectionHead, build_deo_heads
from deo_cli.models.registry import ModelSpec, get_model_spec, list_models, register_model
from deo_cli.models.swin import DeoSwin
from deo_cli.models.teachers import OpticalTeacher, build_teacher, get_teacher_spec, list_teachers
from deo_cli.models.vit import DeoViT
from deo_cli.models.weights import (
    encoder_meta,
    file_sha256,
    read_encoder_weights,
    resolve_weights,
    save_encoder,
)

__all__ = [
    "DeoEncoder",
    "DeoSwin",
    "DeoViT",
    "EmaTeacher",
    "ModelSpec",
    "OpticalTeacher",
    "ProjectionHead",
    "build_deo_heads",
    "build_ema_teacher",
    "build_encoder",
    "build_teacher",
    "ema_update",
    "encoder_meta",
    "file_sha256",
    "get_model_spec",
    "get_teacher_spec",
    "list_models",
    "list_teachers",
    "load_encoder",
    "num_parameters",
    "read_encoder_weights",
    "register_model",
    "resolve_weights",
    "save_encoder",
]
