"""Rewards: `fn(images [B,3,H,W] in [0,1], prompts: list[str]) -> Tensor[B]` (float32).

    reward_fn = rewards.load("hpsv2", device="cuda", dtype=torch.float16)
    reward_fn = rewards.load("hpsv2:1,aesthetic:0.1")      # weighted sum; a bare name has weight 1
    reward_fn = rewards.load("aesthetic[head=/models/sac+logos+ava1-l14-linearMSE.pth]")   # an option
    reward_fn = rewards.load("http://127.0.0.1:8085")      # a reward server (python -m rewards.serve)
    reward_fn.differentiable                               # all() of the parts
    reward_fn.last_components                              # {term text: Tensor[B]} of the last call, unweighted
    reward_fn.take_recorded()                              # the same for all calls since the last take, joined

The reward spec (the scripts' `--reward`, stored as text in the run's args.json):

    spec   := term ("," term)*
    term   := name ["[" option (";" option)* "]"] [":" weight]  |  URL
    option := key "=" value        value: any text without "]" or ";"; list values separated by "|"
    URL    := http://host:port[/path] or https://...   a reward server, weight 1 (`remote[url=URL]:0.5` weighs it)

e.g. `owlvit_remove[queries=a person|a face]:1,aesthetic:0.1` or `http://127.0.0.1:8085`. Commas and colons
inside brackets or inside a URL split nothing. Each reward lists its option keys in `_REGISTRY` (and
docs/rewards.md); the builder converts and checks the values.

| name | model | score |
|---|---|---|
| `aesthetic` | CLIP ViT-L/14 + LAION MLP head | MLP(image embedding / norm), about 1-10 |
| `hpsv2`, `hpsv21` | open_clip ViT-H-14 + HPS v2 / v2.1 checkpoint | cosine(image, text) |
| `pickscore` | PickScore_v1 (CLIP-H) | logit_scale.exp() * cosine(image, text) |
| `jpeg_compressibility`, `jpeg_incompressibility` | PIL JPEG, quality 95 | -/+ file size in kB; not differentiable |
| `jpeg_*_diff` (compress., incompress.) | kornia's differentiable JPEG, q50 | -/+ mean of ((x - JPEG(x))·255)² |
| `shapes_alignment` | shapes classifier (small CNN, `shapes/weights/`) | mean over 4 attributes of log p(value), ≤ 0 |
| `shapes_exact_match` | the same classifier | 1 if all four argmaxes match the prompt, else 0; not differentiable |
| `owlvit_detect`, `owlvit_remove` | OWL-ViT base-patch32, `queries` | ± sum over detections of (score + box area) |
| `owlvit_count` | OWL-ViT, the object the prompt counts | -(sum of detection scores - n)², n named in the prompt |
| `owlvit_count_exact` | the same detector | 1 if the number of detections is n, else 0; not differentiable |
| `resnet50_target` | ImageNet ResNet-50 (microsoft/resnet-50), `target` class | log p(target) = -cross-entropy, ≤ 0 |
| `imagereward` | ImageReward (BLIP ViT-L + BERT + MLP, THUDM/ImageReward) | (MLP(text-image CLS) - mean) / std |
| `llava_bertscore` | LLaVA-1.5 + BERTScore (DeBERTa-xlarge-MNLI) | BERTScore recall of the answer; not differentiable |
| `remote` | a reward server (`python -m rewards.serve`) | whatever it serves; not differentiable |

Weights are downloaded through huggingface_hub on first use (Hugging Face cache, $HF_HOME). Local copies are
spec options (`aesthetic[clip=DIR;head=FILE]`), or, for the options marked as paths in `_REGISTRY`, keyword
arguments of `load` and environment variables named `{reward}_{key}` (`load(..., aesthetic_head=FILE)`,
`REWARDS_AESTHETIC_HEAD=FILE`). Precedence: spec option > `load` keyword > environment variable > hub.

Only torch is imported here. A reward's module is imported when that reward is loaded (`_REGISTRY` names it as
"module:callable"), so a script pulls in only the rewards it uses; transformers, open_clip, kornia and the HTTP client
are imported by the loaders.
"""

import contextlib
import importlib
import math
import os
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, NamedTuple

import torch

from ._base import Reward, RewardError, RewardSpecError, clip_preprocess
from ._hub import InvalidWeights, WeightsNotFound

