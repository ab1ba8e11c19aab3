"""Word-region alignment by optimal transport (UNITER's WRA).

Rides on the ITM task's forward pass (``tasks.itm.objectives: {itm: 1.0, wra: 0.1}``):
for every pair in the batch, the cost between the caption's final states
(``[CLS]`` and ``[SEP]`` included, as UNITER's code does) and the regions' final
states is C_ij = 1 − cos(t_i, v_j); IPOT finds the transport plan T (no gradient,
fp32); the distance D = ⟨C, T⟩ pulls matched pairs together and pushes
mismatched ones apart:

    loss = (Σ_pos D − Σ_neg D) / (N_pos + N_neg)

Evaluation reports ``grounding_acc``: for each caption word that names an object
(data with grounding metadata, e.g. shapes), whether its highest plan weight
falls on that object's region.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective
from vlpt.batch import META
from vlpt.ot import cosine_cost, ipot_plan, ot_distance


@register_objective("wra")
class WordRegionAlignment(Objective):
    needs = {"text", "image"}
    needs_all_states = True  # every token and region
    uses = ("itm_label",)  # which pairs are matched: left by itm before it in the task

    @dataclass
    class Options:
        beta: float = 0.5  # IPOT proximal step (UNITER: 0.5)
        iterations: int = 50  # outer IPOT iterations
        inner_steps: int = 1  # Sinkhorn-like inner steps per iteration

    def plan_and_cost(self, out: EncoderOutput, batch):
        text_mask, region_mask = batch["text_mask"], batch["region_mask"]
        cost = cosine_cost(out.text.float(), out.regions.float())  # (B, T, K)
        o = self.options
        plan = ipot_plan(cost.detach(), text_mask, region_mask, o.beta, o.iterations, o.inner_steps,
                         max_spread=2.0)  # (B, T, K); cosine costs lie in [0, 2]: no device read
        return cost, plan

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        cost, plan = self.plan_and_cost(out, batch)
        distance = ot_distance(cost, plan)  # (B,)
        positive = out.shared["itm_label"] == 1  # (B,)
        signed = torch.where(positive, distance, -distance)  # masked, not indexed: no device sync
        loss = signed.sum() / distance.numel()
        d = distance.detach()
        pos_distance = (d * positive).sum() / positive.sum().clamp_min(1)  # mean over matched pairs; 0 if none
        return ObjectiveOutput(loss, {"pos_distance": pos_distance})

    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        views = [dict(s) for s in data.samples if (s.get(META) or {}).get("objects")]
        correct = total = 0
        offset = 0
        for batch in data.batches(views):
            out = data.encode(model, batch)
            _, plan = self.plan_and_cost(out, batch)  # (B, T, K)
            best = plan.argmax(-1).cpu().numpy()  # (B, T): the region each token sends most mass to
            for b in range(best.shape[0]):
                sample = views[offset + b]
                word_ids = np.asarray(sample["word_ids"])
                for obj in sample[META]["objects"]:
                    for word in obj.get("words", {}).values():
                        positions = np.flatnonzero(word_ids == word)
                        correct += int((best[b, positions] == obj["region"]).sum())
                        total += len(positions)
            offset += best.shape[0]
        return {"grounding_acc": correct / max(total, 1)} if total else {}
