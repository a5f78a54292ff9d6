"""Which real-size model a recipe trains: its config, from where, built on the meta device.

`resolve_model(name, context)` asks a list of resolvers in order; the first that knows `name`
answers with a `ResolvedModel` (a transformers config and where it came from) or an
`Unsupported` (an architecture mmjobs cannot build yet: a row in the plan, to be filled by the
issue named there). Nothing is downloaded and no code shipped with a checkpoint is run.

- `unsupported_ids`: hub ids of architectures mmjobs does not implement (`UNSUPPORTED`);
- `tiny_models`: `tiny:llava` / `tiny:chameleon`, the config `mmjobs.models.tiny` builds (the
  recipe's make-model step's sizes, or its `replica`);
- `vendored_configs`: hub ids whose published config.json is vendored in
  `mmjobs/models/replicas/published/` (llava-hf/llava-1.5-7b-hf, lmsys/vicuna-7b-v1.5,
  liuhaotian/llava-v1.5-7b), and Chameleon-7B (`mmjobs.models.replicas.chameleon.CONFIG`, its
  published values);
- `recipe_imports`: a store URI an `imports:` entry of the recipe fills: its `source`;
- `model_directories`: a local directory, `file://` or `s3://` URI holding config.json;
- `hub_cache`: a hub id whose config.json is in the local Hugging Face cache.

New architectures plug in with `register_resolver`, and leave `UNSUPPORTED`. LaVIN (issue 16)
resolves from `luogen1996/LaVIN` to LaVIN-7B's `LavinConfig`; InternLM-XComposer2 (issue 15)
from its published config.json (also for Coobiw/InternLM-XComposer2_Enhanced, ChartMoE's copy)
to mmjobs' native `XComposer2Config` at 490 px.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmjobs.models.replicas._common import PUBLISHED_ROOT


class PlanError(Exception):
    """A recipe (or one of its steps) cannot be planned; the message names what and the fix."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model's architecture.

    Attributes:
        name: what was resolved (hub id, path, URI or `tiny:` name).
        origin: where the config came from, for the report.
        config: the transformers config (`LlavaConfig`, `ChameleonConfig`, `LlamaConfig`, ...).
    """

    name: str
    origin: str
    config: Any


@dataclass(frozen=True)
class Unsupported:
    """An architecture mmjobs cannot build yet (the plan prints a row saying so)."""

    name: str
    architecture: str
    issue: str

    def message(self) -> str:
        """The row's text."""
        return f"{self.architecture}: not implemented in mmjobs yet ({self.issue})"


@dataclass(frozen=True)
class UnsupportedArchitecture:
    """How to recognise an architecture mmjobs does not implement: hub ids, model_type values
    in config.json, or a marker file in a checkpoint directory without config.json."""

    architecture: str
    issue: str
    hub_ids: frozenset[str] = frozenset()
    model_types: frozenset[str] = frozenset()
    marker_files: frozenset[str] = frozenset()


# Empty: every seed architecture is implemented (InternLM-XComposer2 natively, issue 15).
UNSUPPORTED: list[UnsupportedArchitecture] = []
# InternLM-XComposer2: ChartMoE starts from Coobiw's copy, the published 7B with flash
# attention and batching added to its remote code (same architecture, same config keys).
XCOMPOSER2_IDS = {"internlm/internlm-xcomposer2-7b": "internlm/internlm-xcomposer2-7b",
                  "Coobiw/InternLM-XComposer2_Enhanced": "internlm/internlm-xcomposer2-7b"}
# LaVIN-7B (mmjobs.models.lavin: LLaMA-7B from Meta's params.json + CLIP ViT-L/14 + MMA
# adapters); a LaVIN directory's own config.json (model_type lavin) is read like any other.
LAVIN_IDS = frozenset({"luogen1996/LaVIN", "luogen1996/LaVIN-7B"})


@dataclass
class ResolveContext:
    """What a recipe says about its models besides `model.name_or_path`.

    Attributes:
        imports: store URI -> the `source` of the recipe's `imports:` entry that fills it.
        make_model: the config of the recipe's make-model step (for `tiny:` names).
        trust_remote_code: the recipe's `model.trust_remote_code` (reported, never acted on).
        notes: what resolution tried and skipped, for the report.
    """

    imports: dict[str, str] = field(default_factory=dict)
    make_model: Mapping[str, Any] | None = None
    trust_remote_code: bool = False
    notes: list[str] = field(default_factory=list)


