"""Load $UPSTREAM/out.pt (from upstream_side.py) into mmjobs' native XComposer2 and print how
far its logits are from the upstream ones (see README.md)."""

import json
import os

import torch

from mmjobs.models.xcomposer2 import register
from mmjobs.models.xcomposer2.configuration import XComposer2Config
from mmjobs.models.xcomposer2.convert import POSITION_KEY, interpolate_positions
from mmjobs.models.xcomposer2.modeling import XComposer2ForCausalLM

register()
ref = torch.load(f"{os.environ.get('UPSTREAM', '/tmp/xc2-upstream')}/out.pt", weights_only=True)
config = XComposer2Config(
    vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, img_size=490,
    vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 2},
    plora_r=256, plora_alpha=256, attn_implementation="eager")
model = XComposer2ForCausalLM(config).eval()
state = {k: v for k, v in ref["state_dict"].items() if not k.endswith("position_ids")}
missing, unexpected = model.load_state_dict(state, strict=False)
result = {"missing": missing, "unexpected": unexpected,
          "positions_max_diff": (interpolate_positions(ref["orig_pos"], 35)
                                 - state[POSITION_KEY]).abs().max().item()}
bos, text = ref["ids"]
ids = torch.cat([bos, torch.full((1, 1225), config.image_token_id), text], 1)
for implementation in ("eager", "sdpa"):
    model.config._attn_implementation = implementation
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=ref["image"], use_cache=False).logits
        text_only = model(input_ids=torch.cat([bos, text], 1), use_cache=False).logits
    result[implementation] = {
        "max_diff": (logits - ref["logits"]).abs().max().item(),
        "logit_scale": ref["logits"].abs().max().item(),
        "text_only_max_diff": (text_only - ref["text_only"]).abs().max().item(),
        "same_argmax": bool(torch.equal(logits.argmax(-1), ref["logits"].argmax(-1)))}
print(json.dumps(result, indent=1))
