"""Train steps of the model kinds other than GPT (:class:`trainer.step.GPTTrainStep`), and the default step of a
family."""
from __future__ import annotations


def step_for(model_config):
    """The step a run of ``model_config``'s family uses when the caller passes none."""
    if model_config.family == "bert":
        from trainer.steps.bert import BertTrainStep

        return BertTrainStep()
    from trainer.step import GPTTrainStep

    return GPTTrainStep()