Resolver = Callable[[str, ResolveContext], "ResolvedModel | Unsupported | None"]
RESOLVERS: list[Resolver] = []


def register_resolver(resolver: Resolver, *, first: bool = True) -> Resolver:
    """Add a resolver (first: before the built-in ones, so it can take over a name)."""
    if first:
        RESOLVERS.insert(0, resolver)
    else:
        RESOLVERS.append(resolver)
    return resolver


def resolve_model(name: str, context: ResolveContext | None = None) -> ResolvedModel | Unsupported:
    """The architecture of model `name`; see the module docstring.

    Raises:
        PlanError: no resolver knows `name` (the message says how to make it plannable).
    """
    context = context or ResolveContext()
    for resolver in RESOLVERS:
        found = resolver(name, context)
        if found is not None:
            return found
    if _is_uri(name):
        tried = "; ".join(context.notes) or "no config.json there"
        raise PlanError(f"cannot plan: no config for {name} ({tried}); run mmjobs plan where "
                        "the store is reachable, or set plan.config_from to a hub id or "
                        "directory with the same architecture")
    raise PlanError(f"cannot plan: no config for {name} (mmjobs vendors no config.json for it "
                    f"and the local Hugging Face cache has none); run `mmjobs import {name} "
                    "--to URI` first and name that URI in model.name_or_path, or set "
                    "plan.config_from to a directory holding its config.json")


def config_from_dict(raw: Mapping[str, Any], name: str) -> Any:
    """A transformers config from a parsed config.json (original LLaVA layouts converted the
    way `mmjobs.models.convert.llava` converts them).

    Raises:
        PlanError: no model_type, or one transformers does not know (custom code).
    """
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type == "internlmxcomposer2":
        return _xcomposer2_config(raw)
    if model_type == "deplot_llava":
        from mmjobs.models.deplot import register as register_deplot

        register_deplot()
    if model_type == "lavin":
        from mmjobs.models.lavin import register

        register()
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        return _original_llava_config(raw, name)
    if model_type not in CONFIG_MAPPING:
        code = " (it ships its own code: auto_map)" if raw.get("auto_map") else ""
        raise PlanError(f"cannot plan {name}: model_type {model_type!r} is not a transformers "
                        f"architecture{code}; mmjobs plan never runs a checkpoint's code")
    data = {k: v for k, v in raw.items() if k != "model_type"}
    return CONFIG_MAPPING[model_type].from_dict(data)


def build_meta_model(config: Any) -> Any:
    """The model of `config` on the meta device: real shapes and parameter counts, no memory.

    Vision-language configs build their `AutoModelForImageTextToText` class (what
    `mmjobs.models.builder.load_model` trains), text-only ones their causal LM; an mmjobs
    connector recorded in the config (`mmjobs_connector`) replaces the native projector as it
    does at load time.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from mmjobs.models.compose import CONNECTOR_CONFIG_KEY, connector_from_spec, set_connector

    with torch.device("meta"):
        try:
            model = AutoModelForImageTextToText.from_config(config)
        except ValueError:  # not a vision-language config: a language model (vicuna)
            model = AutoModelForCausalLM.from_config(config)
        spec = getattr(config, CONNECTOR_CONFIG_KEY, None)
        if spec:
            set_connector(model, connector_from_spec(spec))
    return model


def _xcomposer2_config(raw: Mapping[str, Any]) -> Any:
    """mmjobs' native `XComposer2Config` for a published (remote-code) or converted config.

    A published config.json lacks what the remote code hard-codes; the native config's
    defaults are those facts (CLIP ViT-L/14-336 read at 490 px, Partial-LoRA r 256), and
    `img_size` is the 490 every ChartMoE script trains at, not the published 224.
    """
    from mmjobs.models import register_native_models
    from mmjobs.models.xcomposer2.configuration import XComposer2Config

    register_native_models()
    data = {k: v for k, v in raw.items() if k != "model_type"}
    if "vision_config" not in data:  # the hub's config: the remote code resizes to 490
        data.pop("img_size", None)
    return XComposer2Config(**data)


# --------------------------------------------------------------------------- resolvers


def _hub_id(name: str) -> str:
    return re.sub(r"@.*$", "", name.removeprefix("hf://"))


def unsupported_ids(name: str, context: ResolveContext) -> Unsupported | None:
    """Hub ids of architectures mmjobs does not implement yet."""
    for entry in UNSUPPORTED:
        if _hub_id(name) in entry.hub_ids:
            return Unsupported(name, entry.architecture, entry.issue)
    return None


def tiny_models(name: str, context: ResolveContext) -> ResolvedModel | Unsupported | None:
    """`tiny:llava` / `tiny:chameleon`, sized as the recipe's make-model step builds them."""
    if not name.startswith("tiny:"):
        return None
    from mmjobs.models.tiny import tiny_chameleon_config, tiny_llava_config

    step = dict(context.make_model or {})
    if step.get("replica"):
        found = resolve_model(step["replica"], context)
        if isinstance(found, ResolvedModel):
            return ResolvedModel(name, f"make-model replica of {found.name}: {found.origin}",
                                 found.config)
        return found
    kind = step.get("kind") or name.removeprefix("tiny:")
    sizes = {k: step[k] for k in ("image_size", "vocab_size") if step.get(k) is not None}
    if kind == "llava":
        config = tiny_llava_config(**sizes)
    elif kind == "chameleon":
        config = tiny_chameleon_config(**sizes)
    else:
        raise PlanError(f"cannot plan {name}: no tiny model of kind {kind!r} (llava, chameleon)")
    return ResolvedModel(name, "mmjobs.models.tiny (the make-model step's sizes)", config)


