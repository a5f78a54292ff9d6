"""Component `make-tiny-model`: a tiny LLaVA or Chameleon from configs (no downloads)."""


def make_tiny_model(config_json: str) -> str:
    """Build the model (`mmjobs.stages.make_tiny_model`); returns its directory URI."""
    from mmjobs.stages import make_tiny_model as stage

    return stage.main(stage.MakeTinyModelConfig.model_validate_json(config_json)).output


COMPONENT = make_tiny_model
