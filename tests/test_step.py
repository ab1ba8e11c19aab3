"""The training step: fused AdamW, clipping and non-finite skips on the device, no device reads,
the unpadded trunk."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlpt.model.packing import real_count_known
from vlpt.recipe import TrainConfig
from vlpt.testing import prepare_batch, tiny_model_config, tiny_pretrain_model, tiny_samples, tiny_task
from vlpt.train.optim import build_optimizer, clipped_step

TRAIN = TrainConfig(lr=1e-3, weight_decay=0.01, clip=1.0)


def _model_and_batches(objectives, n=4, seed=0, **model):
    task = tiny_task(objectives)
    m = tiny_pretrain_model([task], tiny_model_config(**model), seed=seed)
    samples = tiny_samples(8 * n, seed=seed, text_len=(2, 20), regions=(1, 8), meta={})
    batches = [prepare_batch(m, task, samples[8 * i: 8 * i + 8], seed=i) for i in range(n)]
    return task, m, batches


def _train(model, task, batches, steps, fused):
    opt = build_optimizer(model, TRAIN, fused=fused)
    params = list(model.parameters())
    losses = []
    for i in range(steps):
        loss = model(task.name, batches[i % len(batches)])[0]
        loss.backward()
        if fused:
            clipped_step(opt, params, TRAIN.clip)
        else:
            torch.nn.utils.clip_grad_norm_(params, TRAIN.clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, opt


def test_fused_adamw_with_clip_on_the_device_matches_clip_then_default_adamw():
    task, m, batches = _model_and_batches({"mlm": 1.0, "itm": 1.0})
    fused, plain = m, copy.deepcopy(m)
    fused_losses, opt = _train(fused, task, batches, 20, fused=True)
    plain_losses, _ = _train(plain, task, batches, 20, fused=False)
    assert opt.defaults["fused"]
    assert max(abs(a - b) for a, b in zip(fused_losses, plain_losses)) < 1e-5
    worst = max(float((a - b).detach().abs().max()) for a, b in zip(fused.parameters(), plain.parameters()))
    assert 0 < worst < 1e-5  # float rounding apart (measured: ~1e-7 after 20 steps)


def test_a_non_finite_gradient_skips_the_update_on_the_device():
    task, m, batches = _model_and_batches({"mlm": 1.0})
    _, opt = _train(m, task, batches, 2, fused=True)
    before = copy.deepcopy(m.state_dict())
    state = copy.deepcopy(opt.state_dict())
    m(task.name, batches[0])[0].backward()
    next(p for p in m.parameters() if p.grad is not None).grad[0].fill_(float("nan"))
    norm, skipped = clipped_step(opt, list(m.parameters()), TRAIN.clip)
    assert float(skipped) == 1.0 and not torch.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i]["step"], s["step"]) and torch.equal(after[i]["exp_avg"], s["exp_avg"])
               for i, s in state["state"].items())


#: ops that make the host wait for a GPU: reading a value, or a shape that depends on data
SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
           "aten::masked_scatter", "aten::unique", "aten::_unique2"}


class _SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING:
            self.found.append(name)
        if name.startswith("aten::index") and any(  # indexing with a boolean mask
                torch.is_tensor(i) and i.dtype == torch.bool for a in args if isinstance(a, (list, tuple)) for i in a):
            self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objectives", [{"mlm": 1.0}, {"itm": 1.0, "wra": 0.1}, {"mrfr": 1.0}, {"mrc_kl": 1.0},
                                        {"mrc": 1.0}])
def test_a_training_step_never_reads_the_device(objectives):
    task, m, batches = _model_and_batches(objectives, n=1)
    opt = build_optimizer(m, TRAIN)
    params = list(m.parameters())
    b = batches[0]
    real = int(b["text_mask"].sum() + b["region_mask"].sum())  # read on the CPU, as the trainer does
    assert real < b["text_mask"].numel() + b["region_mask"].numel()  # a padded batch: the trunk unpads it
    with _SyncRecorder() as rec:
        with real_count_known(b, real):
            loss = m(task.name, b)[0]
        loss.backward()
        clipped_step(opt, params, TRAIN.clip)
        opt.zero_grad(set_to_none=True)
    assert rec.found == []


def _loss_and_grads(model, task, batch):
    model.zero_grad(set_to_none=True)
    loss = model(task.name, batch)[0]
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objectives", [{"mlm": 1.0, "itm": 1.0}, {"itm": 1.0, "wra": 0.1}, {"mrfr": 1.0},
                                        {"mrc_kl": 1.0}])
def test_unpadded_trunk_and_partial_last_layer_give_the_padded_losses_and_gradients(objectives):
    task, m, batches = _model_and_batches(objectives, n=1)
    b = batches[0]
    real = int(b["text_mask"].sum() + b["region_mask"].sum())
    padded_size = b["text_mask"].numel() + b["region_mask"].numel()
    results = {}
    for unpad in (False, True):
        for partial in (False, True):  # (False, False): the trunk as it was, every layer on the padded batch
            m.vl.unpad, m.vl.partial_last_layer, m.vl.trunk.processed_tokens = unpad, partial, 0
            results[unpad, partial] = _loss_and_grads(m, task, b)
            assert m.vl.trunk.processed_tokens == (real if unpad else padded_size)
    assert 1 - real / padded_size > 0.2  # these batches are well padded (text 4-21 tokens, regions 1-7): taken out
    loss_ref, grads_ref = results[False, False]
    for key, (loss, grads) in results.items():
        assert abs(loss - loss_ref) <= 1e-5, key
        assert set(grads) == set(grads_ref), key
        assert max(float((grads[k] - grads_ref[k]).abs().max()) for k in grads) <= 1e-4, key


def test_a_batch_without_padding_takes_the_padded_path():
    task, m, _ = _model_and_batches({"itm": 1.0}, n=1)
    samples = tiny_samples(6, text_len=(5, 6), regions=(3, 4), meta={})
    for s in samples:  # every caption 6 tokens, every image 3 regions
        s["input_ids"], s["features"], s["boxes"] = s["input_ids"][:6], s["features"][:3], s["boxes"][:3]
    b = prepare_batch(m, task, samples)
    assert bool(b["text_mask"].all()) and bool(b["region_mask"].all())
    m(task.name, b)
    assert m.vl.trunk.processed_tokens == b["text_mask"].numel() + b["region_mask"].numel()


def test_compiled_trunk_matches_eager_over_20_steps():
    task, eager, batches = _model_and_batches({"mlm": 1.0, "itm": 1.0})
    compiled = copy.deepcopy(eager)
    compiled.vl.trunk.compile_layers()
    eager_losses, _ = _train(eager, task, batches, 20, fused=True)
    compiled_losses, _ = _train(compiled, task, batches, 20, fused=True)
    assert max(abs(a - b) for a, b in zip(eager_losses, compiled_losses)) < 1e-4
    assert np.isfinite(compiled_losses).all()


def test_cpu_dropout_keeps_1_minus_p_scaled_and_backpropagates_through_its_mask():
    from vlpt.model.dropout import add_dropout, dropout

    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.9) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * noise)/dx = noise
    base = torch.zeros(400, 500, requires_grad=True)
    z = add_dropout(base, x, 0.1, True)
    z.sum().backward()
    assert torch.equal(base.grad, torch.ones_like(base)) and abs(float((z != 0).float().mean()) - 0.9) < 0.005
    assert dropout(x, 0.1, False) is x


def test_cpu_dropout_masks_follow_torchs_seed_and_rng_state():
    from vlpt.model.dropout import keep_scale

    x = torch.ones(64, 100)
    torch.manual_seed(3)
    first, second = keep_scale(x, 0.25), keep_scale(x, 0.25)
    state = torch.get_rng_state()
    third = keep_scale(x, 0.25)
    torch.manual_seed(3)
    assert torch.equal(keep_scale(x, 0.25), first) and torch.equal(keep_scale(x, 0.25), second)
    torch.set_rng_state(state)  # a resumed run: torch's state alone decides the next mask
    assert torch.equal(keep_scale(x, 0.25), third)
    assert not torch.equal(first, second)
    assert abs(float((first == 0).float().mean()) - 0.25) < 0.03
    assert keep_scale(x.bfloat16(), 0.1).dtype == torch.bfloat16


def test_itm_before_wra_reads_cls_from_the_one_whole_last_layer_pass(monkeypatch):
    """WRA reads every final state: ITM's [CLS] comes from that same pass (one dropout draw), as in
    UNITER, not from a separate [CLS]-only pass of the last layer."""
    from vlpt.model.vl_model import TrunkOutput

    task, m, batches = _model_and_batches({"itm": 1.0, "wra": 0.1}, n=1, dropout=0.1)
    calls = []
    rows = TrunkOutput.rows
    monkeypatch.setattr(TrunkOutput, "rows", lambda self, *a, **k: calls.append(a) or rows(self, *a, **k))
    m.train()
    with real_count_known(batches[0], int(batches[0]["text_mask"].sum() + batches[0]["region_mask"].sum())):
        m(task.name, batches[0])[0].backward()
    assert calls == []
    task, m, batches = _model_and_batches({"itm": 1.0}, n=1, dropout=0.1)
    m(task.name, batches[0])
    assert len(calls) == 1  # ITM alone reads [CLS] through the partial last layer


def test_cpu_attention_with_dropout_is_scaled_dot_product_attention():
    from vlpt.model.dropout import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8) for _ in range(3))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    # a dropout probability too small to drop anything takes the CPU training path, and must equal SDPA
    mine = attention(q, k, v, mask, 1e-12, True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(mine, ref, atol=1e-6)


def test_cpu_peak_is_not_lowered_by_another_process_busy_at_the_start():
    from vlpt.train.flops import cpu_peak_from, measured_cpu_peak

    flops = 2 * 1024**3 * 100
    alone = cpu_peak_from(flops, wall_s=1.0, cpu_s=2.0, threads=2)  # both threads ran the whole second
    shared = cpu_peak_from(flops, wall_s=2.0, cpu_s=2.0, threads=2)  # half the cores: twice the wall time
    assert alone == pytest.approx(flops / 1.0) and shared == pytest.approx(alone)  # not flops / 2.0
    spinning = cpu_peak_from(flops, wall_s=1.0, cpu_s=4.0, threads=2)  # CPU time inflated (spin-waits)
    assert spinning == pytest.approx(flops / 1.0)  # never below the wall-clock rate
    assert measured_cpu_peak() > 0
