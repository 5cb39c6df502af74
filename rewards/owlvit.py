"""OWL-ViT rewards: object detection and removal (DRaFT §5.3) and object counting (AlignProp).

OWL-ViT (Minderer et al. 2022; transformers `OwlViTForObjectDetection`, hub `google/owlvit-base-patch32`) scores
every one of its boxes (one per image patch, 576 at 768x768 / 32) against text queries: `logits [B, boxes,
queries]`, `pred_boxes [B, boxes, 4]` as normalised (cx, cy, w, h). As in transformers'
`OwlViTImageProcessor.post_process_object_detection`, a box's score is the sigmoid of its best query's logit and
it is a detection when that score exceeds a threshold (0.1 there and here). The box's area is `w * h`, a fraction
of the image (the processor resizes the whole image to the model's square input, so the image is the unit square).

- `owlvit_detect`:  `+ sum over detections of (score + area)`  (DRaFT §5.3: make the queried objects appear)
- `owlvit_remove`:  `- sum over detections of (score + area)`  (DRaFT §5.3: remove them, e.g. people)
- `owlvit_count`:   `-(sum over detections of score - n)^2` with n and the object parsed from the prompt
                    (AlignProp's control of the number of objects; a differentiable soft count)
- `owlvit_count_exact`: 1 if the number of detections equals n else 0 (black box)

The detection set is chosen by a hard threshold, so the gradient flows through the scores and box sizes of the
boxes above it, not through which boxes they are; an image with no detection gets no gradient (lower `threshold`
for a detection task that starts from nothing; `threshold=0` counts every box). Sources: DRaFT §5.3's reward as
issue 13 states it ("the sum of the detection scores of the queried objects plus the areas of their boxes", negated
to remove them; the paper's text itself could not be retrieved here, so which boxes it sums is our choice, the
post-processing's); AlignProp names the task (README: "controllability of the number of objects present") but
released no code for it, so the soft count and its squared error are ours. Preprocessing is `OwlViTProcessor`'s
(resize to the model's square input, 768 for base-patch32, bicubic, no crop, CLIP mean/std), written in torch so
that gradients reach the pixels."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from . import _hub
from ._base import Reward, RewardSpecError, clip_preprocess, model_device_dtype
from ._options import as_float, as_list

MODEL_REPO = "google/owlvit-base-patch32"
# `hf download` arguments for what the loaders read: config, tokenizer and preprocessor files, the weights
MODEL_FILES = ["--include", "'*.json'", "'*.txt'", "model.safetensors"]
THRESHOLD = 0.1  # transformers' post_process_object_detection default
REMOVE_QUERIES = ("a photo of a person",)  # DRaFT §5.3's removal example (people), OWL-ViT's query template


def owlvit_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """`OwlViTImageProcessor`: resize the whole image to size x size (aspect ratio not kept), bicubic with
    antialiasing (PIL's kernel), clip to [0, 1] as a uint8 pipeline does, CLIP normalisation."""
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return clip_preprocess(x, size)  # already size x size: normalisation only


def parse_options(queries: str | list[str] | None, threshold: str | float | None) -> tuple[list[str] | None, float]:
    """Spec option values -> (queries, threshold). `queries` is `a|b|c` (or a list); `threshold` in [0, 1)."""
    queries = None if queries is None else as_list(queries, "queries")
    if threshold is None:
        return queries, THRESHOLD
    value = as_float(threshold, "threshold", minimum=0.0)
    if value >= 1:
        raise RewardSpecError(f"option threshold={value:g} must be below 1 (a detection score is a probability)")
    return queries, value


class _OwlViT(Reward):
    """OWL-ViT with its tokenizer; `detect` returns every box's score and area."""

    def __init__(self, model, tokenizer, threshold: float = THRESHOLD):
        super().__init__()
        self.model, self.tokenizer, self.threshold = model, tokenizer, threshold
        self.size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings  # 16: OwlViTProcessor pads to it
        self.freeze()

    def detect(self, images: torch.Tensor, queries: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`queries[i]`: the text queries of image i (the same number for every image). Returns the score of each
        box (sigmoid of its best query's logit) and its area, both [B, boxes] float32."""
        device, dtype = model_device_dtype(self.model)
        pixels = owlvit_preprocess(images, self.size).to(device, dtype)
        tokens = self.tokenizer(
            [q for image_queries in queries for q in image_queries],
            padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt",
        )
        out = self.model(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
            pixel_values=pixels,
        )
        scores = torch.sigmoid(out.logits.float().max(dim=-1).values)
        boxes = out.pred_boxes.float()
        return scores, boxes[..., 2] * boxes[..., 3]

    @classmethod
    def from_pretrained(cls, model: str = MODEL_REPO, device="cpu", dtype=torch.float32, **options) -> "_OwlViT":
        """`model`: hub id or local directory of an OWL-ViT checkpoint (transformers format, with its tokenizer);
        `options`: the reward's options, strings from the reward spec (see `options`)."""
        kwargs = cls.options(**options)  # refuse a bad option before loading anything
        from transformers import AutoTokenizer, OwlViTForObjectDetection

        tokenizer = _hub.pretrained(AutoTokenizer.from_pretrained, model, MODEL_FILES)
        load = lambda path: OwlViTForObjectDetection.from_pretrained(path, dtype=dtype)  # noqa: E731
        detector = _hub.pretrained(load, model, MODEL_FILES)
        return cls(detector.to(device), tokenizer, **kwargs)

    @staticmethod
    def options(threshold=None) -> dict:
        """Spec option strings -> constructor keywords (RewardSpecError for a bad value)."""
        return {"threshold": parse_options(None, threshold)[1]}


class OwlViTDetection(_OwlViT):
    """`sign * sum over boxes with score > threshold of (score + area)`: sign +1 detects, -1 removes.

    `queries` (the same for every image): with None each image's own prompt is its only query (cut to OWL-ViT's 16
    tokens), so `owlvit_detect` asks for what the prompt names, confidently and large; `owlvit_remove` defaults to
    people."""

    def __init__(self, model, tokenizer, sign: float, queries: list[str] | None = None, threshold: float = THRESHOLD):
        super().__init__(model, tokenizer, threshold)
        self.sign, self.queries = sign, queries

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        queries = [self.queries or [prompt] for prompt in prompts]
        scores, areas = self.detect(images, queries)
        detected = scores > self.threshold
        return self.sign * torch.where(detected, scores + areas, 0.0).sum(-1)

    @staticmethod
    def options(sign: float = 1.0, queries=None, threshold=None) -> dict:
        queries, threshold = parse_options(queries, threshold)
        if queries is None and sign < 0:
            queries = list(REMOVE_QUERIES)
        return {"sign": sign, "queries": queries, "threshold": threshold}


# ------------------------------------------------------------------------------------------- counting
NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a": 1, "an": 1}
# Leading templates that are not the counted object ("a photo of three apples" counts apples)
TEMPLATES = re.compile(r"^(an? )?(photo|picture|image|painting|drawing|illustration|render(ing)?) of ")
# Words that end the counted noun phrase ("three apples on a table" counts apples)
PHRASE_END = set(
    "on in at with and or of near under beside next by from into inside over behind above below around "
    "that which who is are sitting standing lying lined stacked floating flying".split()
)
IRREGULAR = {"mice": "mouse", "people": "person", "children": "child", "men": "man", "women": "woman",
             "geese": "goose", "feet": "foot", "teeth": "tooth", "sheep": "sheep", "fish": "fish", "deer": "deer"}


def singular(word: str) -> str:
    """English plural -> singular for ordinary nouns (the count prompts' objects); irregular ones from a table."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"  # puppies, cherries
    if word.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        return word[:-2]  # peaches, dishes, glasses, boxes, tomatoes
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def parse_count(prompt: str) -> tuple[int, str] | None:
    """`"three apples on a table"` -> `(3, "apple")`: the number the prompt names and the counted object, singular.

    Numbers: the words zero..ten or digits; without one, a prompt that starts with "a"/"an" names one object
    ("a dog" -> (1, "dog")). The object is the words after the number up to a word of `PHRASE_END` (prepositions,
    conjunctions, some verbs), an article, a later word in -ing or punctuation (at most three words, the last one
    singularised). A leading "a photo of" (and
    the like) is skipped. None when the prompt names no count."""
    text = TEMPLATES.sub("", prompt.lower().strip())
    words = re.findall(r"[a-z0-9'-]+|[^\sa-z0-9'-]", text)
    at = next((i for i, w in enumerate(words) if w in NUMBERS or w.isdigit()), None)
    if at is not None:
        n = int(words[at]) if words[at].isdigit() else NUMBERS[words[at]]
    elif words and words[0] in ARTICLES:
        at, n = 0, 1
    else:
        return None
    phrase = []
    for w in words[at + 1 :]:
        if w in PHRASE_END or w in ARTICLES or not re.fullmatch(r"[a-z'-]+", w) or len(phrase) == 3:
            break
        if phrase and w.endswith("ing"):  # "a horse riding a bike"; a first word may be a noun ("a painting")
            break
        phrase.append(w)
    if not phrase:
        return None
    return n, " ".join(phrase[:-1] + [singular(phrase[-1])])


def count_query(obj: str) -> str:
    """OWL-ViT's query for a counted object, in the CLIP template OWL-ViT's examples use ("a photo of a cat")."""
    return f"a photo of {'an' if obj[0] in 'aeiou' else 'a'} {obj}"


class OwlViTCount(_OwlViT):
    """`-(soft count - n)^2`, soft count = sum of the scores of the boxes above `threshold` for the object the
    prompt names; n from `parse_count`. A prompt that names no count scores 0 (no constraint, no gradient)."""

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        counts, scores = self._scores(images, prompts)
        soft = torch.where(scores > self.threshold, scores, 0.0).sum(-1)
        return torch.where(counts >= 0, -(soft - counts) ** 2, 0.0)

    def _scores(self, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """The number each prompt names (-1: none) and the box scores for its object (its prompt when none)."""
        parsed = [parse_count(p) for p in prompts]
        queries = [[count_query(p[1]) if p else prompt] for p, prompt in zip(parsed, prompts)]
        scores, _ = self.detect(images, queries)
        counts = torch.tensor([p[0] if p else -1 for p in parsed], dtype=torch.float32, device=scores.device)
        return counts, scores


class OwlViTCountExact(OwlViTCount):
    """1 if the number of boxes above `threshold` equals the number the prompt names, else 0 (also 0 for a prompt
    that names no count). Not differentiable."""

    differentiable = False

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        with torch.no_grad():
            counts, scores = self._scores(images, prompts)
        return ((scores > self.threshold).sum(-1).float() == counts).float()
