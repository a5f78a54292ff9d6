"""Conversation formats through a real tokenizer (the llava-hf replica's): LLaVA's own
tokenization and masking restated as a reference, length limits, truncation."""

from __future__ import annotations

import io

import pytest

from mmjobs.data.records import Sample
from mmjobs.data.sample_encoder import IGNORE_INDEX, SampleEncoder, SampleRejected

LLAVA_HF = "llava-hf/llava-1.5-7b-hf"
SENTINEL = -200  # LLaVA's IMAGE_TOKEN_INDEX
IMAGE_TOKENS = 576  # (336 / 14) ** 2 per image


def png(size: tuple[int, int] = (32, 24)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(out, "PNG")
    return out.getvalue()


def sample(question: str, *answers: str, images: int = 1) -> Sample:
    turns = []
    for k, answer in enumerate(answers):
        turns += [{"role": "user", "content": question if k == 0 else "And then?"},
                  {"role": "assistant", "content": answer}]
    return Sample.model_validate({"id": "s", "images": [f"{i}.png" for i in range(images)],
                                  "conversations": turns})


# LLaVA's algorithms (haotian-liu/LLaVA llava/mm_utils.py tokenizer_image_token, llava/train/
# train.py preprocess_v1 / preprocess_plain), restated for one round as the reference.


def llava_image_token_ids(tokenizer, prompt: str) -> list[int]:
    """Each piece between `<image>`s tokenized alone (with BOS); BOS kept once; -200 between."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split("<image>")]
    ids = [pieces[0][0]]
    for k, piece in enumerate(pieces):
        ids += ([SENTINEL] if k else []) + piece[1:]
    return ids


def llava_preprocess_v1(tokenizer, conversation: str) -> tuple[list[int], list[int]]:
    """One round: mask BOS and the instruction (its tokens minus BOS and the trailing `▁`)."""
    ids = llava_image_token_ids(tokenizer, conversation)
    rnd = conversation.split("</s>")[0]
    instruction, _ = rnd.split(" ASSISTANT: ")
    round_len = len(llava_image_token_ids(tokenizer, rnd))
    instruction_len = len(llava_image_token_ids(tokenizer, instruction + " ASSISTANT: ")) - 2
    # cur starts after BOS; the round's own BOS stands for its "</s>" in the count.
    end = 1 + round_len
    labels = [IGNORE_INDEX] * (1 + instruction_len) + ids[1 + instruction_len:end]
    labels += [IGNORE_INDEX] * (len(ids) - len(labels))
    assert end == len(ids), "LLaVA would print 'tokenization mismatch' and mask it all"
    return ids, labels


def llava_preprocess_plain(tokenizer, caption: str) -> tuple[list[int], list[int]]:
    ids = llava_image_token_ids(tokenizer, "<image>" + caption + "\n")
    masked = len(llava_image_token_ids(tokenizer, "<image>"))
    return ids, [IGNORE_INDEX] * masked + ids[masked:]


def expand(ids: list[int], labels: list[int], image_id: int) -> tuple[list[int], list[int]]:
    """The sentinel as transformers' LLaVA needs it: 576 image tokens, no labels."""
    out_ids, out_labels = [], []
    for t, lab in zip(ids, labels, strict=True):
        n = IMAGE_TOKENS if t == SENTINEL else 1
        out_ids += [image_id if t == SENTINEL else t] * n
        out_labels += [IGNORE_INDEX if t == SENTINEL else lab] * n
    return out_ids, out_labels


@pytest.fixture(scope="module")
def encoders(replica_dir):
    """`encoder(format, **options)` on the llava-hf replica."""
    model = replica_dir(LLAVA_HF)
    made = {}

    def get(fmt: str, **options) -> SampleEncoder:
        key = (fmt, tuple(sorted(options.items())))
        if key not in made:
            made[key] = SampleEncoder(model, max_length=options.pop("max_length", 2048),
                                      conversation_format=fmt, **options)
        return made[key]

    return get


@pytest.mark.parametrize(("question", "answer", "images"), [
    ("<image>\nWhat is this?", "A cat.", 1),
    ("How many dogs are there?\n<image>", "3 dogs.", 1),  # image moved first; answer a digit
    ("Say hello.", "Hello!", 0),  # text only: LLaVA tokenizes the whole conversation
])
def test_vicuna_v1_equals_llavas_preprocess_v1(encoders, question, answer, images):
    encoder = encoders("vicuna_v1")
    encoded = encoder.encode(sample(question, answer, images=images), [png()] * images)
    text, _ = encoder.render([{"role": "user", "content": question},
                              {"role": "assistant", "content": answer}])
    ids, labels = expand(*llava_preprocess_v1(encoder.tokenizer, text), encoder.image_token_id)
    assert (encoded.input_ids, encoded.labels) == (ids, labels)
    learned = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert encoder.tokenizer.decode(learned) == answer + "</s>"
    if images:  # LLaVA's tokenization detail: the text after an image starts with "▁"
        after = encoded.input_ids.index(encoder.image_token_id) + IMAGE_TOKENS
        assert encoder.tokenizer.convert_ids_to_tokens(encoded.input_ids[after]) == "▁"


def test_vicuna_v1_labels_every_answer_of_a_conversation(encoders):
    encoder = encoders("vicuna_v1")
    encoded = encoder.encode(sample("<image>\nWhat is this?", "A cat.", "12 dogs."), [png()])
    runs, run = [], []
    for label in [*encoded.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs, run = [*runs, run], []
    assert [encoder.tokenizer.decode(r) for r in runs] == ["A cat.</s>", "12 dogs.</s>"]


def test_plain_equals_llavas_preprocess_plain(encoders):
    encoder = encoders("plain")
    caption = "A red square on a white page."
    encoded = encoder.encode(sample("Describe the image briefly.\n<image>", caption), [png()])
    ids, labels = expand(*llava_preprocess_plain(encoder.tokenizer, caption),
                         encoder.image_token_id)
    assert (encoded.input_ids, encoded.labels) == (ids, labels)
    assert encoder.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == caption + "\n"
    with pytest.raises(SampleRejected, match=r"format_mismatch: plain: .*one user turn"):
        encoder.encode(sample("<image>\nWhat?", "A.", "B."), [png()])


def test_the_template_labels_llava_hf_answers(encoders):
    encoder = encoders("auto")
    encoded = encoder.encode(sample("<image>\nWhat is this?", "A cat."), [png()])
    tokens = encoder.tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens[0] == "<s>"  # the template writes no BOS; the tokenizer adds it
    assert tokens.count("<image>") == IMAGE_TOKENS
    assert encoder.tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX]) == "A cat."


