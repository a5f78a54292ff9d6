"""Training: schedules, trainer, checkpoint/resume, merge, MoE construction, preference tuning.

Submodules import torch/transformers themselves, so importing this package is cheap.

- `mmjobs.train.methods`: one typed config per train.mode (align, sft, dpo, rm, ppo, grpo),
  each checking its own combinations; pydantic only, so `mmjobs.config` imports it cheaply.
- `mmjobs.train.schedules`: LR schedules by name (cosine, linear, constant, cyclical, step,
  exponential) with warmup, plus `lr_at_steps` / `plot_lr_curve` for reports.
- `mmjobs.train.dropout_schedules`: per-layer LoRA dropout schedules (LaVIN's inc./dec.).
- `mmjobs.train.objectives`: what the trainer minimises per train.mode.
- `mmjobs.train.preference`: the DPO / conservative DPO / IPO loss and its objective.
- `mmjobs.train.reward_model`: VLM + value head, Bradley-Terry objective, export and
  `load_reward_model`.
"""
