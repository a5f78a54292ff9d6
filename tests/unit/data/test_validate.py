"""Validation with quarantine: one test per bad input, asserting the exact reason, plus the
bookkeeping (counts reconcile, images are opened once, reader errors become rejects)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mmjobs.data import records
from mmjobs.data.records import PreferenceSample, PromptSample, RawRow, Reject, Sample
from mmjobs.data.validate import (
    REASONS,
    TOO_LONG,
    Validator,
    normalize_reason,
    reason,
    reason_code,
)


def png_bytes(size: tuple[int, int] = (16, 16), noise: bool = True) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30))
    if noise:  # incompressible pixels, so cutting the file really cuts image data
        image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR (with a correct CRC) claims `width` x `height`."""
    data = bytearray(png_bytes())
    ihdr = data[8:33]  # length(4) "IHDR"(4) fields(13) crc(4)
    ihdr[8:16] = struct.pack(">II", width, height)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return bytes(data[:8] + ihdr + data[33:])


def sample(id: str = "s1", images: tuple[str, ...] = ("good.png",), *,
           conversations: list[dict] | None = None) -> Sample:
    marks = "<image>\n" * len(images)
    turns = conversations or [{"role": "user", "content": f"{marks}What is shown?"},
                              {"role": "assistant", "content": "A red square."}]
    return Sample(id=id, images=list(images), conversations=turns)


def turns(*roles_and_texts: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in roles_and_texts]


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "good.png").write_bytes(png_bytes())
    return root


def check_one(root: Path, item, **kwargs) -> Sample | Reject:
    v = Validator(root, **kwargs)
    result = v.check(item)
    assert v.stats.rows == v.stats.accepted + v.stats.rejected == 1
    return result


def assert_reject(result, expected_reason: str, row: str = "s1") -> None:
    assert isinstance(result, Reject), f"expected a reject, got {result!r}"
    assert (result.row, result.reason) == (row, expected_reason)


# --------------------------------------------------------------------------- good input


def test_good_sample_is_accepted(root):
    record = sample()
    assert check_one(root, record) is record


def test_text_only_sample_needs_no_images(root):
    record = sample(images=())
    assert check_one(root, record) is record


# --------------------------------------------------------------------------- images


def test_image_with_no_defined_8bit_scale_is_rejected(root):
    Image.new("F", (4, 4), 0.5).save(root / "float.tif")
    assert_reject(check_one(root, sample(images=("float.tif",))),
                  "image_unsupported_mode: float.tif: 32-bit floating-point samples (mode F) "
                  "have no defined brightness range; save the image as 8- or 16-bit PNG")


def test_16_bit_png_is_accepted(root):
    Image.new("I;16", (4, 4), 40000).save(root / "deep.png")
    record = sample(images=("deep.png",))
    assert check_one(root, record) is record


def test_image_missing(root):
    result = check_one(root, sample(images=("images/x.png",)))
    assert_reject(result, f"image_missing: images/x.png does not exist under {root}")


def test_image_zero_bytes(root):
    (root / "empty.png").write_bytes(b"")
    assert_reject(check_one(root, sample(images=("empty.png",))),
                  f"image_empty: empty.png is 0 bytes under {root}")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_truncated(root, fmt):
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buf, fmt)
    (root / "cut.img").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    result = check_one(root, sample(images=("cut.img",)))
    assert isinstance(result, Reject)
    assert result.reason.startswith("image_truncated: cut.img is truncated (")
    assert result.reason.endswith("); re-download or re-copy it")


def test_image_not_an_image(root):
    (root / "noise.png").write_bytes(os.urandom(2048))
    assert_reject(check_one(root, sample(images=("noise.png",))),
                  "image_corrupt: noise.png is not an image (PIL cannot identify its format)")


def test_image_header_over_pixel_limit_rejected_before_decoding(root):
    # The file is a few hundred bytes; decoding 8000x8000 would need 192 MB.
    (root / "bomb.png").write_bytes(png_claiming(8000, 8000))
    assert_reject(check_one(root, sample(images=("bomb.png",))),
                  "image_too_large: bomb.png is 8000x8000 = 64,000,000 pixels > "
                  "max_image_pixels 40,000,000")


def test_image_pixel_limit_is_an_option(root):
    assert_reject(check_one(root, sample(), max_image_pixels=100),
                  "image_too_large: good.png is 16x16 = 256 pixels > max_image_pixels 100")


