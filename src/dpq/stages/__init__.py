"""Pipeline stages. Importing this package registers every stage kind in :data:`STAGES`."""

from dpq.stages.base import STAGES, KDStageConfig, Stage, StageConfig
from dpq.stages.distill import DistillStage
from dpq.stages.prune import PruneStage
from dpq.stages.ptq import PtqStage
from dpq.stages.quantize import QuantizationAware, QuantizeStage
from dpq.stages.recover import RecoverStage
from dpq.stages.spiral import SpiralStage
from dpq.stages.teacher import TeacherStage

__all__ = ["STAGES", "Stage", "StageConfig", "KDStageConfig", "TeacherStage", "DistillStage", "PruneStage",
           "RecoverStage", "SpiralStage", "QuantizeStage", "QuantizationAware", "PtqStage"]