__all__ = [
    "REWARDS", "Reward", "RewardError", "RewardSpecError", "Term", "WeightedSum", "WeightsNotFound",
    "clip_preprocess", "is_differentiable", "load", "parse",
]


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


@dataclass(frozen=True)
class _Entry:
    """One reward of the registry. Its module (`rewards/<module>.py`) is imported when the reward is built or its
    help is asked for, never by `import rewards`: a script pulls in only the rewards it loads."""

    target: str  # "module:callable" in rewards/: build(**fixed, device=..., dtype=..., **{keyword: option text})
    differentiable: bool
    fixed: dict = field(default_factory=dict)  # keyword arguments of this entry (e.g. the sign of a JPEG reward)
    options: dict[str, str] = field(default_factory=dict)  # spec option key -> build keyword
    paths: tuple[str, ...] = ()  # keys that are local copies: also load(..., {name}_{key}=) and REWARDS_{NAME}_{KEY}
    # Read from the module's constants (the hub ids live there), so only when they are needed:
    describe: Callable[[ModuleType], dict[str, str]] = lambda m: {}  # spec option key -> one-line description
    fetches: Callable[[ModuleType], tuple] = lambda m: ()  # ((hub repo, `hf download` arguments), ...)

    @property
    def module(self) -> ModuleType:
        return _module(self.target.partition(":")[0])

    @property
    def help(self) -> dict[str, str]:
        return self.describe(self.module)

    @property
    def downloads(self) -> tuple[tuple[str, list[str]], ...]:
        return self.fetches(self.module)

    def build(self, **kwargs) -> Reward:
        factory = self.module
        for name in self.target.partition(":")[2].split("."):
            factory = getattr(factory, name)
        if isinstance(factory, type):  # a reward without weights (JPEG): its class, moved to the device
            return factory(**self.fixed).to(kwargs["device"])
        return factory(**self.fixed, **kwargs)


def _hps_entry(version: str) -> _Entry:
    return _Entry(
        "hps:HPSReward.from_pretrained", True, dict(version=version), {"checkpoint": "checkpoint"}, ("checkpoint",),
        lambda m: {"checkpoint": f"file {m.FILES[version]}"}, lambda m: ((m.REPO, [m.FILES[version]]),),
    )


def _owlvit_entry(cls: str, differentiable: bool, keys: tuple[str, ...], **fixed) -> _Entry:
    def describe(m):
        return {key: text for key, text in {
            "model": f"hub id or directory of {m.MODEL_REPO} (transformers, with its tokenizer)",
            "queries": "text queries separated by '|' (default: detect the prompt itself; remove 'a photo of a "
                       "person')",
            "threshold": f"score above which a box is a detection (default {m.THRESHOLD:g})",
        }.items() if key in keys}

    return _Entry(f"owlvit:{cls}.from_pretrained", differentiable, fixed, {key: key for key in keys},
                  ("model",), describe, lambda m: ((m.MODEL_REPO, m.MODEL_FILES),))


