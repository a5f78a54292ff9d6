"""Meta's consolidated.*.pth + params.json -> transformers Llama: faithful, safe, clear errors.

Faithfulness is shown on logits: the replica's Meta checkpoint is run by `meta_forward`, a
forward pass written here from Meta's reference model (interleaved-pair RoPE as complex
numbers, RMSNorm, SwiGLU, causal attention), and compared with transformers' LlamaForCausalLM
on the converted directory. The rotary permutation is what makes them agree (checked by
leaving it out).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from mmjobs.models.convert.checkpoints import ConversionError, UnsafeCheckpointError
from mmjobs.models.convert.meta_llama import (
    convert_meta_llama,
    is_meta_llama,
    permute_rotary,
    size_folder,
)
from mmjobs.models.replicas.lavin import build_meta_llama


def meta_forward(weights: dict[str, torch.Tensor], params: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits `[B, T, V]` of Meta's LLaMA reference model (llama/model.py), in float64 except
    where Meta's code itself computes in float32 (rotary angles, RMSNorm, softmax)."""
    w = {k: v.double() for k, v in weights.items()}
    dim, heads, eps = params["dim"], params["n_heads"], params["norm_eps"]
    head_dim = dim // heads
    seq = ids.shape[1]
    # Meta's precompute_freqs_cis works in float32 (complex64), as transformers' rotary
    # embedding does; only the rest of the forward is promoted to float64.
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq).float(), freqs)
    # Meta writes torch.polar(1, angles); cos/sin are the same numbers, except that polar can
    # differ in the last float32 bit, which would hide an exact match behind a ~1e-7 error.
    rot = torch.complex(angles.cos(), angles.sin()).to(torch.complex128)  # [T, head_dim/2]

    def rms(x, weight):  # Meta's RMSNorm normalises in float32 (`x.float()`), as does HF's
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).double() * weight

    def rope(x):  # [B, T, H, head_dim]: consecutive pairs are complex numbers
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * rot[None, :, None]).flatten(3)

    h = w["tok_embeddings.weight"][ids]
    mask = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, w[p + "attention_norm.weight"])
        q, k, v = (x @ w[p + f"attention.w{n}.weight"].T for n in "qkv")
        q, k, v = (t.view(*t.shape[:2], heads, head_dim) for t in (q, k, v))
        q, k = rope(q), rope(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim) + mask
        probs = scores.float().softmax(-1).double()  # Meta: F.softmax(scores.float())
        att = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*h.shape)
        h = h + att @ w[p + "attention.wo.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(x @ w[p + "feed_forward.w1.weight"].T)
        h = h + (gate * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms(h, w["norm.weight"]) @ w["output.weight"].T


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "weights"
    out.mkdir()
    build_meta_llama(out, seed=3)
    return out


def _hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                             attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_converted_logits_equal_the_meta_forward(meta_dir, tmp_path):
    src = meta_dir / "7B"
    params = json.loads((src / "params.json").read_text())
    summary = convert_meta_llama(src, tmp_path / "hf")
    assert summary["vocab_size"] == 32000  # params.json says -1: from the tokenizer
    assert summary["dropped"] == ["rope.freqs"]
    weights = torch.load(src / "consolidated.00.pth", weights_only=True)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278]])
    expected = meta_forward(weights, params, ids)
    got = _hf_logits(tmp_path / "hf", ids)
    assert got.shape == expected.shape == (1, 10, 32000)
    # fp16 weights computed in float64 both ways: only summation order differs.
    assert torch.allclose(got, expected, atol=1e-9, rtol=1e-9), (got - expected).abs().max()


def test_without_the_rotary_permutation_logits_differ(meta_dir, tmp_path, monkeypatch):
    """The q/k row permutation is needed (so the test above can fail)."""
    import mmjobs.models.convert.meta_llama as meta_llama

    monkeypatch.setattr(meta_llama, "permute_rotary", lambda weight, heads: weight)
    src = meta_dir / "7B"
    convert_meta_llama(src, tmp_path / "hf")
    weights = torch.load(src / "consolidated.00.pth", weights_only=True)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916]])
    expected = meta_forward(weights, json.loads((src / "params.json").read_text()), ids)
    assert (_hf_logits(tmp_path / "hf", ids) - expected)[:, 1:].abs().max() > 1e-4


def test_permutation_is_per_head_halves():
    # One head of width 4: Meta's rows (r0 r1)(r2 r3) pair up as complex numbers; transformers
    # rotates halves, so the rows become r0 r2 | r1 r3.
    weight = torch.arange(8.0).view(4, 2)
    assert permute_rotary(weight, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]


