"""`mmjobs plan`: a real-size dry run of a recipe's training steps, without a GPU.

    mmjobs plan pipelines/recipes/llava-dataengine.yaml [--set cluster.gpu_memory_gib=24]

- `steps`: the recipe's train steps and their configs, wired as `mmjobs compile` wires them;
- `settings`: the few training settings a plan reads (one place for the config's shape);
- `models`: the real config of the model a step trains (vendored published configs, store
  directories, imports), built on the meta device; pluggable for new architectures;
- `estimate`: one step: LoRA/freeze applied by the trainer's code, parameters, memory, FLOPs;
- `memory`: model states (DeepSpeed's accounting per ZeRO stage) and activations;
- `hardware`: GPU memory per product, headroom, the H100's peak;
- `report`: the table, the details, `main`.
"""

from mmjobs.plan.models import PlanError

__all__ = ["PlanError"]
