"""Chameleon's VQ image decoder: the half of the image tokenizer transformers does not ship.

`VQDecoder` is Chameleon's VQ-GAN decoder in the taming-transformers layout that Anole and
Align-Anything checkpoints store under `model.vqmodel.decoder.*`; `ImageDecoder` loads it
and turns a span of image-code tokens back into a picture (`mmjobs.eval.interleaved`
generates the spans; `mmjobs.models.tiny` writes a decoder for the tiny Chameleon).

**Where the decoder weights come from** (`find_decoder_weights`): transformers' Chameleon
class has no decoder module, so `save_pretrained` never writes one and `from_pretrained`
ignores one. Decoder tensors are therefore read by this module straight from safetensors:
`vq_decoder.safetensors` in the model directory (what `mmjobs.models.tiny` writes), else the
`model.vqmodel.decoder.*` tensors of the model's own weights (Anole / Align-Anything
checkpoints). The codebook (`quantize.embedding`) and `post_quant_conv` come from the same file
when it has them, else from the loaded model. A fully fine-tuned or merged model is saved by
transformers without the decoder; point `vq_decoder` at the base model then (the image
tokenizer is frozen in every mmjobs training mode, so the base's decoder fits).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmjobs import storage
from mmjobs.logs import get_logger
from mmjobs.models.image_tokens import vocabulary_owner

if TYPE_CHECKING:
    from PIL import Image

log = get_logger(__name__)

DECODER_FILE = "vq_decoder.safetensors"
VQ_PREFIX = "model.vqmodel."


# --------------------------------------------------------------------------- VQ decoder


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.interpolate(hidden, scale_factor=2.0,
                                                         mode="nearest"))


class VQDecoder(nn.Module):
    """Chameleon's VQ-GAN decoder: quantized latents `[B, latent, h, w]` -> pixels `[B, 3, H, W]`.

    The mirror of transformers' `ChameleonVQVAEEncoder` (taming-transformers' `Decoder`), built
    from the same `ChameleonVQVAEConfig`, with the parameter names Anole / Align-Anything
    checkpoints use under `model.vqmodel.decoder.`: `conv_in`, `mid.{block_1,attn_1,block_2}`,
    `up.<level>.{block,attn,upsample}`, `norm_out`, `conv_out`. Output pixels are in the image
    processor's normalised range ([-1, 1] for Chameleon).
    """

    def __init__(self, config: Any, out_channels: int = 3) -> None:
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderAttnBlock as AttnBlock,
        )
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderResnetBlock as ResnetBlock,
        )

        super().__init__()
        multipliers = list(config.channel_multiplier)
        self.num_resolutions = len(multipliers)
        self.num_res_blocks = config.num_res_blocks
        block_in = config.base_channels * multipliers[-1]
        resolution = config.resolution // 2 ** (self.num_resolutions - 1)
        vanilla = config.attn_type == "vanilla"
        self.conv_in = nn.Conv2d(config.latent_channels, block_in, kernel_size=3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(config=config, in_channels=block_in, out_channels=block_in)
        self.mid.attn_1 = AttnBlock(block_in) if vanilla else nn.Identity()
        self.mid.block_2 = ResnetBlock(config=config, in_channels=block_in, out_channels=block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = config.base_channels * multipliers[level]
            for _ in range(self.num_res_blocks + 1):
                blocks.append(ResnetBlock(config=config, in_channels=block_in,
                                          out_channels=block_out))
                block_in = block_out
                if config.attn_resolutions and resolution in config.attn_resolutions and vanilla:
                    attns.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = blocks, attns
            if level != 0:
                up.upsample = _Upsample(block_in)
                resolution *= 2
            self.up.insert(0, up)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_in(hidden)
        hidden = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hidden)))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                hidden = block(hidden)
                if len(up.attn):
                    hidden = up.attn[i](hidden)
            if level != 0:
                hidden = up.upsample(hidden)
        hidden = self.norm_out(hidden)
        hidden = hidden * torch.sigmoid(hidden)
        return self.conv_out(hidden)


def find_decoder_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The VQ tensors of `source` under `model.vqmodel.`, prefix removed (`decoder.*`, and
    `quantize.embedding.weight` / `post_quant_conv.*` when present).

    `source`: a `.safetensors` file, or a model directory (local, `s3://` or a hub id) holding
    `vq_decoder.safetensors` or weights with `model.vqmodel.decoder.*` tensors. From S3 only
    the files holding decoder tensors are downloaded (verified against the manifest).

    Raises:
        FileNotFoundError: `source` has no decoder tensors (say where they are with the infer
            stage's `vq_decoder`).
    """
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in _decoder_files(str(source)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                name = key[len(VQ_PREFIX):] if key.startswith(VQ_PREFIX) else key
                if name.startswith(("decoder.", "quantize.", "post_quant_conv.")):
                    state.setdefault(name, f.get_tensor(key))
        if any(k.startswith("decoder.") for k in state):
            return state
    raise FileNotFoundError(
        f"{source}: no VQ decoder weights (looked for {DECODER_FILE} and {VQ_PREFIX}decoder.* "
        "tensors). transformers' Chameleon checkpoints (e.g. facebook/chameleon-7b) ship "
        "the VQ encoder only; use a checkpoint with the decoder (Anole, Align-Anything's "
        "AA-chameleon-7b-base) or set vq_decoder to a safetensors file holding it")


def _decoder_files(source: str) -> list[Path]:
    """Local safetensors files that may hold decoder tensors, most specific first."""
    if source.endswith(".safetensors"):
        if storage.is_s3(source):
            return [_fetch(source)]
        return [Path(storage.parse(source).key)]
    if storage.is_s3(source):
        return _s3_decoder_files(source)
    from mmjobs.models.model_dirs import resolve_model_dir

    root = resolve_model_dir(source)
    files = [root / DECODER_FILE] if (root / DECODER_FILE).is_file() else []
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files += [root / n for n in sorted({f for k, f in weight_map.items()
                                            if k.startswith(VQ_PREFIX + "decoder.")})]
    elif (root / "model.safetensors").is_file():
        files.append(root / "model.safetensors")
    return files


def _s3_decoder_files(source: str) -> list[Path]:
    names = []
    if storage.exists(storage.join(source, DECODER_FILE)):
        names.append(DECODER_FILE)
    index = storage.join(source, "model.safetensors.index.json")
    if storage.exists(index):
        weight_map = json.loads(storage.read_text(index))["weight_map"]
        names += sorted({f for k, f in weight_map.items()
                         if k.startswith(VQ_PREFIX + "decoder.")})
    elif storage.exists(storage.join(source, "model.safetensors")):
        names.append("model.safetensors")
    return [_fetch(storage.join(source, n)) for n in names]


def _fetch(uri: str) -> Path:
    """A verified local copy of one S3 file, cached by its manifest sha256 when committed."""
    from mmjobs import local_cache
    from mmjobs.models.model_dirs import committed_root

    folder, name = uri.rsplit("/", 1)
    entry = None
    try:
        _, rel, manifest = committed_root(folder)
        path = "/".join(p for p in (rel, name) if p)
        entry = next((e for e in manifest.files if e.path == path), None)
    except storage.StoreError:
        pass
    key = entry.sha256 if entry else hashlib.sha256(uri.encode()).hexdigest()

    def fill(scratch: Path) -> None:
        if entry is None:  # not in a committed directory: nothing to check it against
            storage.get_file(uri, scratch / name)
        else:
            local_cache.download_verified(folder, [storage.FileEntry(name, entry.size,
                                                                     entry.sha256)], scratch)

    def valid(cached: Path) -> bool:
        return (cached / name).is_file() and (
            entry is None or storage.sha256_file(cached / name) == entry.sha256)

    return local_cache.cached(local_cache.cache_root("vq-decoders") / key, fill,
                              valid=valid) / name


class ImageDecoder:
    """Image-code tokens -> PIL images, with a model's VQ codebook and decoder.

    Args:
        model: the loaded Chameleon (its `vqmodel` gives the codebook and `post_quant_conv`
            unless the decoder file has its own).
        processor: its processor (`image_seq_length`, and the image processor's
            normalisation, inverted to get pixels back).
        source: where the decoder weights are (see `find_decoder_weights`).
    """

    def __init__(self, model: nn.Module, processor: Any, source: str | Path) -> None:
        owner = vocabulary_owner(model)
        vq = owner.vqmodel
        config = vq.config
        state = find_decoder_weights(source)
        self.decoder = VQDecoder(config, out_channels=getattr(config, "out_channels", 3))
        missing, unexpected = self.decoder.load_state_dict(
            {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")},
            strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: VQ decoder weights do not match the model's vq_config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.embedding = nn.Embedding.from_pretrained(
            state.get("quantize.embedding.weight", vq.quantize.embedding.weight.detach()))
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.post_quant_conv.load_state_dict({
            "weight": state.get("post_quant_conv.weight", vq.post_quant_conv.weight.detach()),
            "bias": state.get("post_quant_conv.bias", vq.post_quant_conv.bias.detach())})
        # On the model's device (a 512x512 decode is slow on CPU), in float32.
        self.device = next(model.parameters()).device
        for module in (self.decoder, self.embedding, self.post_quant_conv):
            module.float().eval().requires_grad_(False).to(self.device)
        self.grid = config.resolution // 2 ** (len(config.channel_multiplier) - 1)
        self.codes_per_image = self.grid * self.grid
        seq = getattr(processor, "image_seq_length", self.codes_per_image)
        if seq != self.codes_per_image:
            raise ValueError(f"the processor puts {seq} tokens in an image but the VQ grid is "
                             f"{self.grid}x{self.grid}; they must match")
        mapping = owner.vocabulary_mapping
        table = torch.full((max(mapping.bpe2img) + 1,), -1, dtype=torch.long)
        for token, code in mapping.bpe2img.items():
            table[token] = code
        self.token_to_code = table
        ip = getattr(processor, "image_processor", None)
        self.mean = torch.tensor(_triple(getattr(ip, "image_mean", None), 1.0)).view(1, 3, 1, 1)
        self.std = torch.tensor(_triple(getattr(ip, "image_std", None), 1.0)).view(1, 3, 1, 1)
        self.scale = float(getattr(ip, "rescale_factor", None) or 1 / 127.5)

    @property
    def image_size(self) -> int:
        """Side of a decoded image in pixels (the VQ config's resolution)."""
        return self.grid * 2 ** (self.decoder.num_resolutions - 1)

    @torch.inference_mode()
    def pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N, codes_per_image]` token ids -> `[N, 3, H, W]` pixel values (processor range)."""
        tokens = tokens.cpu().long()
        if (tokens >= len(self.token_to_code)).any() or (tokens < 0).any():
            raise ValueError("an image span holds tokens that are not image codes")
        codes = self.token_to_code[tokens]
        if (codes < 0).any():
            raise ValueError("an image span holds tokens that are not image codes")
        latents = self.embedding(codes.to(self.device)).view(codes.shape[0], self.grid,
                                                             self.grid, -1)
        pixels = self.decoder(self.post_quant_conv(latents.permute(0, 3, 1, 2).contiguous()))
        return pixels.float().cpu()

    def images(self, tokens: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        """`[N, codes_per_image]` token ids -> N RGB images."""
        from PIL import Image

        out = []
        for start in range(0, tokens.shape[0], batch_size):
            values = self.pixels(tokens[start:start + batch_size])
            rgb = ((values * self.std + self.mean) / self.scale).round().clamp(0, 255)
            for array in rgb.to(torch.uint8).permute(0, 2, 3, 1).numpy():
                out.append(Image.fromarray(array, mode="RGB"))
        return out


def _triple(value: Any, default: float) -> list[float]:
    if value is None:
        return [default] * 3
    if isinstance(value, int | float):
        return [float(value)] * 3
    return [float(v) for v in value]