def test_two_model_parallel_shards_merge_like_one(meta_dir, tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    build_meta_llama(two, seed=3, shards=2)
    assert sorted(p.name for p in (two / "7B").glob("*.pth")) == [
        "consolidated.00.pth", "consolidated.01.pth"]
    one_summary = convert_meta_llama(meta_dir / "7B", tmp_path / "one-hf")
    two_summary = convert_meta_llama(two / "7B", tmp_path / "two-hf")
    assert two_summary["shards"] == ["consolidated.00.pth", "consolidated.01.pth"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one-hf" / one_summary["weight_files"][0]))
    b = load_file(str(tmp_path / "two-hf" / two_summary["weight_files"][0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_matches_sentencepiece(meta_dir, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    convert_meta_llama(meta_dir / "7B", tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(meta_dir / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("Image: ", "Image: N/A", "Question: Which is a compound?\nContext: N/A\n"
                 "Options: (A) O2 (B) H2O\nResponse:The answer is B. BECAUSE: 12 atoms"):
        assert tok(text)["input_ids"] == [1, *sp.encode(text)], text


def test_refuses_a_pickle_that_runs_code(meta_dir, tmp_path):
    src = tmp_path / "7B"
    shutil.copytree(meta_dir / "7B", src)
    shutil.copyfile(meta_dir / "tokenizer.model", tmp_path / "tokenizer.model")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (src / "consolidated.00.pth").write_bytes(pickle.dumps({"tok_embeddings.weight": Payload()}))
    with pytest.raises(UnsafeCheckpointError, match=r"consolidated\.00\.pth: refused"):
        convert_meta_llama(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "params.json").unlink(), "params.json: missing"),
    (lambda d: (d / "params.json").write_text("[1]"), "not an object"),
    (lambda d: (d / "params.json").write_text('{"dim": 64}'), "missing n_layers, n_heads"),
    (lambda d: (d / "params.json").write_text(json.dumps({**json.loads(
        (d / "params.json").read_text()), "n_layers": 3})), "does not match params.json's 3"),
    (lambda d: (d / "consolidated.00.pth").rename(d / "consolidated.01.pth"),
     r"shard numbers \[1\]"),
    (lambda d: (d.parent / "tokenizer.model").unlink(), "no tokenizer.model"),
])
def test_bad_inputs_are_named(meta_dir, tmp_path, change, message):
    root = tmp_path / "weights"
    shutil.copytree(meta_dir, root)
    change(root / "7B")
    with pytest.raises(ConversionError, match=message):
        convert_meta_llama(root / "7B", tmp_path / "out")


def test_detects_the_layout(meta_dir, tmp_path):
    assert size_folder(meta_dir / "7B") == meta_dir / "7B"
    assert size_folder(meta_dir) == meta_dir / "7B"  # <weights>: tokenizer.model + one size
    shutil.copytree(meta_dir / "7B", tmp_path / "7B")  # without a tokenizer.model above it
    assert not is_meta_llama(tmp_path) and not is_meta_llama(tmp_path / "missing")


def test_the_convert_stage_detects_the_weights_folder_and_commits(replica_dir, tmp_path):
    """`mmjobs stage convert` on LaVIN's `<weights>` folder (tokenizer.model + 7B/): kind auto
    finds Meta's layout; the committed model loads with AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    from mmjobs import storage
    from mmjobs.stages import convert as stage

    out = tmp_path / "store" / "llama"
    result = stage.main(stage.ConvertConfig(source=str(replica_dir("meta/llama-7b")),
                                            to=str(out)))
    assert (result.kind, result.cached) == ("meta_llama", False)
    assert storage.read_manifest(out).meta["conversion"]["shards"] == ["consolidated.00.pth"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float16
    assert not list(out.glob("*.pth")) and not list(out.glob("*.bin"))


def test_the_convert_stage_builds_a_lavin(replica_dir, lavin_model_dir, tmp_path):
    """kind lavin: the Meta-format LLaMA + the 224 px CLIP -> the LaVIN `build_lavin` writes
    (same seed, same tensors); lavin-sweep's conversions.lavin step. Without a CLIP it says so."""
    from mmjobs import storage
    from mmjobs.models.convert.checkpoints import load_checkpoint_dir
    from mmjobs.stages import convert as stage

    out = tmp_path / "store" / "lavin"
    result = stage.main(stage.ConvertConfig(
        source=str(replica_dir("meta/llama-7b")), kind="lavin", seed=1, dtype="float32",
        vision_tower=str(replica_dir("openai/clip-vit-large-patch14")), to=str(out)))
    assert (result.kind, result.cached) == ("lavin", False) and storage.is_committed(str(out))
    built, expected = load_checkpoint_dir(out), load_checkpoint_dir(lavin_model_dir)
    assert built.keys() == expected.keys() and result.tensors == len(expected)
    assert all(torch.equal(built[k], expected[k]) for k in expected)
    with pytest.raises(ConversionError, match="kind lavin needs vision_tower"):
        stage.main(stage.ConvertConfig(source=str(replica_dir("meta/llama-7b")), kind="lavin",
                                       to=str(tmp_path / "no-clip")))
