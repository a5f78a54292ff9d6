"""Names of the files and folders in stage outputs: the layout one stage writes, the next reads.

Every committed directory ends with the store's manifest (`storage.MANIFEST_NAME`). Declared
once here, so the writer and its readers (another stage, the multi-node launcher, serving,
`mmjobs score`) cannot drift apart.
"""

from __future__ import annotations

# Canonical datasets (prepare, mix): the records, the rejected rows and the dataset card.
SAMPLES_FILE = "samples.jsonl"
REJECTS_FILE = "rejects.jsonl"
DATASET_CARD = "dataset.json"
IMAGES_DIR = "images"  # images drawn or copied into an output; generated images of answers

# Pretokenized shards: `data/shard-*.parquet` (only shards in there, so the folder reads as a
# Parquet dataset) and beside it their card (counts, lengths, processor).
SHARDS_DIR = "data"
SHARDS_CARD = "card.json"
# A Hugging Face card beside datasets and models: what it is, and how to load it (its YAML
# header points `datasets.load_dataset` at the data files).
README_FILE = "README.md"

# A training output: resumable checkpoints, and the committed result under final/.
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
TRAIN_INFO = "train_info.json"  # in final/: steps, losses, and where each part is
ADAPTER_DIR = "adapter"  # final/adapter: a LoRA adapter (peft format)
MODEL_DIR = "model"  # final/model: a full fine-tune with its processor
CONNECTOR_DIR = "connector"  # final/connector: an aligned connector
REWARD_MODEL_DIR = "reward_model"  # final/reward_model: a reward model (mode rm)
VALUE_HEAD_FILE = "value_head.safetensors"  # ppo's critic head, beside the policy

# Predictions (infer) and their scores (evaluate).
PREDICTIONS_FILE = "predictions.jsonl"
INFER_SUMMARY = "infer.json"
SCORES_FILE = "scores.jsonl"
EVAL_SUMMARY = "summary.json"
