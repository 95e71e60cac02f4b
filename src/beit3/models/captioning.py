"""Image captioning: masked fine-tuning under a causal text mask, beam search with a KV cache."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit3.config import Beit3Config
from beit3.layers import KVCache, caption_attention_mask
from beit3.models.backbone import Beit3Model
from beit3.models.base import INIT_STD, Beit3PreTrainedModel
from beit3.models.heads import init_head
from beit3.models.outputs import CaptioningOutput

OFFICIAL_VOCAB_SIZE = 64010
OFFICIAL_MASK_TOKEN_ID = 64001
"""The [MASK] id of the released beit3.spm vocabulary (64010 rows): the default only there."""


def captioning_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float,
    drop_worst_ratio: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL divergence to a smoothed one-hot, per masked token, averaged (the release's loss).

    The target word gets 1 - eps and every other word eps / (V - 1) (not eps / V as in
    ``F.cross_entropy``'s smoothing). With ``drop_worst_ratio`` r > 0, only the (1 - r) fraction
    of tokens with the lowest loss count: late in training this ignores noisy captions.
    logits: (..., V); targets: (...) word ids; mask: (...) bool, the tokens the loss is taken at
    (None: all of them).

    Every shape is fixed by the inputs' shapes, never by how many tokens are masked: the loss of
    every position is computed and the masked ones averaged, and dropping the worst keeps the
    first ``max(1, int(M * (1 - r)))`` of the M masked losses sorted ascending (the same count as
    a top-k over the masked losses alone). So ``torch.compile`` traces it as one graph. With no
    masked token the loss is 0 (and its gradient zero).
    """
    vocab = logits.shape[-1]
    logits, targets = logits.reshape(-1, vocab), targets.reshape(-1)
    mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    targets = torch.where(mask, targets, torch.zeros_like(targets))  # unmasked labels may be anything (-100)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    eps = label_smoothing
    target_log_prob = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    if eps > 0:
        other = eps / (vocab - 1)
        # sum_c t_c log t_c, the entropy term that makes this a KL divergence (0 for a one-hot).
        entropy = (1 - eps) * math.log(1 - eps) + eps * math.log(other)
        cross = (1 - eps) * target_log_prob + other * (log_probs.sum(-1) - target_log_prob)
        per_token = entropy - cross
    else:
        per_token = -target_log_prob
    count = mask.sum()
    if drop_worst_ratio > 0:
        # as int(M * (1 - r)) in Python: the product in float64 (float32 would round 10 * 0.7 below 7)
        wide = torch.float32 if count.device.type == "mps" else torch.float64
        keep = torch.minimum((count.to(wide) * (1 - drop_worst_ratio)).floor().long().clamp(min=1), count)
        per_token = torch.where(mask, per_token, torch.full_like(per_token, float("inf"))).sort().values
        mask = torch.arange(per_token.shape[0], device=per_token.device) < keep  # the `keep` lowest
        count = keep
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total / count.clamp(min=1)