def test_image_over_pils_own_limit(root):
    (root / "huge.png").write_bytes(png_claiming(100_000, 100_000))
    result = check_one(root, sample(images=("huge.png",)), max_image_pixels=10**12)
    assert isinstance(result, Reject)
    assert result.reason.startswith("image_too_large: huge.png: Image size (10000000000 pixels)")
    assert Image.MAX_IMAGE_PIXELS is not None  # never disabled globally


def test_image_symlink_outside_root(root, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    (root / "link.png").symlink_to(outside)
    assert_reject(check_one(root, sample(images=("link.png",))),
                  f"image_path_unsafe: link.png resolves to {outside}, outside the image root "
                  f"{root} (a symlink out of the dataset)")


def test_image_symlink_inside_root_is_fine(root):
    (root / "alias.png").symlink_to(root / "good.png")
    assert isinstance(check_one(root, sample(images=("alias.png",))), Sample)


def test_image_dotdot_path(root, tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes())  # exists, but outside the root
    assert_reject(check_one(root, sample(images=("../x.png",))),
                  f"image_path_unsafe: '../x.png' contains '..'; image paths must be relative "
                  f"to the image root {root}")


def test_image_absolute_path(root):
    path = str(root / "good.png")
    assert_reject(check_one(root, sample(images=(path,))),
                  f"image_path_unsafe: {path!r} is absolute; image paths must be relative to "
                  f"the image root {root}")


def test_image_uri_path(root):
    assert_reject(check_one(root, sample(images=("s3://other/x.png",))),
                  "image_path_unsafe: 's3://other/x.png' is a URI; image paths must be "
                  f"relative to the image root {root}")


def test_no_image_root(tmp_path):
    assert_reject(check_one(None, sample()),
                  "image_missing: good.png: the dataset has no image root configured")


def test_each_image_is_opened_once(root, monkeypatch):
    calls: list[str] = []
    original = Validator._check_image

    def counting(self, path):
        calls.append(path)
        return original(self, path)

    monkeypatch.setattr(Validator, "_check_image", counting)
    v = Validator(root, workers=2)
    items = [sample(f"s{i}") for i in range(6)] + [sample("m", images=("missing.png",)),
                                                   sample("m2", images=("missing.png",))]
    out = list(v.run(items, batch_size=3))
    assert sorted(calls) == ["good.png", "missing.png"]
    assert [type(x).__name__ for x in out] == ["Sample"] * 6 + ["Reject"] * 2
    assert [x.id if isinstance(x, Sample) else x.row for x in out] == \
        [f"s{i}" for i in range(6)] + ["m", "m2"]


# --------------------------------------------------------------------------- placeholders


def test_more_placeholders_than_images(root):
    record = sample(conversations=turns(("user", "<image> and <image>?"), ("assistant", "two")))
    assert_reject(check_one(root, record), "placeholder_mismatch: 2 <image> placeholders for "
                                           "1 image")


def test_images_without_placeholder(root):
    record = sample(conversations=turns(("user", "What is shown?"), ("assistant", "a square")))
    assert_reject(check_one(root, record), "placeholder_mismatch: 0 <image> placeholders for "
                                           "1 image")


def test_placeholder_without_image(root):
    record = sample(images=(), conversations=turns(("user", "<image>?"), ("assistant", "no")))
    assert_reject(check_one(root, record), "placeholder_mismatch: 1 <image> placeholder for "
                                           "0 images")


@pytest.mark.parametrize("role, where", [("assistant", "conversations[1] (assistant)"),
                                         ("system", "conversations[0] (system)")])
def test_placeholder_in_assistant_or_system_turn(root, role, where):
    conversation = turns(("user", "<image>\nWhat is it?"), ("assistant", "This: <image>")) \
        if role == "assistant" else turns(("system", "Look at <image>."), ("user", "Q?"),
                                          ("assistant", "A."))
    record = sample(images=("good.png", "good.png") if role == "assistant" else ("good.png",),
                    conversations=conversation)
    hint = " (set images_in_responses=true only if the model generates images)" \
        if role == "assistant" else ""
    assert_reject(check_one(root, record), f"placeholder_in_non_user_turn: {where} holds "
                                           f"<image>; images go in user turns{hint}")


def test_images_in_responses_allow_assistant_but_never_system_turns(root):
    record = sample(images=("good.png", "good.png"), conversations=turns(
        ("user", "<image>\nDraw it again."), ("assistant", "Here: <image>")))
    assert check_one(root, record, images_in_responses=True) is record
    system = sample(conversations=turns(("system", "<image>"), ("user", "Q?"), ("assistant", "A")))
    assert_reject(check_one(root, system, images_in_responses=True),
                  "placeholder_in_non_user_turn: conversations[0] (system) holds <image>; "
                  "images go in user turns")


def test_placeholder_in_a_prompts_assistant_turn(root):
    prompt = PromptSample(id="s1", images=["good.png"], prompt=turns(
        ("user", "Q?"), ("assistant", "See <image>"), ("user", "And?")))
    assert_reject(check_one(root, prompt, kind="prompt"), "placeholder_in_non_user_turn: "
                  "prompt[1] (assistant) holds <image>; images go in user turns (set "
                  "images_in_responses=true only if the model generates images)")


# --------------------------------------------------------------------------- conversations


def test_empty_conversation(root):
    record = Sample(id="s1", images=[], conversations=[])
    assert_reject(check_one(root, record), "empty_conversation: conversations has no turns")


def test_only_system_turn(root):
    record = sample(images=(), conversations=turns(("system", "Be brief.")))
    assert_reject(check_one(root, record),
                  "empty_conversation: conversations has only a system turn")


@pytest.mark.parametrize("roles,expected", [
    (("user", "user", "assistant"), "non_alternating: conversations[1] is 'user', expected "
     "'assistant' (turns must alternate user/assistant starting with user)"),
    (("assistant", "user"), "non_alternating: conversations[0] is 'assistant', expected 'user' "
     "(turns must alternate user/assistant starting with user)"),
    (("system", "assistant"), "non_alternating: conversations[1] is 'assistant', expected "
     "'user' (turns must alternate user/assistant starting with user)"),
    (("user", "system", "assistant"), "non_alternating: conversations[1] is 'system', expected "
     "'assistant' (a system turn may only come first)"),
    (("user", "assistant", "user"), "non_alternating: conversations ends with a 'user' turn; "
     "it must end with 'assistant'"),
])
def test_non_alternating(root, roles, expected):
    record = sample(images=(), conversations=turns(*[(r, "text") for r in roles]))
    assert_reject(check_one(root, record), expected)


def test_system_then_alternating_is_fine(root):
    record = sample(images=(), conversations=turns(("system", "s"), ("user", "q"),
                                                   ("assistant", "a"), ("user", "q2"),
                                                   ("assistant", "a2")))
    assert check_one(root, record) is record


def test_empty_assistant(root):
    record = sample(images=(), conversations=turns(("user", "q"), ("assistant", " \n")))
    assert_reject(check_one(root, record), "empty_assistant: conversations[1] (assistant) is "
                                           "empty")


def test_prompt_and_preference_kinds(root):
    prompt = PromptSample(id="p1", images=["good.png"],
                          prompt=[{"role": "user", "content": "<image>Describe."}])
    assert check_one(root, prompt, kind="prompt") is prompt
    pref = PreferenceSample(id="s1", images=[], prompt=[{"role": "user", "content": "Q?"}],
                            chosen="yes", rejected="")
    assert_reject(check_one(root, pref, kind="preference"),
                  "empty_assistant: rejected response is empty")
    pref = PreferenceSample(id="s1", images=[], prompt=[{"role": "user", "content": "Draw."}],
                            chosen="<image>", rejected="no", chosen_images=[])
    assert_reject(check_one(root, pref, kind="preference"),
                  "placeholder_mismatch: chosen has 1 <image> placeholder for 0 images")


# --------------------------------------------------------------------------- rows and ids


def test_duplicate_ids(root):
    v = Validator(root)
    results = [v.check(sample(i)) for i in ("a", "b", "a", "a")]
    assert [type(r).__name__ for r in results] == ["Sample", "Sample", "Reject", "Reject"]
    assert results[2] == Reject("a", "duplicate_id: first seen at row 1", "validate")
    assert results[3].reason == "duplicate_id: first seen at row 1"
    assert (v.stats.accepted, v.stats.rejected) == (2, 2)


def test_ids_equal_after_nfc_are_duplicates_naming_both_forms(root):
    v = Validator(root)
    nfc, nfd = "caf\u00e9-1", "cafe\u0301-1"  # "café-1" precomposed, and e + combining accent
    results = [v.check(sample(i, images=())) for i in (nfc, "other", nfd)]
    assert [type(r).__name__ for r in results] == ["Sample", "Sample", "Reject"]
    assert results[2] == Reject(nfd, "duplicate_id: id 'cafe\\u0301-1' equals 'caf\\xe9-1' of "
                                     "row 1 after Unicode NFC normalisation (the same text in "
                                     "another Unicode form)", "validate")
    # The other way round (NFD first) is caught the same way.
    v = Validator(root)
    assert isinstance(v.check(sample(nfd, images=())), Sample)
    assert v.check(sample(nfc, images=())).reason.startswith("duplicate_id: id 'caf\\xe9-1' "
                                                             "equals 'cafe\\u0301-1' of row 1")


def test_invalid_utf8_line_in_jsonl(root, tmp_path):
    good = sample("ok").model_dump_json().encode()
    bad = b'{"id": "bad", "text": "caf\xe9"}'
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + b"{not json\n" + b"[1, 2]\n")
    v = Validator(root)
    out = list(v.run(records.iter_jsonl(path)))
    assert isinstance(out[0], Sample)
    assert out[1] == Reject("data.jsonl:2", "invalid_utf8: invalid UTF-8 at byte 26")
    assert out[2].row == "data.jsonl:3" and out[2].reason.startswith("invalid_json: invalid JSON")
    assert out[3] == Reject("data.jsonl:4", "invalid_record: expected a JSON object, got list",
                            "validate")


