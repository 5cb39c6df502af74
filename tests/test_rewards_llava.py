"""`llava_bertscore` (DDPO's prompt-image alignment reward) and its BERTScore, on tiny models built from config with
random weights and tokenizers trained here offline: BERTScore against a plain numpy loop over token embeddings of
the untruncated encoder, LLaVA's answers against a greedy decoding loop written without `generate`, the reward
through the spec, and the offline message."""

import numpy as np
import pytest
import torch
from test_rewards import offline_empty_cache  # noqa: F401  (a fixture: pytest finds it by name in this module)

import rewards
from conftest import rounding_tolerance, roundings
from rewards.bertscore import BertScore
from rewards.llava import REFERENCE, LlavaBertScore, build_prompt, parse_answer

CORPUS = [
    "USER: what is going on in this image? ASSISTANT: a cat riding a bike on the road",
    "The image contains a dog playing chess, a monkey washing dishes, a horse riding a bike",
] * 20


def byte_level_tokenizer(specials: list[str], post_processor):
    """A byte-level BPE tokenizer (any text encodes) trained on CORPUS, as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = post_processor(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=64)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A 2-layer RoBERTa (hidden 32) and a RoBERTa-style tokenizer (<s> A </s>), saved as a transformers folder."""
    from tokenizers import processors
    from transformers import RobertaConfig, RobertaModel

    tokenizer = byte_level_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>"],
        lambda t: processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[(s, t.token_to_id(s)) for s in
                                                                                     ("<s>", "</s>")]),
    )
    tokenizer.add_special_tokens({"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                                  "pad_token": "<pad>", "unk_token": "<unk>"})
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64 + 2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("roberta")
    RobertaModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny LLaVA: CLIP vision tower (32x32 images, 8x8 patches: 16 image tokens), a 2-layer Llama, a byte-level
    tokenizer with LLaMA's specials and <image>, and a CLIP image processor; saved as a transformers folder."""
    from tokenizers import processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = byte_level_tokenizer(
        ["</s>", "<s>", "<unk>", "<pad>", "<image>"],  # </s> is id 0: a model whose logits are all equal ends at once
        lambda t: processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))]),
    )
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                                  "additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>"))}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, **ids),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["eos_token_id"]
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- BERTScore
def numpy_bertscore(encoder, tokenizer, layer: int, candidate: str, reference: str) -> tuple[float, float, float]:
    """BERTScore of one pair written out with loops: each sentence encoded alone (no padding), cosine similarities
    of the layer's token embeddings, greedy matching, [CLS]/[SEP] weighing 0; an empty side scores 0."""
    def embed(sentence):
        ids = tokenizer.encode(sentence.strip(), add_special_tokens=True)
        with torch.no_grad():
            hidden = encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].double().numpy()
        weights = [0.0 if i in (tokenizer.cls_token_id, tokenizer.sep_token_id) else 1.0 for i in ids]
        return [row / np.sqrt(row @ row) for row in hidden], weights

    c, c_weights = embed(candidate)
    r, r_weights = embed(reference)
    if sum(c_weights) == 0 or sum(r_weights) == 0:
        return 0.0, 0.0, 0.0
    precision = sum(w * max(float(ci @ rj) for rj in r) for ci, w in zip(c, c_weights)) / sum(c_weights)
    recall = sum(w * max(float(ci @ rj) for ci in c) for rj, w in zip(r, r_weights)) / sum(r_weights)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def cosine_tolerance(encoder) -> float:
    """A bound on the error of a float32 BERTScore precision or recall against the float64 loop above: conftest's
    bound t for the encoder's hidden states (their rows, after the layer's LayerNorm, have alike norms), which moves
    a normalised row by 2t and a cosine of two by 4t, plus the cosine's own dot product; the greedy maxima and the
    weighted means do not increase it."""
    t = rounding_tolerance(roundings(encoder))
    return 4 * t + rounding_tolerance(encoder.config.hidden_size + 8)


PAIRS = [
    ("a cat riding a bike", "The image contains a cat riding a bike"),
    ("  a dog  ", "The image contains a monkey washing dishes"),
    ("a horse playing chess on the road, ok", "The image contains a horse"),
    ("", "The image contains a dog playing chess"),  # empty candidate: 0
    ("zq!", "The image contains zq!"),  # characters outside the training corpus
]


@pytest.mark.parametrize("layer", [1, 2])
def test_bertscore_matches_a_numpy_loop(roberta_dir, layer):
    from transformers import AutoModel, AutoTokenizer

    scorer = BertScore.from_pretrained(str(roberta_dir), layer)
    assert len(scorer.encoder.encoder.layer) == layer  # the layers after `layer` are dropped
    full, tokenizer = AutoModel.from_pretrained(roberta_dir).eval(), AutoTokenizer.from_pretrained(roberta_dir)
    candidates, references = zip(*PAIRS)
    precision, recall, f1 = scorer(list(candidates), list(references))
    expected = torch.tensor([numpy_bertscore(full.double(), tokenizer, layer, c, r) for c, r in PAIRS],
                            dtype=torch.float64)
    # F1 = 2PR/(P + R) moves by at most twice P's and R's errors together
    atol = 4 * cosine_tolerance(scorer.encoder)
    torch.testing.assert_close(torch.stack([precision, recall, f1], dim=1).double(), expected, atol=atol, rtol=0)
    assert recall[3] == 0 and (recall[:3] > 0).all()
    with pytest.raises(rewards.RewardSpecError, match="BERTScore layer 3 out of range 1..2"):
        BertScore.from_pretrained(str(roberta_dir), 3)