_REGISTRY: dict[str, _Entry] = {
    "aesthetic": _Entry(
        "aesthetic:AestheticReward.from_pretrained", True, {}, {"clip": "clip", "head": "head"}, ("clip", "head"),
        lambda m: {"clip": f"hub id or directory of {m.CLIP_REPO} (transformers)", "head": f"file {m.HEAD_FILE}"},
        lambda m: ((m.CLIP_REPO, m.CLIP_FILES), (m.HEAD_REPO, [m.HEAD_FILE])),
    ),
    "hpsv2": _hps_entry("v2"),
    "hpsv21": _hps_entry("v2.1"),
    "pickscore": _Entry(
        "pickscore:PickScoreReward.from_pretrained", True, {}, {"model": "model", "processor": "processor"},
        ("model", "processor"),
        lambda m: {"model": f"hub id or directory of {m.MODEL_REPO}",
                   "processor": f"hub id or directory of {m.PROCESSOR_REPO} (tokenizer)"},
        lambda m: ((m.MODEL_REPO, m.MODEL_FILES), (m.PROCESSOR_REPO, m.PROCESSOR_FILES)),
    ),
    "jpeg_compressibility": _Entry("jpeg:JpegSize", False, dict(sign=-1.0)),
    "jpeg_incompressibility": _Entry("jpeg:JpegSize", False, dict(sign=+1.0)),
    "jpeg_compressibility_diff": _Entry("jpeg:JpegDistortion", True, dict(sign=-1.0)),
    "jpeg_incompressibility_diff": _Entry("jpeg:JpegDistortion", True, dict(sign=+1.0)),
    "shapes_alignment": _Entry("shapes:ShapesAlignment.from_pretrained", True),
    "shapes_exact_match": _Entry("shapes:ShapesExactMatch.from_pretrained", False),
    "owlvit_detect": _owlvit_entry("OwlViTDetection", True, ("model", "queries", "threshold"), sign=1.0),
    "owlvit_remove": _owlvit_entry("OwlViTDetection", True, ("model", "queries", "threshold"), sign=-1.0),
    "owlvit_count": _owlvit_entry("OwlViTCount", True, ("model", "threshold")),
    "owlvit_count_exact": _owlvit_entry("OwlViTCountExact", False, ("model", "threshold")),
    "resnet50_target": _Entry(
        "resnet:ResNetTarget.from_pretrained", True, {}, {"model": "model", "target": "target"}, ("model",),
        lambda m: {"model": f"hub id or directory of {m.MODEL_REPO} (transformers)",
                   "target": f"ImageNet class name or index 0-999 (default {m.TARGET!r})"},
        lambda m: ((m.MODEL_REPO, m.MODEL_FILES),),
    ),
    "imagereward": _Entry(
        "imagereward:ImageRewardModel.from_pretrained", True, {},
        {"checkpoint": "checkpoint", "med_config": "med_config", "tokenizer": "tokenizer"},
        ("checkpoint", "med_config", "tokenizer"),
        lambda m: {"checkpoint": f"file {m.CHECKPOINT}", "med_config": f"file {m.MED_CONFIG}",
                   "tokenizer": f"hub id or directory of {m.TOKENIZER_REPO} (tokenizer)"},
        lambda m: ((m.REPO, [m.CHECKPOINT, m.MED_CONFIG]), (m.TOKENIZER_REPO, m.TOKENIZER_FILES)),
    ),
    "llava_bertscore": _Entry(
        "llava:LlavaBertScore.from_pretrained", False, {},
        {key: key for key in ("model", "question", "max_new_tokens", "bertscore_model", "bertscore_layer")},
        ("model", "bertscore_model"),
        lambda m: {
            "model": f"hub id or directory of a LLaVA checkpoint in transformers' format (default {m.LLAVA_REPO})",
            "question": f"what LLaVA is asked (default DDPO's {m.QUESTION!r})",
            "max_new_tokens": f"longest answer in tokens (default {m.MAX_NEW_TOKENS}, DDPO's)",
            "bertscore_model": f"hub id or directory of BERTScore's encoder (default {m.BERTSCORE_MODEL}, DDPO's)",
            "bertscore_layer": "the encoder layer whose embeddings are matched (default: bert_score's for the model)"},
        lambda m: ((m.LLAVA_REPO, m.LLAVA_FILES), (m.BERTSCORE_MODEL, _module("bertscore").MODEL_FILES)),
    ),
    "remote": _Entry(
        "remote:RemoteReward.build", False, {}, {"url": "url", "timeout": "timeout", "retries": "retries"}, (),
        lambda m: {"url": "the server's URL, http://host:port (python -m rewards.serve)",
                   "timeout": f"seconds to wait for one answer (default {m.TIMEOUT:g}, at most {m.MAX_TIMEOUT:g})",
                   "retries": f"attempts after a failed one, with backoff (each wait at most {m.MAX_BACKOFF:g} s), "
                              f"before the run stops (default {m.RETRIES}, at most {m.MAX_RETRIES})"},
    ),
}
REWARDS: tuple[str, ...] = tuple(_REGISTRY)
_OPTIONS = tuple(f"{name}_{key}" for name, entry in _REGISTRY.items() for key in entry.paths)  # load() keywords

_GRAMMAR = (
    "a reward spec is name[key=value;...]:weight terms separated by commas, or a reward server's URL, e.g. "
    "'hpsv2:1,aesthetic[head=/models/head.pth]:0.1' or 'http://127.0.0.1:8085'"
)
_URL = re.compile(r"\s*https?://", re.IGNORECASE)
# What may follow a comma that ends a URL term: another term (a name then "[", ":", "," or the end), a URL, nothing.
_AFTER_URL = re.compile(r"\s*($|https?://|[A-Za-z_]\w*\s*(\[|:|$))", re.IGNORECASE)
_TERM = re.compile(r"(?P<name>[^\[\]:]*?)\s*(\[(?P<options>[^\[\]]*)\])?\s*(:(?P<weight>.*))?", re.DOTALL)


