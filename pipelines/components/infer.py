"""Component `infer`: answers for a canonical dataset or a benchmark -> predictions JSONL."""


def infer(config_json: str, model: str, dataset: str = "", adapter: str = "") -> str:
    """Run `mmjobs.stages.infer` (empty `dataset`/`adapter`: not wired, the config decides);
    returns the committed predictions folder URI."""
    import json

    from mmjobs.stages import infer as stage

    wired = {"model": model, "dataset": dataset, "adapter": adapter}
    config = {**json.loads(config_json), **{k: v for k, v in wired.items() if v}}
    return stage.main(stage.InferConfig.model_validate(config)).output


COMPONENT = infer
