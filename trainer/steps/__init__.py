"""Train steps of the model kinds other than GPT (:class:`trainer.step.GPTTrainStep`), and the default step of a
family."""
from __future__ import annotations


def step_for(model_config):
    """The step a run of ``model_config``'s family uses when the caller passes none."""
    family = getattr(model_config, "family", None)
    if family is None and getattr(model_config, "model_type", None) in ("t5", "mt5"):  # interop.t5.T5Config
        from trainer.steps.t5 import T5TrainStep

        return T5TrainStep()
    if family == "bert":
        from trainer.steps.bert import BertTrainStep

        return BertTrainStep()
    from trainer.step import GPTTrainStep

    return GPTTrainStep()