# ChartWiz (a GitHub repo, no hub model): `plan.config_from` names it for the composed model.
CHARTWIZ_ID = "allright2024/ChartWiz"
# Chameleon-7B's config.json embeds a 65,536-entry vocabulary_map and is not vendored; the
# replica module keeps its published values. Both hub ids share the architecture.
_CHAMELEON_IDS = ("facebook/chameleon-7b", "PKU-Alignment/AA-chameleon-7b-base")
# The vision tower an original LLaVA config names (`mm_vision_tower`) -> a vendored config
# holding its vision config (llava-hf converted that very tower).
_VISION_TOWERS = {"openai/clip-vit-large-patch14-336": ("llava-hf--llava-1.5-7b-hf",
                                                        "vision_config")}


def vendored_configs(name: str, context: ResolveContext) -> ResolvedModel | None:
    """Hub ids whose published config is vendored with the replicas."""
    hub_id = _hub_id(name)
    if hub_id in LAVIN_IDS:
        from mmjobs.models.lavin import register
        from mmjobs.models.lavin.config import LavinConfig

        register()
        return ResolvedModel(name, "LaVIN-7B's architecture (mmjobs.models.lavin.config: "
                             "LLaMA-7B params.json, CLIP ViT-L/14, scripts/finetuning_sqa_7b.sh)",
                             LavinConfig())
    if hub_id == CHARTWIZ_ID:
        from mmjobs.models.deplot.presets import chartwiz_config

        return ResolvedModel(name, "ChartWiz's composition (mmjobs.models.deplot.presets: "
                             "Synatra-7B-v0.3-dpo's config.json + pix2struct-base's encoder, "
                             "512 patches)", chartwiz_config())
    if hub_id in _CHAMELEON_IDS:
        return ResolvedModel(name, "the published values of Chameleon-7B's config.json "
                             "(mmjobs.models.replicas.chameleon.CONFIG)", _chameleon_config())
    published_as = XCOMPOSER2_IDS.get(hub_id, hub_id)
    path = PUBLISHED_ROOT / published_as.replace("/", "--") / "config.json"
    if "/" not in hub_id or not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return ResolvedModel(name, f"published config.json of {published_as} (vendored in "
                         "mmjobs/models/replicas/published)", config_from_dict(raw, name))


def model_directories(name: str, context: ResolveContext) -> ResolvedModel | Unsupported | None:
    """A local directory, `file://` or `s3://` URI with config.json (read, never executed)."""
    from mmjobs import storage

    if not _is_uri(name):
        return None
    config_uri = storage.join(name, "config.json")
    try:
        raw = json.loads(storage.read_text(config_uri))
    except (storage.StoreError, OSError, ValueError) as e:
        context.notes.append(f"could not read {config_uri}: {e}")
        _refuse_meta_llama(name)
        return _marked_checkpoint(name)
    for entry in UNSUPPORTED:
        if raw.get("model_type") in entry.model_types:
            return Unsupported(name, entry.architecture, entry.issue)
    return ResolvedModel(name, f"{config_uri}", config_from_dict(raw, name))


