"""Pipeline `chameleon-interleaved`: Align-Anything's Chameleon recipe, text-image interleaved
input and output.

prepare-sft (Align-Anything TI2TI rows: responses with output images), prepare-preference
(preference pairs, output images inside the responses), prepare-prompts (prompt-only, PPO
rollouts) and prepare-test (evaluation prompts) → pretokenize-sft / -preference / -prompts
(worker processes in parallel; images become VQ tokens, the output images' tokens inside the
labels; content-addressed cache) → sft, rm and dpo, each from the base model, and ppo (actor
from the base model, reward = rm, critic = a separate copy of rm trained at its own lr:
Align-Anything's topology) → infer-sft / -dpo / -ppo and infer-baseline (a second model's
answers, Anole-7b in the seed; batched interleaved generation: text and images, decoded to
PNGs with the VQ decoder of the base model) → evaluate-* (LLM judge on an OpenAI-compatible
endpoint: Align-Anything's interleaved-compare of each model against the baseline, giving the
seed's win / lose / equal table; or pairwise (MT-Bench prompt) against it; or single grades,
the baseline graded too) → report.

The judge's API key is never in the recipe: on a cluster the evaluate pods get the variable
named by `stages.evaluate.judge.key_env` from the Kubernetes Secret `mmjobs-judge` (optional,
for keyless in-cluster judges); locally it is read from the environment.
"""

from __future__ import annotations

from typing import Any

from kfp import dsl, kubernetes

from mmjobs import storage
from mmjobs.logs import get_logger
from pipelines.builder import Build

NAME = "chameleon-interleaved"
BASELINE = "baseline"
JUDGE_SECRET = "mmjobs-judge"
TRAIN_WIRED = ("data", "model.name_or_path")
log = get_logger(__name__)


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()
    sft_set = b.step("prepare-sft", "prepare")
    pref_set = b.step("prepare-preference", "prepare")
    prompt_set = b.step("prepare-prompts", "prepare")
    test_set = b.step("prepare-test", "prepare")
    shards = {name: b.step(f"pretokenize-{name}", "pretokenize",
                           key=("pretokenize", f"pretokenize-{name}"), dataset=data.output,
                           model=base)
              for name, data in (("sft", sft_set), ("preference", pref_set),
                                 ("prompts", prompt_set))}

    # Align-Anything's topology (scripts/chameleon/chameleon_{rm,dpo,ppo}.sh): sft, rm and dpo
    # each start from the base model, and so does ppo's actor; ppo's critic is a separate
    # model initialised from the reward model (rl.critic: reward_model in the recipe).
    sft_cfg = b.config("sft", "train", fixed={"train": {"mode": "sft"}}, wired=TRAIN_WIRED)
    sft = b.step("sft", "train", config=sft_cfg, data=shards["sft"].output, model=base)
    sft_model = sft.output  # a full fine-tune returns its model directory
    if _lora(sft_cfg):
        sft_model = b.step("merge", "merge", base=base, adapter=sft.output).output
    rm_cfg = b.config("rm", "train", fixed={"train": {"mode": "rm"}}, wired=TRAIN_WIRED)
    rm = b.step("rm", "train", config=rm_cfg, data=shards["preference"].output, model=base)
    dpo_cfg = b.config("dpo", "train", fixed={"train": {"mode": "dpo"}}, wired=TRAIN_WIRED)
    dpo = b.step("dpo", "train", config=dpo_cfg, data=shards["preference"].output, model=base)
    # The reward model is the rm step's committed final/ (a fixed path: outputs are laid out
    # by step name), so the ppo step waits for it explicitly.
    reward = {"kind": "model", "model": storage.join(rm_cfg["output"], "final")}
    ppo_cfg = b.config("ppo", "train", fixed={"train": {"mode": "ppo", "rl": {"reward": reward}}},
                       wired=TRAIN_WIRED)
    # Align-Anything's ptx: the SFT data's next-token loss mixed into every PPO update.
    ptx = ({"ptx_data": shards["sft"].output}
           if ppo_cfg.get("train", {}).get("rl", {}).get("ptx_coef") else {})
    ppo = b.step("ppo", "train", config=ppo_cfg, data=shards["prompts"].output, model=base,
                 **ptx)
    ppo.after(rm)

    # Fully fine-tuned models are saved by transformers without the VQ decoder (its Chameleon
    # class has none): images are decoded with the base model's (frozen in every mode).
    decoder = _static(b, base, "make-model")
    infer_defaults = {**b.defaults("infer"), "modalities": ["text", "image"],
                      "vq_decoder": decoder}
    predictions = {}
    for name, task, cfg in (("sft", sft, sft_cfg), ("dpo", dpo, dpo_cfg), ("ppo", ppo, ppo_cfg)):
        inputs: dict[str, Any] = {"model": sft_model if name == "sft" else task.output,
                                  "dataset": test_set.output}
        if name != "sft" and _lora(cfg):
            inputs.update(model=base, adapter=task.output)
        config = b.config(f"infer-{name}", "infer", key=("infer", f"infer-{name}"),
                          defaults=infer_defaults, wired=tuple(inputs))
        predictions[name] = (b.step(f"infer-{name}", "infer", config=config, **inputs),
                             config["output"])
    predictions[BASELINE] = _baseline_answers(b, base, test_set.output, infer_defaults)

    evaluations = []
    judge = dict(b.recipe.stages.get("evaluate", {}).get("judge") or {})
    pairwise = judge.get("mode", "single") != "single"
    for name, (task, out) in predictions.items():
        if pairwise and name == BASELINE:
            continue  # the model the others are compared with
        fixed: dict[str, Any] = {"label": name, "judge": {"image_root": out}}
        if pairwise:
            fixed["judge"]["baseline"] = predictions[BASELINE][1]
        config = b.config(f"evaluate-{name}", "evaluate", key=("evaluate", f"evaluate-{name}"),
                          fixed=fixed)
        evaluation = b.step(f"evaluate-{name}", "evaluate", config=config, label=name,
                            predictions=task.output)
        if pairwise:
            evaluation.after(predictions[BASELINE][0])
        if b.for_cluster:
            _judge_key(evaluation, config)
        evaluations.append(evaluation)
    b.report(evaluations, title="Chameleon interleaved: SFT, DPO and PPO judged against "
             "the baseline")