class Term(NamedTuple):
    """One term of a reward spec: `name[key=value;...]:weight`; a bare URL is `remote` with option `url`."""

    name: str
    weight: float
    options: dict[str, str]

    @property
    def text(self) -> str:
        """The term without its weight, as written canonically; it keys `WeightedSum.parts` and
        `last_components`."""
        if self.name == "remote" and list(self.options) == ["url"]:
            return self.options["url"]
        if not self.options:
            return self.name
        return f"{self.name}[{';'.join(f'{key}={value}' for key, value in self.options.items())}]"


def _split_terms(spec: str) -> list[str]:
    """Split at the commas outside brackets; a comma inside a URL splits only before what reads as a new term."""
    pieces, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += (char == "[") - (char == "]")
        if depth < 0:
            raise RewardSpecError(f"']' without '[' in reward spec {spec!r}; {_GRAMMAR}")
        if depth > 1:
            raise RewardSpecError(f"nested '[' in reward spec {spec!r}; {_GRAMMAR}")
        if char == "," and depth == 0:
            pieces.append(spec[start:i])
            start = i + 1
    if depth:
        raise RewardSpecError(f"'[' without ']' in reward spec {spec!r}; {_GRAMMAR}")
    terms: list[str] = []
    for piece in pieces + [spec[start:]]:
        if terms and _URL.match(terms[-1]) and not _AFTER_URL.match(piece):
            terms[-1] += "," + piece
        else:
            terms.append(piece)
    return terms


def _parse_options(name: str, text: str, term: str) -> dict[str, str]:
    entry, options = _REGISTRY[name], {}
    if not entry.options:
        raise RewardSpecError(f"reward {name!r} takes no options, got {term!r}; {_GRAMMAR}")
    for item in text.split(";"):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value:
            raise RewardSpecError(f"malformed option {item.strip()!r} in {term!r}, expected key=value; {_GRAMMAR}")
        if key not in entry.options:
            known = "; ".join(f"{key}: {entry.help.get(key, '')}" for key in entry.options)
            raise RewardSpecError(f"unknown option {key!r} of reward {name!r} in {term!r}; its options are {known}")
        if key in options:
            raise RewardSpecError(f"option {key!r} given twice in {term!r}")
        options[key] = value
    return options


def _parse_term(text: str, spec: str) -> Term:
    if _URL.match(text):
        return Term("remote", 1.0, {"url": _module("remote").check_url(text.strip())})
    match = _TERM.fullmatch(text.strip())
    if not match:
        raise RewardSpecError(f"malformed term {text.strip()!r} in reward spec {spec!r}; {_GRAMMAR}")
    name = match["name"].strip()
    if not name:
        raise RewardSpecError(f"empty term {text.strip()!r} in reward spec {spec!r}; {_GRAMMAR}")
    if name not in _REGISTRY:
        raise RewardSpecError(f"unknown reward {name!r} in {spec!r}; known rewards: {', '.join(REWARDS)}")
    options = {} if match["options"] is None else _parse_options(name, match["options"], text.strip())
    weight = 1.0
    if match["weight"] is not None:
        try:
            weight = float(match["weight"])
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise RewardSpecError(
                f"malformed weight {match['weight'].strip()!r} of {name!r} in reward spec {spec!r}, expected a "
                f"finite number; {_GRAMMAR}"
            )
    return Term(name, weight, options)