def recipe_imports(name: str, context: ResolveContext) -> ResolvedModel | Unsupported | None:
    """A store URI filled by one of the recipe's `imports:`: the architecture of its source."""
    source = context.imports.get(name.rstrip("/"))
    if source is None:
        return None
    found = resolve_model(source, context)
    if isinstance(found, ResolvedModel):
        return ResolvedModel(name, f"imports: {source} -> {found.origin}", found.config)
    return found


def hub_cache(name: str, context: ResolveContext) -> ResolvedModel | None:
    """A hub id whose config.json is already in the local Hugging Face cache (no network)."""
    if _is_uri(name) or name.startswith("tiny:"):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    hub_id = _hub_id(name)
    revision = name.split("@", 1)[1] if "@" in name else None
    try:
        cached = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    if not isinstance(cached, str):
        return None
    raw = json.loads(Path(cached).read_text())
    return ResolvedModel(name, f"Hugging Face cache: {cached}", config_from_dict(raw, name))


# An import's source says what lands at its URI, so it is asked before the URI itself (which
# may be unreachable where plan runs, or not filled yet).
RESOLVERS.extend([unsupported_ids, tiny_models, vendored_configs, recipe_imports,
                  model_directories, hub_cache])


# --------------------------------------------------------------------------- helpers


def _is_uri(name: str) -> bool:
    """Store URIs and paths (not hub ids): s3://, file://, absolute or ./relative paths, or a
    directory that exists."""
    return (name.startswith(("s3://", "file://", "/", "./", "../", "~"))
            or Path(name).is_dir())


def _marked_checkpoint(name: str) -> Unsupported | None:
    """A local checkpoint without config.json whose files mark an unsupported layout."""
    if name.startswith("s3://"):
        return None
    root = Path(name.removeprefix("file://")).expanduser()
    for entry in UNSUPPORTED:
        if any((root / marker).is_file() for marker in entry.marker_files):
            return Unsupported(name, entry.architecture, entry.issue)
    return None


def _refuse_meta_llama(name: str) -> None:
    """Meta's LLaMA layout (params.json + consolidated.*.pth) is planned once converted."""
    from mmjobs.models.convert.meta_llama import is_meta_llama

    if not name.startswith("s3://") and is_meta_llama(Path(name.removeprefix("file://"))):
        raise PlanError(f"cannot plan {name}: Meta's original LLaMA layout (params.json + "
                        "consolidated.*.pth); convert it first (mmjobs stage convert --set "
                        f"source={name} --set to=URI) and plan that URI, or set "
                        "plan.config_from: luogen1996/LaVIN for LaVIN-7B")


def _chameleon_config() -> Any:
    import copy

    from transformers import ChameleonConfig

    from mmjobs.models.replicas.chameleon import CONFIG

    raw = copy.deepcopy(CONFIG)
    # Building the modules needs only the <image> entry of the vocabulary map.
    raw["vocabulary_map"] = {"<image>": raw["image_token_id"]}
    return ChameleonConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})


def _original_llava_config(raw: Mapping[str, Any], name: str) -> Any:
    """An original LLaVA (`llava_llama`) config as the converter turns it into a LlavaConfig:
    the flat Llama keys, `<image>` and `<pad>` added and the vocabulary padded to a multiple
    of 64, the vision tower's config, LLaVA's layer and strategy."""
    from transformers import LlamaConfig, LlavaConfig

    from mmjobs.models.convert.llava import VOCAB_MULTIPLE

    tower = raw.get("mm_vision_tower") or "openai/clip-vit-large-patch14-336"
    if tower not in _VISION_TOWERS:
        raise PlanError(f"cannot plan {name}: its vision tower {tower} has no vendored config "
                        f"(known: {', '.join(_VISION_TOWERS)})")
    folder, key = _VISION_TOWERS[tower]
    vision = json.loads((PUBLISHED_ROOT / folder / "config.json").read_text())[key]
    known = set(LlamaConfig().to_dict())
    skip = {"architectures", "model_type", "_name_or_path", "transformers_version",
            "vocab_size", "torch_dtype", "dtype"}
    vocab = math.ceil((int(raw.get("vocab_size", 32000)) + 2) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = LlamaConfig(**{k: v for k, v in raw.items() if k in known and k not in skip},
                       vocab_size=vocab)
    return LlavaConfig(text_config=text, vision_config=vision, projector_hidden_act="gelu",
                       vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
                       vision_feature_select_strategy="default",
                       tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
