"""No silent loss in `mmjobs prepare`: malformed JSON arrays through the real CLI (exit status,
the one-line message, counts, nothing committed on failure), the same through the S3 test
server, the acceptance gaps (`<image>` outside user turns, NFC/NFD ids) and a 16-bit PNG from
the converter through pre-tokenization to the training loader."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmjobs import storage
from mmjobs.data.loader import ShardDataset
from mmjobs.data.records import MalformedInputError
from mmjobs.stages.prepare import PrepareConfig, main
from mmjobs.stages.pretokenize import PretokenizeConfig
from mmjobs.stages.pretokenize import main as pretokenize
from tests.integration.data.test_prepare_stage import REPO, assert_committed_and_reconciled, jsonl

pytestmark = pytest.mark.integration
N, K = 200, 137  # one bad row of 200 is 0.5%: under the default max_reject_fraction of 1%


def llava_rows(n: int = N) -> list[dict]:
    return [{"id": f"r{i}", "note": "é" * (i % 3),
             "conversations": [{"from": "human", "value": f"Question {i}?"},
                               {"from": "gpt", "value": f"Answer {i}."}]} for i in range(n)]


def mix_json(edit: tuple[str, str] | None = None, tail: str = "") -> str:
    text = json.dumps(llava_rows(), ensure_ascii=False, indent=1)
    if edit:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1], 1)
    return text + tail


ROW_K = f'{{\n  "id": "r{K}"'  # where row K starts in `mix_json()`
ID_K = f'"id": "r{K}"'
NAN = (f'"id": "r{K}",', f'"id": "r{K}", "score": NaN,')
SYNTAX = (f'"id": "r{K}",', f'"id": "r{K}", "score": ,')


def row_k_offset(text: str) -> int:
    return len(text[:text.index(ROW_K)].encode())


def cli(*args: str) -> subprocess.Popen:
    """`mmjobs prepare ...` (the console script's entry point) in a child process."""
    return subprocess.Popen([sys.executable, "-m", "mmjobs.cli", "prepare", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_cli_recovers_bad_rows_and_fails_broken_files(tmp_path):
    inputs = {
        "nan": mix_json(NAN),
        "syntax": mix_json(SYNTAX),
        "truncated": mix_json()[:mix_json().index(ID_K) + 12],
        "appended": mix_json(tail='\n[{"id": "r200", "conversations": []}]'),
    }
    # An earlier, good run committed the output the truncated input's run will write to.
    (tmp_path / "good.json").write_text(mix_json(), encoding="utf-8")
    main(PrepareConfig(source_format="llava", input=str(tmp_path / "good.json"),
                       output=str(tmp_path / "out/truncated")))
    assert storage.is_committed(str(tmp_path / "out/truncated"))
    procs = {}
    for name, text in inputs.items():  # four CLIs at once: each spends seconds importing
        (tmp_path / name).mkdir()
        (tmp_path / name / "mix.json").write_text(text, encoding="utf-8")
        procs[name] = cli("--from", "llava", "--input", str(tmp_path / name / "mix.json"),
                          "--output", str(tmp_path / "out" / name))
    results = {name: finish(proc) for name, proc in procs.items()}

    for name in ("nan", "syntax"):  # a bad row: rejected, every other row read, exit 0
        code, out, err = results[name]
        assert code == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert (result["rows_in"], result["accepted"], result["rejected"]) == (N, N - 1, 1)
        assert result["by_reason"] == {"invalid_json": 1}
        dest = str(tmp_path / "out" / name)
        assert_committed_and_reconciled(dest, N, N - 1)
        assert [s["id"] for s in jsonl(storage.join(dest, "samples.jsonl"))] == \
            [f"r{i}" for i in range(N) if i != K]
        [reject] = jsonl(storage.join(dest, "rejects.jsonl"))
        assert reject["row"] == f"mix.json[{K}]"
    assert jsonl(str(tmp_path / "out/nan/rejects.jsonl"))[0]["reason"].startswith(
        "invalid_json: invalid JSON: NaN is not allowed in JSON")
    at = len(inputs["syntax"][:inputs["syntax"].index('"score": ,') + 9].encode())
    assert jsonl(str(tmp_path / "out/syntax/rejects.jsonl"))[0]["reason"].startswith(
        f"invalid_json: invalid JSON: Expecting value at byte {at} (line ")

    code, out, err = results["truncated"]  # the rest cannot be counted: fail, commit nothing
    path = tmp_path / "truncated" / "mix.json"
    assert code == 1 and out == ""
    line = inputs["truncated"][:inputs["truncated"].index(ROW_K)].count("\n")
    assert err.strip().splitlines()[-1] == (
        f"mmjobs prepare: {path}: the file ends inside mix.json[{K}] at byte "
        f"{row_k_offset(inputs['truncated'])} (line {line + 1}, column 2); it looks truncated "
        "(or a string or bracket is not closed); re-download or re-copy it")
    assert "Traceback" not in err
    assert not storage.is_committed(str(tmp_path / "out/truncated")), \
        "the earlier output must not look current after a failed re-run"

    code, out, err = results["appended"]
    assert code == 1 and "Traceback" not in err
    assert (f"mix.json: data after the array's closing ']' ('[{{\"id\": \"r200\", \"con'; "
            f"{N} rows before it) at byte {len(mix_json().encode()) + 1} (line ") in err
    assert not (tmp_path / "out/appended").exists()


def test_s3_input_nan_row_recovered_and_truncated_file_fails(s3_bucket):
    raw = f"s3://{s3_bucket}/raw/mix.json"
    storage.write_text(raw, mix_json(NAN))
    out = f"s3://{s3_bucket}/prepared/mix"
    result = main(PrepareConfig(source_format="llava", input=raw, output=out))
    assert (result.rows_in, result.accepted, result.rejected) == (N, N - 1, 1)
    assert_committed_and_reconciled(out, N, N - 1)

    cut = mix_json()[:mix_json().index(ID_K) + 12]
    raw = f"s3://{s3_bucket}/raw/mix-cut.json"
    storage.write_text(raw, cut)
    with pytest.raises(MalformedInputError) as e:
        main(PrepareConfig(source_format="llava", input=raw, output=out))
    assert f"{raw}: the file ends inside mix-cut.json[{K}] at byte {row_k_offset(cut)} " in \
        str(e.value)
    assert not storage.is_committed(out)


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def test_image_outside_user_turns_and_nfc_nfd_ids_are_rejected(tmp_path):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    ok = [{"id": f"ok{i}", "image": "a.png",
           "conversations": [turn("human", "<image>\nWhat colour?"), turn("gpt", "Dark.")]}
          for i in range(4)]
    rows = [*ok,
            {"id": "in-answer", "image": ["a.png", "a.png"],
             "conversations": [turn("human", "<image>\nCopy it."), turn("gpt", "<image>")]},
            {"id": "in-system", "image": "a.png",
             "conversations": [turn("system", "Look: <image>"), turn("human", "Q?"),
                               turn("gpt", "A.")]},
            {"id": "caf\u00e9", "conversations": [turn("human", "Q?"), turn("gpt", "A.")]},
            {"id": "cafe\u0301", "conversations": [turn("human", "Q?"), turn("gpt", "A.")]}]
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "out"
    result = main(PrepareConfig(source_format="llava", input=str(tmp_path / "rows.json"),
                                output=str(out), max_reject_fraction=0.5))
    assert (result.rows_in, result.accepted) == (8, 5)
    assert result.by_reason == {"placeholder_in_non_user_turn": 2, "duplicate_id": 1}
    reasons = {r["row"]: r["reason"] for r in jsonl(str(out / "rejects.jsonl"))}
    assert reasons["in-answer"].startswith("placeholder_in_non_user_turn: conversations[1] "
                                           "(assistant) holds <image>")
    assert reasons["in-system"].startswith("placeholder_in_non_user_turn: conversations[0] "
                                           "(system) holds <image>")
    assert reasons["cafe\u0301"] == (
        "duplicate_id: id 'cafe\\u0301' equals 'caf\\xe9' of row 7 after Unicode NFC "
        "normalisation (the same text in another Unicode form)")

    # A dataset of an image-generating model may keep images in answers, when it says so.
    again = main(PrepareConfig(source_format="llava", input=str(tmp_path / "rows.json"),
                               output=str(tmp_path / "out2"), max_reject_fraction=0.5,
                               images_in_responses=True))
    assert again.by_reason == {"placeholder_in_non_user_turn": 1, "duplicate_id": 1}


def test_16bit_png_gradient_survives_converter_pretokenize_and_loader(tmp_path, tiny_llava_dir):
    ramp = np.linspace(0, 65535, 56).round().astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.tile(ramp, (56, 1))).save(buf, "PNG")  # mode I;16, full range
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw/deep.png").write_bytes(buf.getvalue())
    rows = [{"id": "deep", "image": "deep.png",
             "conversations": [turn("human", "<image>\nDescribe it."),
                               turn("gpt", "A gradient.")]}]
    (tmp_path / "raw/rows.json").write_text(json.dumps(rows), encoding="utf-8")

    prepared = main(PrepareConfig(source_format="llava", input=str(tmp_path / "raw/rows.json"),
                                  output=str(tmp_path / "prepared")))
    assert (prepared.accepted, prepared.rejected) == (1, 0)
    shards = pretokenize(PretokenizeConfig(dataset=prepared.output, model=str(tiny_llava_dir),
                                           cache_root=str(tmp_path / "cache")))
    sample = ShardDataset(shards.output, cache_dir=tmp_path / "shard-cache")[0]

    pixels = np.asarray(sample["images"][0])
    expected = ((ramp.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert pixels.shape == (56, 56, 3)
    assert (pixels == expected[None, :, None]).all()
    assert pixels.min() == 0 and pixels.max() == 255  # not clipped to white