class Beit3ForCaptioning(Beit3PreTrainedModel):
    """Image + text -> next-word scores at every text position.

    Training (the release's recipe): some caption tokens are replaced by [MASK] (or a random or
    the same word); each text token sees the image and the text up to itself, so the masked slot
    predicts its word from the image and the words to its left. Decoding appends a [MASK] after
    the words so far and reads the prediction there (``generate``).
    """

    official_final_norm = True
    vocab_heads = ("mlm_head",)

    def __init__(
        self,
        config: Beit3Config,
        bos_token_id: int = 0,
        pad_token_id: int = 1,
        eos_token_id: int = 2,
        mask_token_id: int | None = None,
        label_smoothing: float = 0.1,
    ):
        super().__init__(config)
        if mask_token_id is None and config.vocab_size == OFFICIAL_VOCAB_SIZE:
            mask_token_id = OFFICIAL_MASK_TOKEN_ID
        # Another vocabulary: the [MASK] id is the tokenizer's (None until given). Loading the
        # weights never needs it; only generate() does, and it says what to pass.
        for name, value in (("bos", bos_token_id), ("pad", pad_token_id), ("eos", eos_token_id), ("mask", mask_token_id)):
            if value is not None and not 0 <= value < config.vocab_size:
                raise ValueError(f"{name}_token_id {value} is outside the vocabulary (size {config.vocab_size})")
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        self.eos_token_id, self.mask_token_id = eos_token_id, mask_token_id
        self.label_smoothing = label_smoothing
        self.beit3 = Beit3Model(config)
        self.mlm_head = nn.Linear(config.hidden_size, config.vocab_size)
        init_head(self.mlm_head, std=INIT_STD)  # as the pretraining heads: logits start near uniform

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        drop_worst_ratio: float = 0.0,
    ) -> CaptioningOutput:
        """labels: (B, T) original ids; masked_positions: (B, T) bool, where the loss is taken."""
        num_image = (pixel_values.shape[-2] // self.config.patch_size) * (pixel_values.shape[-1] // self.config.patch_size) + 1
        mask = caption_attention_mask(num_image, input_ids.shape[1], device=input_ids.device)
        out = self.beit3(pixel_values, input_ids, attention_mask, attn_mask=mask)
        logits = self.mlm_head(out.last_hidden_state[:, out.vision_len:])  # (B, T, V)
        loss = None
        if labels is not None:
            if masked_positions is None:
                raise ValueError("labels need masked_positions: the loss is taken only at the masked tokens")
            # over every position, weighted by the mask: no shape depends on how many tokens are masked
            loss = captioning_loss(logits, labels, self.label_smoothing, drop_worst_ratio, mask=masked_positions)
        return CaptioningOutput(logits=logits, loss=loss)

    def _next_word_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.mlm_head(hidden[:, -1]).float(), dim=-1)  # the [MASK] slot, (B, V)

    def decode_step(self, words: torch.Tensor, cache: KVCache, mask_token_id: int,
                    num_image: int) -> tuple[torch.Tensor, KVCache]:
        """One cached decoding step: the newest word of each sequence (N,) and the cache of the
        ``num_image`` image tokens, BOS and the words before it -> next-word log-probabilities (N, V)
        and the cache with the word added.

        Runs the word and a [MASK] slot after it. Every length is read off the cache's shape, so the
        step traces as one graph (``torch.compile``); the beam bookkeeping around it stays in Python.
        """
        past = cache.length
        step_ids = torch.stack([words, torch.full_like(words, mask_token_id)], 1)  # (N, 2)
        rows = caption_attention_mask(num_image, past - num_image + 2, device=words.device)[-2:]
        out = self.beit3(input_ids=step_ids, attn_mask=rows, past_key_values=cache, use_cache=True,
                         text_position_offset=past - num_image)
        # keep the word, drop the [MASK] slot
        return self._next_word_log_probs(out.last_hidden_state), out.past_key_values.truncate(past + 1)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        num_beams: int = 3,
        max_length: int = 32,
        length_penalty: float = 0.6,
        use_cache: bool = True,
        min_length: int = 3,
        mask_token_id: int | None = None,
    ) -> torch.Tensor:
        """Beam search; returns ids (B, L): BOS, words, EOS, then padding.

        max_length counts every text token including BOS and EOS (the release's
        ``num_max_bpe_tokens``); so does min_length: EOS cannot be chosen before a caption has
        ``min_length - 2`` words (the default 3: at least one word, never an empty caption).
        mask_token_id: the tokenizer's ``<mask>`` id, when the model does not know it (a
        vocabulary other than the official one, loaded without its tokenizer). A finished caption scores sum(log p) / len ** length_penalty
        with len = words + 2, and a batch item stops once its best finished caption beats the
        best running beam's bound; at the last step every candidate is finished.
        With ``use_cache`` the image and the words so far are encoded once and each step only
        runs the newest word and the [MASK] slot; without it the whole prefix is recomputed
        (same result, for checking).
        """
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (BOS, a word, EOS), got {max_length}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if not 2 <= min_length <= max_length:
            raise ValueError(f"min_length must be between 2 (BOS, EOS: an empty caption allowed) and max_length "
                             f"({max_length}), got {min_length}")
        mask_id = self.mask_token_id if mask_token_id is None else mask_token_id
        if mask_id is None:
            raise ValueError("this captioning model does not know its [MASK] token id (its vocabulary of "
                             f"{self.config.vocab_size} rows is not the official one): pass mask_token_id= the "
                             "tokenizer's mask_token_id (`beit3 predict caption --mask-token-id N`), or set "
                             "model.mask_token_id")
        if not 0 <= mask_id < self.config.vocab_size:
            raise ValueError(f"mask_token_id {mask_id} is outside the vocabulary (size {self.config.vocab_size})")
        batch, device = pixel_values.shape[0], pixel_values.device
        beams, vocab = num_beams, self.config.vocab_size
        num_image = (pixel_values.shape[-2] // self.config.patch_size) * (pixel_values.shape[-1] // self.config.patch_size) + 1
        bos_mask = torch.tensor([[self.bos_token_id, mask_id]], device=device).expand(batch, 2)

        # Step 1 runs once per image (not once per beam), then the cache is repeated per beam.
        out = self.beit3(pixel_values, bos_mask, attn_mask=caption_attention_mask(num_image, 2, device=device),
                         use_cache=use_cache)
        log_probs = self._next_word_log_probs(out.last_hidden_state).repeat_interleave(beams, dim=0)
        per_beam = torch.arange(batch, device=device).repeat_interleave(beams)
        cache = out.past_key_values.truncate(num_image + 1).select(per_beam) if use_cache else None
        images = None if use_cache else pixel_values.index_select(0, per_beam)

        beam_scores = torch.zeros(batch, beams, device=device)
        beam_scores[:, 1:] = -1e9  # all beams start identical: keep only one alive at step 1
        words = torch.empty(batch * beams, 0, dtype=torch.long, device=device)
        best: list[tuple[float, list[int]] | None] = [None] * batch
        done = [False] * batch
        cur_len = 2  # BOS + [MASK]
        while True:
            if cur_len < min_length:  # choosing EOS now would end the caption below min_length
                log_probs[:, self.eos_token_id] = float("-inf")
            scores = (beam_scores.view(-1, 1) + log_probs).view(batch, beams * vocab)
            top_scores, top_index = scores.topk(min(3 * beams, beams * vocab), dim=1)
            last_step = cur_len + 1 >= max_length
            next_scores = torch.full((batch, beams), -1e9, device=device)
            next_beam = torch.zeros(batch, beams, dtype=torch.long, device=device)
            next_word = torch.full((batch, beams), self.pad_token_id, dtype=torch.long, device=device)
            for b in range(batch):
                if done[b]:
                    continue
                filled = 0
                for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                    beam, word = divmod(index, vocab)
                    if word == self.eos_token_id or last_step:
                        normalised = score / cur_len**length_penalty
                        if best[b] is None or normalised > best[b][0]:
                            best[b] = (normalised, words[b * beams + beam].tolist() + [word])
                    else:
                        next_scores[b, filled], next_beam[b, filled], next_word[b, filled] = score, beam, word
                        filled += 1
                    if filled == beams:
                        break
                bound = next_scores[b].max().item() / (max_length - 1) ** length_penalty
                done[b] = last_step or (best[b] is not None and best[b][0] >= bound)
            if all(done):
                break

            order = (torch.arange(batch, device=device)[:, None] * beams + next_beam).view(-1)
            words = torch.cat([words.index_select(0, order), next_word.view(-1, 1)], dim=1)
            beam_scores = next_scores
            if use_cache:
                log_probs, cache = self.decode_step(next_word.view(-1), cache.select(order), mask_id, num_image)
            else:
                prefix = torch.cat([torch.full_like(words[:, :1], self.bos_token_id), words,
                                    torch.full_like(words[:, :1], mask_id)], dim=1)
                out = self.beit3(images, prefix, attn_mask=caption_attention_mask(num_image, cur_len + 1, device=device))
                log_probs = self._next_word_log_probs(out.last_hidden_state)
            cur_len += 1

        rows = []
        for item in best:
            tokens = [self.bos_token_id] + item[1]
            if tokens[-1] != self.eos_token_id:
                tokens.append(self.eos_token_id)
            rows.append(tokens)
        width = max(len(r) for r in rows)
        result = torch.full((batch, width), self.pad_token_id, dtype=torch.long, device=device)
        for b, tokens in enumerate(rows):
            result[b, : len(tokens)] = torch.tensor(tokens, device=device)
        return result

    # ------------------------------------------------------------------------------------------
    def head_args(self) -> dict[str, Any]:
        return {"bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
                "eos_token_id": self.eos_token_id, "mask_token_id": self.mask_token_id,
                "label_smoothing": self.label_smoothing}
