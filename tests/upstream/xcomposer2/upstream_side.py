"""Run the upstream XComposer2 remote code (transformers 4.33 venv) on a random tiny config and
save its weights, inputs and logits to $UPSTREAM/out.pt (see README.md)."""

import os
import sys

import torch

UPSTREAM = os.environ.get("UPSTREAM", "/tmp/xc2-upstream")
sys.path[:0] = [UPSTREAM, f"{UPSTREAM}/stubs"]

from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

torch.manual_seed(0)
vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, image_size=336, patch_size=14,
                          projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
clip = CLIPVisionModel(vision)
clip.save_pretrained(f"{UPSTREAM}/tiny-clip")
original_positions = clip.vision_model.embeddings.position_embedding.weight.detach().clone()

from ixc2.configuration_internlm_xcomposer2 import InternLMXcomposer2Config  # noqa: E402
from ixc2.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM  # noqa: E402

config = InternLMXcomposer2Config(
    vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
    rms_norm_eps=1e-5, bias=False, rope_theta=1000000,
    rope_scaling={"type": "dynamic", "factor": 1.0}, pad_token_id=2, img_size=490,
    max_length=4096, attn_implementation="eager", use_cache=False)
torch.manual_seed(1)
model = InternLMXComposer2ForCausalLM(config).eval()  # builds the ViT and runs resize_pos()
image = torch.randn(1, 3, 490, 490)
bos, text = torch.tensor([[1]]), torch.tensor([[11, 12, 13, 14, 15, 16, 17]])
with torch.no_grad():
    image_embeds = model.img2emb(image)[0]
    embeds = torch.cat([model.model.tok_embeddings(bos), image_embeds,
                        model.model.tok_embeddings(text)], 1)
    im_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    im_mask[:, 1:1 + image_embeds.shape[1]] = True  # ChartMoE's eval: image right after BOS
    logits = model(inputs_embeds=embeds, im_mask=im_mask).logits
    text_only = model(inputs_embeds=model.model.tok_embeddings(torch.cat([bos, text], 1)),
                      im_mask=torch.zeros(1, 8, dtype=torch.bool)).logits
torch.save({"state_dict": model.state_dict(), "orig_pos": original_positions, "image": image,
            "ids": (bos, text), "logits": logits, "text_only": text_only},
           f"{UPSTREAM}/out.pt")
print("image positions", image_embeds.shape[1], "logits", tuple(logits.shape))
