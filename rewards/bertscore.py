"""BERTScore (Zhang et al., "BERTScore: Evaluating Text Generation with BERT", ICLR 2020) in torch, computed the way
the `bert_score` package does it (github.com/Tiiiger/bert_score at 19e7f55: bert_score/utils.py `sent_encode`,
`get_model`, `greedy_cos_idf`; bert_score/scorer.py `BERTScorer.score`):

- tokens: `tokenizer.encode(sentence.strip(), add_special_tokens=True, truncation=True)` up to the tokenizer's
  `model_max_length` (an empty sentence is just the special tokens);
- token embeddings: the output of layer `layer` of the encoder (bert_score cuts the model after that layer), one
  per token, special tokens included;
- no idf (bert_score's default, and DDPO's): every token weighs 1 except the [CLS] and [SEP] tokens, which weigh 0
  but still take part in the matching (a reference token may find its best match in the candidate's [SEP]);
- greedy matching on cosine similarity: precision P = Σ_i w_i max_j cos(c_i, r_j) / Σ_i w_i over the candidate's
  tokens i, recall R the same over the reference's tokens j, F = 2PR / (P + R) (0 where that is NaN); a candidate
  or reference with no token but the special ones gets P = R = 0;
- layers (bert_score's `model2layers`): 40 for microsoft/deberta-xlarge-mnli (the model DDPO's LLaVA server used,
  github.com/kvablack/LLaVA-server llava_server/bertscore.py), 17 for roberta-large (its English default).

One difference: bert_score pads a batch and sets the similarities of padding positions to 0 before taking the
maxima, so in a padded batch a token whose similarities are all negative scores 0 instead of its best similarity;
here padding is left out, and a pair's score does not depend on the other pairs in its batch.
"""

import torch

from . import _hub
from ._base import RewardSpecError

DEFAULT_MODEL = "microsoft/deberta-xlarge-mnli"
# `hf download` arguments: the repo holds a PyTorch .bin (3 GB) and TF weights; the tokenizer is GPT-2's BPE.
MODEL_FILES = ["config.json", "pytorch_model.bin", "vocab.json", "merges.txt", "tokenizer_config.json"]
LAYERS = {"microsoft/deberta-xlarge-mnli": 40, "roberta-large": 17}  # bert_score's model2layers


class BertScore(torch.nn.Module):
    """`bertscore(candidates, references) -> (precision, recall, f1)`, each float32 [N], on the encoder's device."""

    def __init__(self, encoder, tokenizer, layer: int):
        super().__init__()
        self.encoder, self.tokenizer, self.layer = encoder, tokenizer, layer
        self.special = {tokenizer.cls_token_id, tokenizer.sep_token_id} - {None}
        self.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, layer: int | None = None, device="cpu") -> "BertScore":
        """`model`: hub id or directory (transformers); `layer`: bert_score's for known hub ids, else the last.
        The encoder stays in float32, as bert_score runs it."""
        from transformers import AutoModel, AutoTokenizer

        tokenizer = _hub.pretrained(AutoTokenizer.from_pretrained, model, MODEL_FILES)
        encoder = _hub.pretrained(AutoModel.from_pretrained, model, MODEL_FILES)
        if layer is None:
            layer = LAYERS.get(model, encoder.config.num_hidden_layers)
        if not 1 <= layer <= encoder.config.num_hidden_layers:
            raise RewardSpecError(f"BERTScore layer {layer} out of range 1..{encoder.config.num_hidden_layers} "
                                  f"for {model!r}")
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
        if isinstance(layers, torch.nn.ModuleList):
            del layers[layer:]  # never used: bert_score drops them too (memory, time)
        return cls(encoder.to(device), tokenizer, layer)

    def embed(self, sentences: list[str]):
        """Unit-norm token embeddings [N, L, D], token weights [N, L] (0 for special tokens and padding) and the
        mask of real tokens [N, L]."""
        batch = self.tokenizer([s.strip() for s in sentences], add_special_tokens=True, truncation=True,
                               max_length=self.tokenizer.model_max_length, padding=True, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        embeddings = torch.nn.functional.normalize(hidden[self.layer].float(), dim=-1)
        special = torch.zeros_like(mask)
        for token in self.special:
            special |= ids == token
        return embeddings, (mask & ~special).float(), mask

    @torch.no_grad()
    def forward(self, candidates: list[str], references: list[str]):
        if len(candidates) != len(references):
            raise ValueError(f"got {len(candidates)} candidates but {len(references)} references")
        c, c_weight, c_mask = self.embed(candidates)
        r, r_weight, r_mask = self.embed(references)
        similarity = c @ r.transpose(1, 2)  # [N, candidate tokens, reference tokens]
        pairs = c_mask[:, :, None] & r_mask[:, None, :]
        similarity = similarity.masked_fill(~pairs, float("-inf"))
        best_for_candidate = similarity.amax(dim=2).masked_fill(~c_mask, 0)  # padding: weight 0, kept finite
        best_for_reference = similarity.amax(dim=1).masked_fill(~r_mask, 0)
        c_total, r_total = c_weight.sum(1), r_weight.sum(1)
        precision = (best_for_candidate * c_weight).sum(1) / c_total.clamp_min(1e-12)
        recall = (best_for_reference * r_weight).sum(1) / r_total.clamp_min(1e-12)
        empty = (c_total == 0) | (r_total == 0)  # only special tokens: bert_score's 0
        precision, recall = precision.masked_fill(empty, 0), recall.masked_fill(empty, 0)
        f1 = torch.nan_to_num(2 * precision * recall / (precision + recall), nan=0.0)
        return precision, recall, f1