def test_dict_that_is_not_a_record(root):
    result = check_one(root, {"id": "d1", "conversations": [{"role": "bot", "content": "x"}]})
    assert isinstance(result, Reject) and result.row == "d1"
    assert result.reason.startswith("invalid_record: not a canonical sample record: "
                                    "conversations.0.role:")


def test_converter_rejects_pass_through_with_a_code(root):
    v = Validator(root)
    a = v.check(Reject("f.json[3]", "image_missing: x.png not listed", "llava"))
    b = v.check(Reject("f.json[4]", "no answer field", "llava"))
    assert a == Reject("f.json[3]", "image_missing: x.png not listed", "llava")
    assert b == Reject("f.json[4]", "invalid_row: no answer field", "llava")
    assert v.stats.by_reason == {"image_missing": 1, "invalid_row": 1}


def test_counts_reconcile_over_a_mixed_stream(root):
    (root / "empty.png").write_bytes(b"")
    items = [sample("a"), sample("b", images=("nope.png",)), sample("a"),
             sample("c", images=("empty.png",)), Reject("raw:5", "invalid JSON: x"),
             sample("d", images=("../good.png",)), sample("e")]
    v = Validator(root, workers=2)
    out = list(v.run(items, batch_size=2))
    assert len(out) == v.stats.rows == 7
    assert v.stats.accepted + v.stats.rejected == v.stats.rows
    assert (v.stats.accepted, v.stats.rejected) == (2, 5)
    assert v.stats.by_reason == {"image_missing": 1, "duplicate_id": 1, "image_empty": 1,
                                 "invalid_json": 1, "image_path_unsafe": 1}
    assert all(reason_code(r.reason) in REASONS for r in out if isinstance(r, Reject))


# --------------------------------------------------------------------------- vocabulary


def test_reason_vocabulary():
    assert TOO_LONG in REASONS
    assert reason(TOO_LONG, "2100 tokens > max_length 2048") == \
        "too_long: 2100 tokens > max_length 2048"
    with pytest.raises(ValueError, match="unknown reject reason code 'nope'"):
        reason("nope", "x")
    assert reason_code("image_missing: a.png does not exist") == "image_missing"
    assert reason_code("free text: with a colon") == "invalid_row"
    assert reason_code("invalid JSON: x") == "invalid_json"
    assert normalize_reason("invalid UTF-8 at byte 3") == "invalid_utf8: invalid UTF-8 at byte 3"
    assert normalize_reason("duplicate_id: first seen at row 2") == \
        "duplicate_id: first seen at row 2"


def test_raw_row_error_helper():
    from mmjobs.data.validate import reject_raw_row

    row = RawRow("a.jsonl:9", error="invalid UTF-8 at byte 0")
    assert reject_raw_row(row, "canonical") == Reject("a.jsonl:9",
                                                      "invalid_utf8: invalid UTF-8 at byte 0",
                                                      "canonical")
