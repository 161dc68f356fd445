from morph_lightning.stages.base import MorphStage
from morph_lightning.stages.stage1_ar import Stage1AR
from morph_lightning.stages.stage2_autoencode import Stage2AutoEncode
from morph_lightning.stages.stage3_instruct import Stage3Instruct

__all__ = ["MorphStage", "Stage1AR", "Stage2AutoEncode", "Stage3Instruct"]
