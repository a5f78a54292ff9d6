"""What travels with a trained model to other tools: a portable adapter config and a filled
model card (README.md) beside adapters, full fine-tunes and merged models.

peft writes `base_model_name_or_path` from the loaded model's `_name_or_path`, which is the
local directory the base was read from: for a model in the store, a cache folder under
`$MMJOBS_HOME/cache/models/` that exists on one machine only. `portable_adapter_config` puts
back what the recipe named (a hub id or a store URI), so `AutoPeftModel` and people reading
the config find the base anywhere. peft's README.md is an empty template; `model_card` says
what the model is, what made it and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmjobs import layout, storage
from mmjobs.models.model_dirs import ADAPTER_CONFIG

README = layout.README_FILE


def portable_adapter_config(adapter_dir: str | Path, base: str) -> bool:
    """Set a saved peft adapter's `base_model_name_or_path` to `base` (what the recipe named:
    a hub id or store URI, never the local copy it was loaded from).

    Returns False (nothing changed) for a folder without a peft `adapter_config.json` (e.g.
    LaVIN's MMA adapters, whose config is mmjobs' own).
    """
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    if "peft_type" not in config:
        return False
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def model_card(*, kind: str, uri: str, base: str, recipe: str | None = None,
               data: list[dict[str, Any]] | None = None,
               settings: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
               provenance: dict[str, Any] | None = None) -> str:
    """README.md text for a trained model (Hugging Face model card: YAML header, then prose).

    Args:
        kind: "adapter" (peft LoRA), "mma-adapter" (LaVIN), "model" (a full fine-tune) or
            "merged" (base + adapter folded into a standalone model).
        uri: where this folder is in the store (the loading snippets use it).
        base: the base model as the recipe named it (hub id or store URI).
        recipe: the recipe that made it, if any.
        data: the datasets, each `{"uri", "fingerprint", ...}` (extra keys are listed too).
        settings: the training (or merge) settings worth reading (flat or nested).
        metrics: final numbers (losses, evaluation scores); omitted when empty.
        provenance: anything else that identifies the run (experiment, run id, step).
    """
    header = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers"),
              f"base_model: {_yaml_scalar(base)}", "tags:", "- mmjobs"]
    header += [f"- {_yaml_scalar(recipe)}"] if recipe else []
    header += ["---", ""]
    title = {"adapter": "LoRA adapter", "mma-adapter": "LaVIN MMA adapters",
             "model": "Fine-tuned model", "merged": "Merged model"}.get(kind, kind)
    lines = [f"# {title}{f' from recipe `{recipe}`' if recipe else ''}", "",
             f"- stored at: `{uri}`", f"- base model: `{base}`"]
    lines += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in (provenance or {}).items()
              if v is not None]
    if data:
        lines += ["", "## Data", "", "| dataset | fingerprint | details |", "|---|---|---|"]
        for d in data:
            rest = ", ".join(f"{k} `{v}`" if isinstance(v, str) else f"{k} {v}"
                             for k, v in d.items()
                             if k not in ("uri", "fingerprint") and v is not None)
            lines.append(f"| `{d.get('uri')}` | `{d.get('fingerprint') or '-'}` | {rest} |")
    if settings:
        lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | `{v}` |" for k, v in _flatten(settings).items()]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in metrics.items() if v is not None]
    lines += ["", "## How to load", "", _how_to_load(kind, uri, base)]
    return "\n".join(header + lines) + "\n"


def _how_to_load(kind: str, uri: str, base: str) -> str:
    fetch = ("Copy it out of the store first (`mmjobs store cp {uri} ./local-copy` checks "
             "every file's sha256), or let mmjobs fetch and verify it: `mmjobs serve` and the "
             "infer stage take the store URI as is.")
    if kind == "adapter":
        return f"""```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

base = AutoModelForImageTextToText.from_pretrained("BASE")     # {base}
processor = AutoProcessor.from_pretrained("BASE")
model = PeftModel.from_pretrained(base, "ADAPTER")               # {uri}
```

`BASE` and `ADAPTER` are local folders (or hub ids). {fetch.format(uri=uri)}
`mmjobs stage merge --set base={base} --set adapter={uri}` folds the adapter into a
standalone model."""
    if kind == "mma-adapter":
        return f"""LaVIN's adapters are loaded by mmjobs onto their base (their routers depend on