# ---------------------------------------------------------------------------------------------- LLaVA
def test_prompt_and_answer_parsing(llava_dir):
    from transformers import AutoProcessor

    assert build_prompt("what is going on?") == "USER: <image>\nwhat is going on? ASSISTANT:"
    processor = AutoProcessor.from_pretrained(llava_dir)
    tokenizer = processor.tokenizer
    inputs = processor(images=[torch.zeros(3, 32, 32)], text=[build_prompt("what?")], return_tensors="pt")
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"] == image_token).sum() == 16  # <image> expanded to the vision tower's 16 patches
    assert tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True) == "USER: \nwhat? ASSISTANT:"

    answer = tokenizer.encode(" a cat riding a bike ", add_special_tokens=False)
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    after = tokenizer.encode("dog", add_special_tokens=False)
    assert parse_answer(tokenizer, answer + [end] + after + [pad], {end}) == "a cat riding a bike"
    assert parse_answer(tokenizer, answer, {end}) == "a cat riding a bike"  # no end token: max_new_tokens reached
    assert parse_answer(tokenizer, [end] + answer, {end}) == ""


def greedy_answer(model, processor, image: torch.Tensor, question: str, max_new_tokens: int, end: int) -> str:
    """One image, no batching or padding, no `generate` and no cache: argmax of the last position, appended until the
    end token or `max_new_tokens`."""
    from PIL import Image

    picture = Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    inputs = processor(images=[picture], text=[build_prompt(question)], return_tensors="pt")
    ids, answer = inputs["input_ids"], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1]
            token = int(logits.argmax())
            if token == end:
                break
            answer.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return processor.tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_llava_answers_equal_a_greedy_loop(llava_dir, roberta_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    reward = LlavaBertScore.from_pretrained(str(llava_dir), "what is going on?", "6", str(roberta_dir), "2")
    model, processor = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval(), AutoProcessor.from_pretrained(
        llava_dir)
    batch = images(3)
    answers = reward.answer(batch)
    expected = [greedy_answer(model, processor, image, "what is going on?", 6, processor.tokenizer.eos_token_id)
                for image in batch]
    assert answers == expected and all(answers)  # a random model says something: non-empty

    # a model whose logits are all equal picks token 0, the end token: generation ends at once, the answer is empty
    reward.llava.lm_head.weight.data.zero_()
    assert reward.answer(batch) == ["", "", ""]
    assert torch.equal(reward(batch, ["a cat"] * 3), torch.zeros(3))  # BERTScore of an empty candidate is 0


def test_reward_through_the_spec(llava_dir, roberta_dir):
    from transformers import AutoModel, AutoTokenizer

    spec = (f"llava_bertscore[model={llava_dir};max_new_tokens=5;question=Answer concisely: what is going on in this "
            f"image?;bertscore_model={roberta_dir};bertscore_layer=1]:2")
    assert not rewards.is_differentiable(spec)
    reward = rewards.load(spec)
    part = next(iter(reward.parts.values()))
    assert isinstance(part, LlavaBertScore) and not reward.differentiable and part.max_new_tokens == 5
    batch = images(2, seed=1).requires_grad_()
    prompts = ["a cat riding a bike", "a dog playing chess"]
    scores = reward(batch, prompts)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert scores.grad_fn is None  # a black box: no graph back to the pixels
    encoder, tokenizer = AutoModel.from_pretrained(roberta_dir).eval(), AutoTokenizer.from_pretrained(roberta_dir)
    recalls = [numpy_bertscore(encoder.double(), tokenizer, 1, answer, REFERENCE.format(prompt=prompt))[1]
               for answer, prompt in zip(part.last_answers, prompts)]
    atol = 2 * cosine_tolerance(part.bertscore.encoder)  # the spec's weight 2 times recall's bound
    torch.testing.assert_close(scores.double(), 2 * torch.tensor(recalls, dtype=torch.float64), atol=atol, rtol=0)
    with pytest.raises(rewards.RewardSpecError, match="option max_new_tokens=0 must be at least 1"):
        rewards.load(f"llava_bertscore[model={llava_dir};max_new_tokens=0]")


def test_offline_error_names_both_downloads(offline_empty_cache):  # noqa: F811
    with pytest.raises(rewards.RewardError) as info:
        rewards.load("llava_bertscore")
    message = str(info.value)
    assert 'hf download llava-hf/llava-1.5-7b-hf --include *.json *.safetensors tokenizer.model' in message, message
    assert "hf download microsoft/deberta-xlarge-mnli config.json pytorch_model.bin" in message, message
    assert "--reward 'llava_bertscore[model=PATH;bertscore_model=PATH]'" in message, message
    assert "REWARDS_LLAVA_BERTSCORE_MODEL" in message, message
    with pytest.raises(rewards.WeightsNotFound, match="local directory '/nonexistent/llava' does not exist"):
        rewards.load("llava_bertscore[model=/nonexistent/llava]")
