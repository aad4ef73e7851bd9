"""Knowledge distillation: the logit loss (:mod:`.losses`), intermediate-representation terms
(:mod:`.features`), the teacher signal and its cache (:mod:`.teachers`), and the LightningModule
every stage trains (:mod:`.module`), whose loss is these terms."""

from dpq.distill.features import FeatureKDConfig
from dpq.distill.losses import KDConfig, kd_loss
from dpq.distill.teachers import EnsembleTeacher, TeacherLogits, TeacherSignal, teacher_signal

__all__ = [
    "EnsembleTeacher",
    "FeatureKDConfig",
    "KDConfig",
    "TeacherLogits",
    "TeacherSignal",
    "kd_loss",
    "teacher_signal",
]
