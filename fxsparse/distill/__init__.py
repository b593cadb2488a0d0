"""Knowledge distillation with msModelSlim's API, matching features through fxsparse's plans.

    from fxsparse.distill import KnowledgeDistillConfig, get_distill_model
    cfg = KnowledgeDistillConfig().set_hard_label(0.5, 0)
    cfg.add_output_soft_label({"t_output_idx": 0, "s_output_idx": 0,
                               "loss_func": [{"func_name": "KDCrossEntropy", "func_weight": 1, "temperature": 1}]})
    dual = get_distill_model(teacher, student, cfg, plan=result.plan)
    loss, student_out, teacher_out = dual(*batch)
    total = dual.get_total_loss(hard_loss)
"""
from .config import DistillConfigError, KnowledgeDistillConfig
from .dual import DistillDualModels, get_distill_model
from .losses import LOSSES, register_loss

__all__ = ["KnowledgeDistillConfig", "get_distill_model", "DistillDualModels", "DistillConfigError", "LOSSES",
           "register_loss"]