the input, so peft cannot load them):

```
mmjobs serve {base} --adapter {uri}
```"""
    return f"""```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("MODEL")    # {uri}
processor = AutoProcessor.from_pretrained("MODEL")
```

`MODEL` is a local folder. {fetch.format(uri=uri)}"""


def write_model_cards(final: Path, parts: dict[str, str], *, final_uri: str, base: str,
                      **card: Any) -> list[str]:
    """Make the trained parts in a local `final/` folder travel: portable peft adapter
    configs, and a README.md model card in each adapter or model folder (replacing peft's
    template). `card`: `model_card`'s other arguments. Returns the folders carded."""
    done = []
    for part, rel in parts.items():
        folder = final / rel
        if part == "adapter":
            kind = "adapter" if portable_adapter_config(folder, base) else "mma-adapter"
        elif part == "model":
            kind = "model"
        else:  # connectors and reward models are mmjobs formats: their configs say it all
            continue
        text = model_card(kind=kind, uri=storage.join(final_uri, rel), base=base, **card)
        (folder / README).write_text(text, encoding="utf-8")
        done.append(rel)
    return done


def write_merged_card(folder: Path, *, uri: str, base: str, adapter: str,
                      recipe: str | None, max_logit_diff: float | None) -> None:
    """README.md of a merged model in `folder` (replacing any the base shipped): the base, the
    adapter, the data the adapter was trained on (from its training output's train_info.json,
    when there is one) and the merge's self-check."""
    data, settings, metrics = [], {}, {"max_logit_diff": max_logit_diff}
    info_uri = storage.join(adapter.rstrip("/").rsplit("/", 1)[0], layout.TRAIN_INFO)
    try:
        info = json.loads(storage.read_text(info_uri))
        data = [shards_entry("train", info["data"])]
        settings = {"mode": info.get("mode"), "finetune": info.get("finetune"),
                    "steps": info.get("steps")}
        metrics = {"final_loss": info.get("final_loss"), **(info.get("eval_metrics") or {}),
                   **metrics}
    except (storage.StoreError, OSError, ValueError, KeyError, TypeError):
        pass  # an adapter from elsewhere: the card says what is known
    text = model_card(kind="merged", uri=uri, base=base, recipe=recipe, data=data,
                      settings=settings, metrics=metrics, provenance={"adapter": adapter})
    (folder / README).write_text(text, encoding="utf-8")


def card_final(trainer: Any, scratch: Path, parts: dict[str, str], final_uri: str) -> None:
    """`write_model_cards` for a `TrainRecipe` exporting into `scratch` (its `final/`): base,
    data, settings, final losses and the run's provenance (`trainer.about`)."""
    data = [shards_entry("train", trainer.data, trainer.card)]
    if trainer.eval_data:
        data.append(shards_entry("eval", trainer.eval_data))
    about = dict(trainer.about)
    write_model_cards(
        scratch, parts, final_uri=final_uri, base=trainer.spec.name_or_path,
        recipe=about.pop("recipe", None), data=data,
        settings=trainer.cfg.model_dump(mode="json", exclude_none=True),
        metrics={"steps": trainer.step, "final_loss": trainer.last_loss,
                 **trainer.eval_metrics},
        provenance={**about, "fingerprint": trainer.fingerprint})


def shards_entry(role: str, uri: str, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `model_card` data row for pretokenized shards: their URI and fingerprint, the
    canonical dataset they were made from and its fingerprint, rows. `card`: their card.json
    (read from `uri` when not given)."""
    if card is None:
        card = json.loads(storage.read_text(storage.join(uri, layout.SHARDS_CARD)))
    return {"uri": uri, "fingerprint": card.get("fingerprint"), "role": role,
            "rows": (card.get("counts") or {}).get("written"), "from": card.get("dataset"),
            "source fingerprint": card.get("dataset_fingerprint")}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        elif value is not None and value != {} and value != []:
            flat[name] = value
    return flat


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _yaml_scalar(text: str) -> str:
    """A YAML string that stays a string (URIs hold ':' and may start with special
    characters)."""
    return json.dumps(text, ensure_ascii=False)
