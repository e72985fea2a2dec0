"""Tasks plug into the Trainer: each builds its training batches, computes a training step, evaluates, or predicts.

Names are the seed's. Stage 1 (``stage1.py``): ``contrastive_language_image_pretrain`` (training; its evaluation is
retrieval), ``image_text_retrieval_finetune`` (same-image pairs are positives), ``image_to_text_retrieval``, ``zero_shot_image_classification``. Stage 2 (``stage2.py``):
``image_to_text_generation``, its training ``image_to_text_generation_pretrain``, and ``causal_lm_pretrain`` (a plain
causal LM on caption text).
"""

from blip2.engine.tasks.base import Task, eval_loader
from blip2.engine.tasks.stage1 import (PretrainTask, RetrievalFinetuneTask, RetrievalTask,
                                       ZeroShotClassificationTask)
from blip2.engine.tasks.stage2 import CausalLMPretrainTask, GenerationPretrainTask, ImageToTextGenerationTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (
    PretrainTask, RetrievalFinetuneTask, RetrievalTask, ZeroShotClassificationTask, GenerationPretrainTask, ImageToTextGenerationTask,
    CausalLMPretrainTask,
)}


def get_task(name: str, stage2: bool = False) -> Task:
    """The task called ``name``; for a stage-2 model the seed's ``contrastive_language_image_pretrain`` means
    stage-2 training (``image_to_text_generation_pretrain``)."""
    if stage2 and name == PretrainTask.name:
        name = GenerationPretrainTask.name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["Task", "eval_loader", "get_task", "TASKS", "PretrainTask", "RetrievalFinetuneTask", "RetrievalTask", "ZeroShotClassificationTask",
           "GenerationPretrainTask", "ImageToTextGenerationTask", "CausalLMPretrainTask"]
