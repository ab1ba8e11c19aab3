"""Replaced-token detection (ELECTRA), with a discriminator that sees the image.

MLM learns only from the 15% of positions it masks; ELECTRA's discriminator learns
from every token. A small *generator* fills the masked positions of a caption with
plausible words; the *discriminator* reads the corrupted caption and tells, for every
token, whether it is the original or a replacement:

1. ``prepare`` (worker) selects word pieces with p = 0.15 (at least one) and puts
   ``[MASK]`` at 85% of them (ELECTRA's code keeps the other 15%), recording the
   originals in ``rtd_labels``.
2. The generator is a small transformer of its own (``generator_size`` of the trunk's
   width: ELECTRA finds 1/4 to 1/2 best; a generator as strong as the discriminator
   makes the task too hard) over the masked caption alone. It shares the word and
   position embeddings with the trunk (as ELECTRA does) and predicts the originals
   through a decoder tied to the word embeddings: an MLM loss on masked positions.
3. Replacements are *sampled* from the generator's distribution (no gradient flows
   through the sampling; the generator is trained only by its MLM loss). A sampled
   token equal to the original counts as original.
4. The discriminator is the shared trunk on the corrupted caption *and the regions*,
   with a small binary head on every text state: a replaced color word (``red`` for
   ``blue``) is only detectable by looking at the image.

loss = generator MLM loss + λ · discriminator binary cross-entropy (mean over the
batch's text tokens); ELECTRA uses λ = 50, as the per-token binary loss is much
smaller than the MLM loss. After pretraining the trunk is the discriminator.

The task's joint pass (over the masked caption) is not used: the discriminator needs
the corrupted caption, known only after the generator has run, so ``rtd`` encodes it
itself. Keep it in a task of its own; masking objectives in the same task would
mask the caption twice.

Evaluation reports ``rtd_disc_acc`` (per-token replaced/original accuracy on
held-out captions) and ``rtd_gen_acc`` (the generator's masked-token accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective
from vlpt.data.masking import IGNORE, mask_tokens
from vlpt.model import Trunk, init_weights
from vlpt.model.embeddings import LN_EPS


def sample_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row drawn from softmax(logits), by the Gumbel-max trick: (n, V) -> (n,)."""
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-9, 1 - 1e-9)
    return (logits.float() - torch.log(-torch.log(u))).argmax(-1)


@register_objective("rtd")
class ReplacedTokenDetection(Objective):
    needs = {"text", "image"}
    pad_values = {"rtd_labels": IGNORE}

    @dataclass
    class Options:
        prob: float = 0.15  # chance a word piece is selected for replacement
        mask_frac: float = 0.85  # selected -> [MASK] (the rest stay unchanged), as ELECTRA's code
        generator_size: float = 0.25  # generator width (hidden, heads, FFN) as a fraction of the trunk's
        generator_layers: Optional[int] = None  # None: as deep as the trunk (ELECTRA)
        disc_weight: float = 50.0  # λ: weight of the discriminator's loss (ELECTRA: 50)

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        cfg = model.config
        H, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.heads
        heads = max(1, round(cfg.heads * options.generator_size))
        h = heads * head_dim  # the generator's width: whole heads of the trunk's head size
        # generator: shared embeddings (H) -> h -> a small trunk -> BERT head transform back to H
        self.gen_in = nn.Linear(H, h)
        self.generator = Trunk(h, options.generator_layers or cfg.layers, heads, 4 * h, cfg.dropout)
        self.gen_head = nn.Sequential(nn.Linear(h, H), nn.GELU(), nn.LayerNorm(H, eps=LN_EPS))
        self.gen_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # decoder weight: the word embeddings
        # discriminator head on the trunk's text states (ELECTRA: dense, GELU, one logit)
        self.disc_head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, 1))
        init_weights(self)

    def prepare(self, sample, rng, pool=None):
        o, tok = self.options, self.tokenizer
        sample["input_ids"], sample["rtd_labels"] = mask_tokens(
            sample["input_ids"], rng, tok.mask_id, tok.vocab_size, tok.special_ids, o.prob, o.mask_frac, 0.0
        )
        return sample

    def detect(self, model, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Generator, sampling, discriminator on one batch; the tensors the loss and metrics need."""
        labels = batch["rtd_labels"]  # (B, T): original id where selected, IGNORE elsewhere
        selected = labels != IGNORE
        # generator: a small MLM over the masked caption alone
        x = self.gen_in(model.text_embedder(batch["input_ids"]))  # (B, T, h): the shared embeddings, narrowed
        g = self.generator(x, batch["text_mask"])  # (B, T, h)
        gen_logits = F.linear(self.gen_head(g[selected]), model.word_embeddings.weight, self.gen_bias)  # (n, V)
        target = labels[selected]  # (n,)
        # corrupt: the original caption with sampled words at the selected positions
        original = torch.where(selected, labels, batch["input_ids"])  # (B, T)
        corrupted = original.clone()
        corrupted[selected] = sample_tokens(gen_logits.detach(), generator)
        # discriminator: the shared trunk on the corrupted caption and the image
        states = model({**batch, "input_ids": corrupted}).text  # (B, T, H)
        disc_logits = self.disc_head(states).squeeze(-1)  # (B, T)
        text = batch["text_mask"]
        return {"gen_logits": gen_logits, "target": target, "disc_logits": disc_logits[text],
                "replaced": (corrupted != original)[text]}

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        r = self.detect(out.model, batch)
        gen_loss = F.cross_entropy(r["gen_logits"].float(), r["target"])
        disc_loss = F.binary_cross_entropy_with_logits(r["disc_logits"].float(), r["replaced"].float())
        loss = gen_loss + self.options.disc_weight * disc_loss
        return ObjectiveOutput(loss, {
            "gen_loss": gen_loss.detach(),
            "disc_loss": disc_loss.detach(),
            "gen_acc": (r["gen_logits"].argmax(-1) == r["target"]).float().mean().detach(),
            "disc_acc": ((r["disc_logits"] > 0) == r["replaced"]).float().mean().detach(),
            "replaced": r["replaced"].float().mean().detach(),  # fraction of text tokens replaced
        })

    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        rng = np.random.default_rng(0)
        generator = torch.Generator(device=data.device).manual_seed(0)
        views = [self.prepare(dict(s), rng) for s in data.samples if "input_ids" in s]
        disc = disc_n = gen = gen_n = 0
        for batch in data.batches(views):
            r = self.detect(model, batch, generator)
            disc += int(((r["disc_logits"] > 0) == r["replaced"]).sum())
            disc_n += r["replaced"].numel()
            gen += int((r["gen_logits"].argmax(-1) == r["target"]).sum())
            gen_n += r["target"].numel()
        return {"rtd_disc_acc": disc / max(disc_n, 1), "rtd_gen_acc": gen / max(gen_n, 1)} if disc_n else {}