def _baseline_answers(b: Build, base: Any, dataset: Any,
                      defaults: dict[str, Any]) -> tuple[dsl.PipelineTask, str]:
    """The infer-baseline step: the second model's answers to the test prompts, which the
    pairwise judge compares every trained model with (the seed: Anole-7b). Its model is
    `stages.infer-baseline.model` (a URI; the recipe imports Anole there), else the base
    model; the rest of its settings are the other infer steps'."""
    section = {**b.recipe.stages.get("infer", {}), **b.recipe.stages.get("infer-baseline", {})}
    model = section.pop("model", None) or base
    config = b.config("infer-baseline", "infer", key=("infer", "infer-baseline"),
                      defaults=defaults, section=section, wired=("model", "dataset"))
    task = b.step("infer-baseline", "infer", config=config, model=model, dataset=dataset)
    return task, config["output"]


def _lora(config: dict[str, Any]) -> bool:
    return config.get("train", {}).get("finetune", "lora") == "lora"


def _static(b: Build, value: Any, step: str) -> str:
    """A URI for `value`: itself when it is a string, else the output folder of `step` (where
    a pipeline channel of that step points; outputs are laid out by step name). The base
    model's pipeline parameter (`base_model`) stands for the recipe's model here."""
    if isinstance(value, str):
        return value
    if not b.recipe.model.name_or_path.startswith("tiny:"):
        return b.recipe.model.name_or_path
    return storage.join(b.store_root, b.recipe.experiment or "default", b.run_id, step)


def _judge_key(task: dsl.PipelineTask, config: dict[str, Any]) -> None:
    """The judge's API key variable from the Secret `mmjobs-judge` (optional: local judges
    need none); never a value in the pipeline."""
    judge = config.get("judge") or {}
    key_env = judge.get("key_env") or judge.get("api_key_env") or "OPENAI_API_KEY"
    kubernetes.use_secret_as_env(task, secret_name=JUDGE_SECRET,
                                 secret_key_to_env={key_env: key_env}, optional=True)