def test_images_that_cannot_fit_are_rejected_naming_them(encoders):
    encoder = encoders("vicuna_v1", max_length=500)
    with pytest.raises(SampleRejected) as e:
        encoder.encode(sample("<image>\nWhat is this?", "A cat."), [png()])
    assert e.value.code == "too_long"
    assert "(576 of them image tokens for 1 image) > max_length 500" in e.value.reason
    assert "images are never cut: raise max_length" in e.value.reason


def test_truncation_cuts_text_after_the_images(encoders):
    long_answer = " ".join(["The square is red."] * 20)
    question = "<image>\nWhat is this?"
    full = encoders("vicuna_v1").encode(sample(question, long_answer), [png()])
    assert full.length > 700
    with pytest.raises(SampleRejected, match="truncate=true would cut the text after the images"):
        encoders("vicuna_v1", max_length=700).encode(sample(question, long_answer), [png()])
    cut = encoders("vicuna_v1", max_length=700, truncate=True).encode(
        sample(question, long_answer), [png()])
    assert cut.length == 700 and cut.num_image_tokens == IMAGE_TOKENS
    assert (cut.input_ids, cut.labels) == (full.input_ids[:700], full.labels[:700])
    # Cut before any answer token: nothing left to learn, so still a reject.
    with pytest.raises(SampleRejected, match="no assistant token is left"):
        encoders("vicuna_v1", max_length=612, truncate=True).encode(
            sample(question, long_answer), [png()])


def test_the_end_of_image_token_is_part_of_the_image(tiny_chameleon_dir):
    """Chameleon images end with <eoss>: a cut right before it would split the image."""
    probe = SampleEncoder(tiny_chameleon_dir, max_length=4096)
    question = "<image>\nWhat is this?"
    encoded = probe.encode(sample(question, "A cat."), [png()])
    ids = encoded.input_ids
    eoi = probe.processor.image_end_token_id
    image_end = ids.index(eoi) + 1
    # The last placeholder fits but <eoss> does not: rejected. Cut inside the answer: kept.
    for limit, fits in ((image_end - 1, False), (len(ids) - 1, True)):
        encoder = SampleEncoder(tiny_chameleon_dir, max_length=limit, truncate=True)
        if fits:
            assert encoder.encode(sample(question, "A cat."), [png()]).input_ids == ids[:limit]
        else:
            with pytest.raises(SampleRejected, match=f"image tokens end at token {image_end}"):
                encoder.encode(sample(question, "A cat."), [png()])


def test_a_model_without_a_template_is_told_which_formats_exist(replica_dir, tmp_path, capsys):
    """facebook/chameleon-7b ships no chat template: the stage says what to set, no traceback."""
    from mmjobs.stages import pretokenize
    from tests.chart_dataset import commit_dataset, write_chart_dataset

    local = write_chart_dataset(tmp_path / "local", [sample("<image>\nWhat?", "A.").model_dump()])
    dataset = commit_dataset(local, str(tmp_path / "dataset"))
    model = replica_dir("facebook/chameleon-7b")
    code = pretokenize.cli(["--set", f"dataset={dataset}", "--set", f"model={model}",
                            "--set", f"output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"mmjobs stage pretokenize: {model}: the model ships no chat template" in err
    assert "anything_ti2ti (Align-Anything on Chameleon)" in err