def parse(spec: str) -> list[Term]:
    """`"hpsv2:1,aesthetic[head=h.pth]:0.1"` -> `[Term("hpsv2", 1.0, {}), Term("aesthetic", 0.1, {"head": "h.pth"})]`.

    Grammar in the module docstring. Raises RewardSpecError naming the bad part for an unknown
    name (listing the known ones), an unknown option key (listing the reward's keys), malformed brackets,
    options or URLs, a malformed or non-finite weight, an empty term, the same term twice. Loads nothing."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"empty reward spec {spec!r}; {_GRAMMAR}; known rewards: {', '.join(REWARDS)}")
    terms: list[Term] = []
    for text in _split_terms(spec):
        term = _parse_term(text, spec)
        if any(term.text == other.text for other in terms):
            raise RewardSpecError(f"reward {term.text!r} appears twice in {spec!r}; give it one weight")
        terms.append(term)
    return terms


def is_differentiable(spec: str) -> bool:
    """Whether gradients reach the pixels for every part of `spec` (no weights are loaded)."""
    return all(_REGISTRY[term.name].differentiable for term in parse(spec))


class WeightedSum(Reward):
    """`sum_i w_i * r_i(images, prompts)`, keyed by term text; keeps the unweighted, detached parts of the last
    call in `last_components`. Non-differentiable parts are scored on detached images without a graph.

    Once `take_recorded()` has been called, every later call's parts are also kept until the next take: a training
    step that scores its batch in chunks gets all of them (common.Logger logs their means as reward/<term>). Calls
    inside `with reward.unrecorded():` (the sample grid's) are not kept."""

    def __init__(self, parts: list[tuple[str, float, Reward]]):
        super().__init__()
        self.weights = {text: weight for text, weight, _ in parts}
        # A ModuleList, not a ModuleDict: term texts hold '.' (paths, URLs), which module names may not.
        self.rewards = torch.nn.ModuleList([reward for _, _, reward in parts])
        self.differentiable = all(reward.differentiable for _, _, reward in parts)
        self.last_components: dict[str, torch.Tensor] = {}
        self._recorded: list[dict[str, torch.Tensor]] | None = None  # None: not recording (nothing piles up)
        self._paused = False
        self.freeze()

    def take_recorded(self) -> dict[str, torch.Tensor]:
        """{term text: unweighted scores [N]} of the calls since the previous take, concatenated in call order
        (empty if there were none); recording starts at the first take."""
        calls, self._recorded = self._recorded or [], []
        return {text: torch.cat([call[text] for call in calls]) for text in self.weights} if calls else {}

    @contextlib.contextmanager
    def unrecorded(self):
        paused, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = paused

    @property
    def parts(self) -> dict[str, Reward]:
        return dict(zip(self.weights, self.rewards))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        total, components = 0.0, {}
        for text, reward in self.parts.items():
            if reward.differentiable:
                score = reward(images, prompts)
            else:
                with torch.no_grad():
                    score = reward(images.detach(), prompts)
            components[text] = score.detach()
            total = total + self.weights[text] * score
        self.last_components = components
        if self._recorded is not None and not self._paused:
            self._recorded.append(components)
        return total

    def extra_repr(self) -> str:
        return ",".join(f"{text}:{weight:g}" for text, weight in self.weights.items())


def _local_copies(name: str, entry: _Entry) -> str:
    if not entry.paths:
        return ""
    spec = f"--reward '{name}[{';'.join(f'{key}=PATH' for key in entry.paths)}]'"
    keywords = ", ".join(f"{name}_{key}=PATH (or env REWARDS_{name.upper()}_{key.upper()})" for key in entry.paths)
    return f"Local copies for '{name}': {spec}, or rewards.load(..., {keywords})."


def load(spec: str, device="cpu", dtype: torch.dtype = torch.float32, **paths) -> WeightedSum:
    """Build the reward(s) of `spec` (see `parse`) on `device` in `dtype`, downloading weights on first use.

    `paths` are the local-copy keywords `{reward}_{key}` of the path options (each also read from the environment
    variable `REWARDS_{REWARD}_{KEY}`); an option in the spec overrides both. Missing weights raise
    `WeightsNotFound` naming what to download."""
    unknown = sorted(set(paths) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown reward option(s) {unknown}; known: {', '.join(_OPTIONS)}")
    parts = []
    for term in parse(spec):
        entry = _REGISTRY[term.name]
        kwargs = {}
        for key in entry.paths:  # precedence: spec option > load() keyword > environment variable
            option = f"{term.name}_{key}"
            value = term.options.get(key) or paths.get(option) or os.environ.get(f"REWARDS_{option.upper()}")
            if value:
                kwargs[entry.options[key]] = value
        kwargs.update({entry.options[key]: value for key, value in term.options.items()})
        try:
            reward = entry.build(device=device, dtype=dtype, **kwargs)
        except WeightsNotFound as e:
            everything = "\n".join(f"    hf download {repo} {' '.join(args)}" for repo, args in entry.downloads)
            local = _local_copies(term.name, entry)
            e.args = (f"{e.args[0]}\nEverything '{term.name}' downloads:\n{everything}\n{local}",)
            raise
        except InvalidWeights as e:
            e.args = (f"reward '{term.name}': {e.args[0]}",)
            raise
        parts.append((term.text, term.weight, reward))
    return WeightedSum(parts)
