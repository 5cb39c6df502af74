"""`llava_bertscore`: DDPO's prompt-image alignment reward. LLaVA answers a question about the image, and the reward
is the BERTScore recall of the answer against a sentence made from the prompt. Black box (text in the middle).

What DDPO did (github.com/kvablack/ddpo-pytorch at 1958463, ddpo_pytorch/rewards.py `llava_bertscore`, and its
server github.com/kvablack/LLaVA-server: app.py, llava_server/llava.py, llava_server/bertscore.py):
- question, one per image: "Answer concisely: what is going on in this image?";
- reference sentence: "The image contains {prompt}"; the reward is BERTScore's recall of LLaVA's answer (the
  candidate) against it ("use the recall score as the reward"); precision and F1 were only logged;
- BERTScore: `bert_score.BERTScorer("microsoft/deberta-xlarge-mnli", use_fast_tokenizer=True)`, so no idf, no
  baseline rescaling, bert_score's layer for that model (40), float32 (see rewards/bertscore.py);
- LLaVA: the original (pre-1.5) LLaVA code, `llava @ git+https://github.com/haotian-liu/LLaVA.git@0818b7a`, with a
  checkpoint path the code does not name; float16; greedy (argmax) decoding of at most 64 tokens (MAX_TOKENS); the
  text before the image is "You are an assistant that is able to understand the visual content that the user
  provides. " (a second sentence in llava.py is a separate string statement, so it never reached the model), then
  the question followed by "###"; the answer is cut at "#" and after "Assistant:";
- the client sent batches of 16 images, JPEG-compressed at quality 80, pickled.

Here: LLaVA-1.5 through transformers (`llava-hf/llava-1.5-7b-hf` by default, any LLaVA checkpoint in that format
with `model=`), its conversation format "USER: <image>\\n{question} ASSISTANT:", greedy decoding of at most
`max_new_tokens` (64), the answer being the generated text up to the end token. Images are given to the processor
as 8-bit RGB without the JPEG step. DDPO's own LLaVA weights and prompt format are not reproduced: its LLaVA
predates the transformers port.

    rewards.load("llava_bertscore", device="cuda", dtype=torch.float16)
    rewards.load("llava_bertscore[model=/models/llava-1.5-13b-hf;max_new_tokens=32]")
    python -m rewards.serve --reward llava_bertscore --port 8085        # on the GPU(s) that hold LLaVA
"""

import torch

from . import _hub
from ._base import Reward, RewardSpecError, model_device_dtype
from ._options import as_int
from .bertscore import DEFAULT_MODEL as BERTSCORE_MODEL
from .bertscore import BertScore
from .remote import to_uint8

LLAVA_REPO = "llava-hf/llava-1.5-7b-hf"
LLAVA_FILES = ["--include", "*.json", "*.safetensors", "tokenizer.model"]  # `hf download` arguments
QUESTION = "Answer concisely: what is going on in this image?"  # DDPO's
REFERENCE = "The image contains {prompt}"  # DDPO's
MAX_NEW_TOKENS = 64  # DDPO's LLaVA server: MAX_TOKENS


def build_prompt(question: str) -> str:
    """LLaVA-1.5's conversation format for one image (llava-hf's model card and chat template)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def parse_answer(tokenizer, new_tokens: list[int], end_tokens: set[int]) -> str:
    """The answer in the tokens generated after the prompt: up to the first end token, without special tokens
    (padding of sequences that ended early), stripped."""
    end = next((i for i, token in enumerate(new_tokens) if token in end_tokens), len(new_tokens))
    return tokenizer.decode(new_tokens[:end], skip_special_tokens=True).strip()


class LlavaBertScore(Reward):
    """BERTScore recall of LLaVA's answer to `question` against "The image contains {prompt}", about 0.5-0.8 for
    DeBERTa. `last_answers` holds the answers of the last call."""

    differentiable = False

    def __init__(self, llava, processor, bertscore: BertScore, question: str = QUESTION,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        super().__init__()
        self.llava, self.bertscore, self.processor = llava, bertscore, processor
        self.processor.tokenizer.padding_side = "left"  # batched generation continues each prompt from its end
        self.question, self.max_new_tokens = question, max_new_tokens
        ends = self.llava.generation_config.eos_token_id
        self.end_tokens = {*(ends if isinstance(ends, list) else [ends]), processor.tokenizer.eos_token_id} - {None}
        self.last_answers: list[str] = []
        self.freeze()

    @classmethod
    def from_pretrained(cls, model: str = LLAVA_REPO, question: str = QUESTION, max_new_tokens=MAX_NEW_TOKENS,
                        bertscore_model: str = BERTSCORE_MODEL, bertscore_layer=None, device="cpu",
                        dtype=torch.float32) -> "LlavaBertScore":
        """`model`, `bertscore_model`: hub ids or local directories (transformers format). Option values may be
        text (from the reward spec). The processor is read first and LLaVA's weights last, so that an offline
        machine fails before gigabytes are loaded."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        max_new_tokens = as_int(max_new_tokens, "max_new_tokens", minimum=1)
        layer = None if bertscore_layer is None else as_int(bertscore_layer, "bertscore_layer", minimum=1)
        if not str(question).strip():
            raise RewardSpecError("option question= is empty")
        processor = _hub.pretrained(AutoProcessor.from_pretrained, model, LLAVA_FILES)
        bertscore = BertScore.from_pretrained(bertscore_model, layer, device)
        load = lambda path: LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)  # noqa: E731
        llava = _hub.pretrained(load, model, LLAVA_FILES).to(device)
        return cls(llava, processor, bertscore, str(question).strip(), max_new_tokens)

    @torch.no_grad()
    def answer(self, images: torch.Tensor) -> list[str]:
        """LLaVA's greedy answers to the question, one per image [B,3,H,W] in [0,1]."""
        from PIL import Image

        pictures = [Image.fromarray(pixels) for pixels in to_uint8(images)]
        prompts = [build_prompt(self.question)] * len(pictures)
        inputs = self.processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
        device, dtype = model_device_dtype(self.llava)
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        tokens = self.llava.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                     pad_token_id=self.processor.tokenizer.pad_token_id)
        new = tokens[:, inputs["input_ids"].shape[1]:].tolist()  # generate returns the prompt, then the answer
        return [parse_answer(self.processor.tokenizer, row, self.end_tokens) for row in new]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        self.last_answers = self.answer(images)
        _, recall, _ = self.bertscore(self.last_answers, [REFERENCE.format(prompt=p) for p in prompts])
        return recall.float().to(images.device)
