"""The DPO loss against TRL's on the same log-probs, sequence log-probs, Bradley-Terry."""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmjobs.train.preference import dpo_loss, sequence_logps
from mmjobs.train.reward_model import bradley_terry_loss

B, T, V = 4, 12, 17


def _batch(seed: int = 0) -> SimpleNamespace:
    """Random logits and labels for B pairs: rows 0..B-1 chosen, B..2B-1 rejected; each row
    has a prompt (-100), a response of its own length, then padding (-100)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64).float() * 3
    ref_logits = logits + torch.randn(2 * B, T, V, generator=gen) * 0.5
    ids = torch.randint(0, V, (2 * B, T), generator=gen)
    labels = torch.full((2 * B, T), -100)
    for row in range(2 * B):
        start, end = 3 + row % 2, 6 + (row * 5) % (T - 6)  # different response lengths
        labels[row, start:end] = ids[row, start:end]
    return SimpleNamespace(logits=logits, ref_logits=ref_logits, ids=ids, labels=labels,
                           completion_mask=(labels != -100).long())


def _per_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, T-1] log-probs of the next tokens, 0 where there is no label (what TRL's fused
    LM head returns as `log_probs`)."""
    shift = labels[:, 1:]
    mask = shift != -100
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(
        -1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).float()


def _trl_dpo_loss(batch: SimpleNamespace, *, loss_type: str, beta: float) -> tuple[float, dict]:
    """TRL 1.16's `DPOTrainer._compute_loss` on the batch, through a minimal trainer object
    and a model stub whose fused-head outputs are the batch's log-probs; the reference
    log-probs go in precomputed (`precompute_ref_logps`), as TRL supports."""
    from trl.trainer.dpo_trainer import DPOTrainer

    per_token = _per_token_logps(batch.logits, batch.labels)
    ref = _per_token_logps(batch.ref_logits, batch.labels).sum(1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    class Stub:
        training = True

        def __call__(self, **kwargs):
            return outputs

    trainer = object.__new__(DPOTrainer)
    vars(trainer).update(
        model=Stub(), accelerator=SimpleNamespace(device=torch.device("cpu"),
                                                  gather=lambda t: t,
                                                  gather_for_metrics=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {"input_ids": batch.ids, "attention_mask": torch.ones_like(batch.ids),
              "completion_mask": batch.completion_mask, "ref_chosen_logps": ref[:B],
              "ref_rejected_logps": ref[B:]}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours(batch: SimpleNamespace, **kwargs):
    """Our loss on the very log-probs TRL sums (float32 round-off of another summation order
    would show at 1e-6 on IPO's squared losses of ~25)."""
    logps = _per_token_logps(batch.logits, batch.labels).sum(1)
    ref = _per_token_logps(batch.ref_logits, batch.labels).sum(1)
    tokens = (batch.labels[:, 1:] != -100).sum(1)
    return dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], chosen_tokens=tokens[:B],
                    rejected_tokens=tokens[B:], **kwargs)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1),
                                            ("ipo", 0.7)])
def test_dpo_loss_equals_trls_dpo_trainer(loss_type, beta):
    for seed in range(3):
        batch = _batch(seed)
        trl_loss, metrics = _trl_dpo_loss(batch, loss_type=loss_type, beta=beta)
        out = _ours(batch, beta=beta, loss=loss_type)
        assert float(out.losses.mean()) == pytest.approx(trl_loss, abs=1e-6, rel=0)
        assert float(out.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"],
                                                                 abs=1e-6)
        assert float(out.rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"],
                                                                   abs=1e-6)
        margin = (out.chosen_rewards - out.rejected_rewards).mean()
        assert float(margin) == pytest.approx(metrics["rewards/margins"], abs=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_conservative_dpo_equals_trls_label_smoothed_sigmoid(label_smoothing):
    """TRL 1.16's DPOTrainer has no label-smoothed sigmoid loss any more (its label_smoothing
    now feeds robust DPO / EXO); the conservative-DPO form lives on in `CPOTrainer.cpo_loss`,
    whose sigmoid loss is cDPO on `chosen - rejected`. Given the reference log-ratios instead
    of raw log-probs, it is exactly conservative DPO."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself
        from trl.experimental.cpo.cpo_trainer import CPOTrainer

    beta = 0.2
    cpo = object.__new__(CPOTrainer)
    vars(cpo).update(alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type="sigmoid",
                     simpo_gamma=0.0,
                     accelerator=SimpleNamespace(device=torch.device("cpu")))
    batch = _batch(7)
    logps, _ = sequence_logps(batch.logits, batch.labels)
    ref, _ = sequence_logps(batch.ref_logits, batch.labels)
    trl_losses, _, _ = cpo.cpo_loss(logps[:B] - ref[:B], logps[B:] - ref[B:])
    out = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta,
                   label_smoothing=label_smoothing)
    torch.testing.assert_close(out.losses, trl_losses, atol=1e-6, rtol=0)
    # eps = 0 is plain DPO; eps shifts the minimum away from an infinite margin.
    plain = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta)
    assert not torch.allclose(plain.losses, out.losses)


def test_sequence_logps_sums_only_the_labelled_tokens():
    batch = _batch(1)
    logps, tokens = sequence_logps(batch.logits, batch.labels)
    expected = _per_token_logps(batch.logits, batch.labels).double().sum(1)
    torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=0)
    assert tokens.tolist() == (batch.labels[:, 1:] != -100).sum(1).tolist()
    # Changing a logit at an unlabelled position (the prompt) changes nothing.
    poked = batch.logits.clone()
    poked[:, 0] += 5.0
    assert torch.equal(sequence_logps(poked, batch.labels)[0], logps)


def test_ipo_needs_token_counts_and_unknown_losses_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(x, x, x, x, beta=0.1, loss="ipo")
    with pytest.raises(ValueError, match="unknown loss"):
        dpo_loss(x, x, x, x, beta=0.1, loss="hinge")


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-5.0, -7.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -4.0], requires_grad=True)
    ref = torch.tensor([-6.0, -6.0])
    dpo_loss(chosen, rejected, ref, ref, beta=0.1).losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_bradley_terry_matches_its_formula_and_centring():
    rc, rr = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    torch.testing.assert_close(bradley_terry_loss(rc, rr), -F.logsigmoid(rc - rr))
    torch.testing.assert_close(bradley_terry_loss(rc, rr, center_coef=0.01),
                               -F.logsigmoid(rc - rr) + 0.01 * (rc + rr) ** 2)


def test_bradley_terry_l2_is_align_anythings_regularization():
    # align_anything/trainers/text_to_text/rm.py: mean BT loss + regularization *
    # torch.stack([lower_end_reward, higher_end_reward]).square().mean().
    rc, rr = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    upstream = -F.logsigmoid(rc - rr).mean() + 1e-3 * torch.stack([rr, rc]).square().mean()
    torch.testing.assert_close(bradley_terry_loss(rc, rr, l2_coef=1e-3).mean(), upstream)
