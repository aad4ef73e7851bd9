"""Models: dpq's own MLP/CNN (:mod:`.native`), Hugging Face classifiers (:mod:`.hf`), building them
from configs (:mod:`.build`), and saving/reloading them in their library's layout (:mod:`.io`)."""

from dpq.models.build import ARCHES, INITS, build_model, skeleton
from dpq.models.hf import (
    check_head_labels,
    load_tokenizer,
    local_folder,
    local_folders,
    resolve_layers,
    resolve_pretrained,
    student_from_teacher,
)
from dpq.models.io import load_model, save_model
from dpq.models.native import NATIVE_ARCHES, CNNClassifier, MLPClassifier, native_from_config

__all__ = [
    "ARCHES",
    "INITS",
    "NATIVE_ARCHES",
    "CNNClassifier",
    "MLPClassifier",
    "build_model",
    "check_head_labels",
    "load_model",
    "load_tokenizer",
    "local_folder",
    "local_folders",
    "native_from_config",
    "resolve_layers",
    "resolve_pretrained",
    "save_model",
    "skeleton",
    "student_from_teacher",
]
