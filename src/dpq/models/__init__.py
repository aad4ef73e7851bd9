"""Models: dpq's own MLP/CNN (:mod:`.native`), Hugging Face classifiers (:mod:`.hf`), building them
from configs (:mod:`.build`), and saving/reloading them in their library's layout (:mod:`.io`)."""

from dpq.models.build import ARCHES, INITS, build_model, skeleton
from dpq.models.hf import (
    check_head_labels,
    hub_commits,
    load_tokenizer,
    local_folder,
    local_folders,
    pin_hub_commits,
    resolve_layers,
    resolve_pretrained,
    run_hub_commits,
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
    "hub_commits",
    "load_model",
    "load_tokenizer",
    "local_folder",
    "local_folders",
    "pin_hub_commits",
    "native_from_config",
    "resolve_layers",
    "resolve_pretrained",
    "run_hub_commits",
    "save_model",
    "skeleton",
    "student_from_teacher",
]
