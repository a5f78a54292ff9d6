"""The `lavin` conversation format through the LaVIN replica's tokenizer, on ScienceQA rows the
`scienceqa` converter makes (`style: lavin`, QCM-ALE) from problems read back from LLaVA's real
test file, with the real GPT-3 QCM-ALE explanations as lectures (real ScienceQA text).

The reference is LaVIN's own algorithm restated with SentencePiece on the replica's
`tokenizer.model` (luogen1996/LaVIN `util/datasets.py` `tokenize`, `engine.py` prefixes,
`lavin/model.py` `insert_image_embeds`, `lavin/generator.py` prompt ids).
"""

from __future__ import annotations

import io
import json

import pytest

from mmjobs.data.conversation import FormatMismatch, resolve_format
from mmjobs.data.conversation.lavin import PIECE_BREAK
from mmjobs.data.records import IMAGE_TOKEN
from mmjobs.data.sample_encoder import IGNORE_INDEX, SampleEncoder, SampleRejected
from tests.real_data import placeholder_images, real
from tests.unit.data._real import prepare
from tests.unit.data.test_conversation_tokens import png
from tests.unit.eval.test_real_scienceqa import problems_from_llava_text

VISUAL_TOKENS = 6
LONG = "Long explanation sentence number {} about forces and magnets."


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """ScienceQA test rows as the converter writes them for LaVIN (QCM-ALE), with images."""
    tmp = tmp_path_factory.mktemp("sqa")
    llava = json.loads(real("scienceqa/llava/llava_test_CQM-A.json").read_text("utf-8"))
    gpt3 = json.loads(real("scienceqa/official/results_gpt3_final_test_QCM-ALE_2_seed_3.json")
                      .read_text("utf-8"))["outputs"]
    problems = problems_from_llava_text(llava)
    for pid, problem in problems.items():
        because = gpt3[pid].partition("BECAUSE: ")[2]  # ScienceQA writes "\n" as "\\n"
        problem["lecture"] = because.replace("\\n", "\n")
        problem["solution"] = ""
    problems["11"]["lecture"] = " ".join(LONG.format(i) for i in range(80))  # > 511 tokens
    (tmp / "problems.json").write_text(json.dumps(problems))
    (tmp / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    images = [f"test/{pid}/image.png" for pid, p in problems.items() if p["image"]]
    placeholder_images(tmp / "images", images)
    records, rejects = prepare("scienceqa", tmp, tmp / "images", tmp, split="test",
                               style="lavin", prompt_format="QCM-ALE")
    assert rejects == [] and len(records) == 12
    return {r.id: r for r in records}


@pytest.fixture(scope="module")
def encoder(lavin_model_dir):
    from mmjobs.models.lavin import register

    register()
    return SampleEncoder(lavin_model_dir, max_length=2048, conversation_format="lavin")


@pytest.fixture(scope="module")
def sp(replica_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(
        model_file=str(replica_dir("meta/llama-7b") / "tokenizer.model"))


def lavin_reference(sp, prompt: str, answer: str, has_image: bool, image_id: int,
                    max_seq_len: int = 512) -> tuple[list[int], list[bool]]:
    """LaVIN's training ids (without the modality token) and which positions carry labels."""
    example = [sp.bos_id(), *sp.encode(prompt + answer), sp.eos_id()][:max_seq_len]
    prompt_len = 1 + len(sp.encode(prompt))
    labelled = [i >= prompt_len for i in range(len(example))]
    prefix = sp.encode("Image: ") + [image_id] * VISUAL_TOKENS if has_image else sp.encode(
        "Image: N/A")
    ids = example[:1] + prefix + example[1:]
    labelled = labelled[:1] + [False] * len(prefix) + labelled[1:]
    # the modality token goes in front and everything is cut back to max_seq_len
    return ids[:max_seq_len - 1], labelled[:max_seq_len - 1]


def _turns(record):
    return [{"role": t.role, "content": t.content} for t in record.conversations]


def _encode(encoder, record):
    images = [png()] * len(record.images)
    return encoder.encode_messages(record.id, _turns(record), images)


def test_ids_and_labels_are_lavins(rows, encoder, sp):
    image_id = encoder.image_token_id
    checked = {True: 0, False: 0}
    for pid, record in rows.items():
        if pid == "11":
            continue  # the long one: test_long_samples_are_cut_as_lavin_cuts
        question, answer = (t["content"] for t in _turns(record))
        prompt = question.removeprefix(IMAGE_TOKEN + "\n")
        assert prompt.startswith("Question: ") and prompt.endswith("\nResponse:")
        assert answer.startswith("The answer is ") and "BECAUSE:" in answer  # kept if empty
        ids, labelled = lavin_reference(sp, prompt, answer, bool(record.images), image_id)
        if not any(labelled):  # the prompt alone fills LaVIN's 511 ids (the replica's
            with pytest.raises(SampleRejected, match="too_long"):  # tokenizer is wordy)
                _encode(encoder, record)
            checked["rejected"] = checked.get("rejected", 0) + 1
            continue
        encoded = _encode(encoder, record)
        assert encoded.input_ids == ids, pid
        assert [label != IGNORE_INDEX for label in encoded.labels] == labelled, pid
        # the labels decode to the answer text followed by EOS (or its start, when cut)
        learned = [t for t in encoded.labels if t != IGNORE_INDEX]
        assert encoded.num_image_tokens == VISUAL_TOKENS * len(record.images)
        if len(encoded.input_ids) == 511:
            assert learned[-1] != sp.eos_id() and answer.startswith(sp.decode(learned)), pid
            continue
        assert learned[-1] == sp.eos_id() and sp.decode(learned[:-1]) == answer, pid
        checked[bool(record.images)] += 1
    assert checked[True] >= 2 and checked[False] >= 2  # both layouts, whole answers


def test_long_samples_are_cut_as_lavin_cuts(rows, encoder, sp):
    """511 ids (512 positions with the modality token), the answer's tail and EOS cut off;
    the stage's truncate=false does not apply: LaVIN never drops a sample for length."""
    record = rows["11"]
    question, answer = (t["content"] for t in _turns(record))
    encoded = _encode(encoder, record)
    ids, labelled = lavin_reference(sp, question.removeprefix(IMAGE_TOKEN + "\n"), answer, True,
                                    encoder.image_token_id)
    assert len(encoded.input_ids) == 511 == len(ids)
    assert encoded.input_ids == ids
    assert [label != IGNORE_INDEX for label in encoded.labels] == labelled
    assert encoded.input_ids[-1] != sp.eos_id()
    learned = sp.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert answer.startswith(learned) and len(learned) < len(answer)
    assert encoder.describe()["truncate"] is True


def test_a_prompt_past_the_budget_is_rejected(encoder):
    """No answer token left inside 511 ids: LaVIN would learn nothing from it."""
    prompt = "Question: " + " ".join(LONG.format(i) for i in range(120)) + "\nResponse:"
    with pytest.raises(SampleRejected, match=r"too_long.*no assistant token"):
        encoder.encode_messages("x", [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": "The answer is A."}], [])


def test_generation_prompt_is_the_training_sequence_up_to_the_answer(rows, encoder, sp):
    """What infer/serve feed the model equals LaVIN_Generator's prompt ids, and the training
    sequence up to its first label."""
    from PIL import Image

    from mmjobs.data.conversation.chunks import encode_chunked_batch

    for pid in ("4", "11"):  # text only, with an image
        record = rows[pid]
        user = _turns(record)[:1]
        text = encoder.format.render_prompt(user)
        images = [Image.open(io.BytesIO(png())) for _ in record.images]
        batch = encode_chunked_batch(encoder.processor, [text], [images],
                                     encoder.image_token, piece_break=PIECE_BREAK)
        prompt_ids = batch["input_ids"][0].tolist()
        prompt = user[0]["content"].removeprefix(IMAGE_TOKEN + "\n")
        if record.images:  # generator.py: encode("Image: ", bos=True) + [0] * n_feats + prompt
            expected = [sp.bos_id(), *sp.encode("Image: ")] + [encoder.image_token_id] * 6
        else:
            expected = [sp.bos_id(), *sp.encode("Image: N/A")]
        assert prompt_ids == expected + sp.encode(prompt), pid
        encoded = _encode(encoder, record)
        first = next(i for i, t in enumerate(encoded.labels) if t != IGNORE_INDEX)
        assert encoded.input_ids[:first] == prompt_ids


def test_rendered_texts_and_what_the_format_refuses():
    from mmjobs.data.conversation.base import SpecialTokens

    fmt = resolve_format("lavin", _Tok())
    assert isinstance(fmt.tokens, SpecialTokens) and fmt.truncate and fmt.image_chunks
    user = {"role": "user", "content": "<image>\nQuestion: Which is a magnet?\nResponse:"}
    answer = {"role": "assistant", "content": "The answer is A."}
    rendered = fmt.render([user, answer])
    assert rendered.text == "Image: <image>Question: Which is a magnet?\nResponse:" \
        "The answer is A.</s>"
    assert rendered.text[slice(*rendered.spans[0])] == "The answer is A.</s>"
    text_only = fmt.render_prompt([{"role": "user", "content": "Question: Why?\nResponse:"}])
    assert text_only == f"Image: N/A{PIECE_BREAK}Question: Why?\nResponse:"
    for turns, match in [
        ([{"role": "system", "content": "Be brief."}, user, answer], "no system turn"),
        ([user, answer, user, answer], "one user turn"),
        ([{"role": "user", "content": "<image><image>Q"}, answer], "one image slot"),
        ([{"role": "user", "content": f"Q{PIECE_BREAK}"}, answer], "U\\+E000"),
    ]:
        with pytest.raises(FormatMismatch, match=match):
            fmt.render(turns)
    assert fmt.describe() == {"name": "lavin", "image_chunks": True, "stop_strings": [],
                              "stop_tokens": [], "piece_break": PIECE_BREAK, "truncate": True}


class _Tok:
    """The special tokens of LLaMA's tokenizer, which is all rendering reads."""

    bos_token, eos_token, sep_token = "<s>", "</s>", None
    special_tokens_map: dict = {}  # noqa: RUF012

