"""Each method moves the model the way its paper says, and each loss is its formula.

A loss with a sign flipped still trains and still changes weights; what it no longer does is
raise the forget rows' loss, or hold the retain rows while it does. The formula tests compute
each loss by hand from the same forward pass.
"""

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from unlearn import engine
from unlearn.data import load_lume
from unlearn.engine import run
from unlearn.measure.nll import output_nll
from unlearn.methods import METHODS, get_method
from unlearn.methods.losses import Batch, Reference, forward
from unlearn.models import load_model

# a few hot steps on the tiny target: enough for every method to move the losses by nats
STEPS = dict(epochs=2, batch_size=4, lr=3e-3, mia=None)  # mia=None: the fixed schedule
SETTINGS = {"sugd": dict(chunk_size=64, positive_ratio=1),  # one chunk, not one per 32 rows
            # RMU reaches the output only through what three down-projections pass on: at
            # the shared rate a fully memorised tiny target's forget rows barely move
            "rmu": dict(lr=1e-2)}
NO_RETAIN_TERM = {"ga"}
# a retain term holds the retain rows: their loss rises by well under the forget rows' rise.
# Without one (ga), or with its sign flipped, the two rise alike (measured: 0.98 to 1.0). The
# ZJUKLAB pair (LoRA, the retain terms at 0.4 and 0.2) hold least: up to 0.91 over three seeds
# and two precisions (tests/MARGINS.md), so their bound is 0.95
HELD = {"npo_kl": 0.95, "merge": 0.95}
HELD_DEFAULT = 0.9


def _checksums(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def _output_nll(model_dir, rows) -> float:
    model, tokenizer = load_model(model_dir)
    losses = output_nll(model, tokenizer, [r.input for r in rows], [r.output for r in rows])
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def start(tiny_target, synth_dir):
    data = load_lume(synth_dir)
    return data, _output_nll(tiny_target[0], data.forget), _output_nll(tiny_target[0], data.retain)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_forgets_holds_the_retain_set_and_leaves_the_source(name, tiny_target,
                                                                         synth_dir, start,
                                                                         tmp_path, margin):
    source, (data, forget_before, retain_before) = tiny_target[0], start
    checksums = _checksums(source)
    record = run(name, source, synth_dir, tmp_path / name, seed=0,
                 **{**STEPS, **SETTINGS.get(name, {})})
    assert _checksums(source) == checksums
    assert record["status"] == "complete" and record["method"] == name
    saved = json.loads((tmp_path / name / "run.json").read_text())
    assert saved["config"]["epochs"] == 2 and saved["profile"] == "small"
    assert all(len(e["step_losses"]) > 0 for e in saved["history"])
    forget_rise = _output_nll(tmp_path / name, data.forget) - forget_before
    retain_rise = _output_nll(tmp_path / name, data.retain) - retain_before
    margin.above("forget output NLL rise", forget_rise, 0.2)
    if name not in NO_RETAIN_TERM:
        margin.below("retain rise / forget rise", retain_rise / forget_rise,
                     HELD.get(name, HELD_DEFAULT))


def _batch(tiny_target, synth_dir, forget: int = 2, retain: int = 2):
    model, tokenizer = load_model(tiny_target[0])
    data = load_lume(synth_dir)
    trained = get_method("gd").Config()  # 512 tokens, retain rows ending in EOS
    examples = (engine._examples(tokenizer, data.forget[:forget], True, trained)
                + engine._examples(tokenizer, data.retain[:retain], False, trained))
    return model, Batch.of(examples, tokenizer.pad_token_id, "cpu")


def _perturbed(model, scale: float = 0.5):
    """A second model that predicts differently: the reference a method is measured against
    (its logits ``scale`` times the model's: flatter below 1, sharper above)."""
    other = type(model)(model.config)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.lm_head.weight.mul_(scale)
    return other.eval()


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@torch.no_grad()
def test_npo_loss_is_its_formula(tiny_target, synth_dir):
    model, batch = _batch(tiny_target, synth_dir)
    out = forward(model, batch)
    ref, gap = Reference(), [2.0, -1.0]  # log π_θ − log π_ref of the two forget rows
    ref.source_nll_sum = {(True, batch.rows[i]): out.nll_sum[i].item() + gap[i] for i in range(2)}
    method = get_method("npo")(get_method("npo").Config(beta=0.5))
    forget = [-(2 / 0.5) * _log_sigmoid(-0.5 * g) for g in gap]
    expected = sum(forget) / 2 + out.nll[2:].mean().item()
    assert method.loss(model, batch, ref).item() == pytest.approx(expected, rel=1e-5)
    # at the start (the model is its reference) every forget row costs (2/β)·ln 2
    ref.source_nll_sum = {(True, batch.rows[i]): out.nll_sum[i].item() for i in range(2)}
    only_forget = method.loss(model, batch, ref).item() - out.nll[2:].mean().item()
    assert only_forget == pytest.approx(4 * math.log(2), rel=1e-5)


@torch.no_grad()
def test_simnpo_loss_is_its_formula(tiny_target, synth_dir):
    model, batch = _batch(tiny_target, synth_dir)
    nll = forward(model, batch).nll.tolist()
    method = get_method("simnpo")(get_method("simnpo").Config(beta=2.5, gamma=0.5))
    # −(2/β)·log σ(−(β/|y|)·log π_θ(y|x) − γ), with −log π_θ/|y| the mean output NLL
    forget = [-(2 / 2.5) * _log_sigmoid(2.5 * n - 0.5) for n in nll[:2]]
    expected = sum(forget) / 2 + sum(nll[2:]) / 2
    assert method.loss(model, batch, Reference()).item() == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_kl_loss_is_ascent_plus_kl_from_the_reference(tiny_target, synth_dir):
    model, batch = _batch(tiny_target, synth_dir)
    out = forward(model, batch)
    method = get_method("kl")(get_method("kl").Config())
    assert method.loss(model, batch, Reference(frozen=model)).item() == pytest.approx(
        -out.nll[:2].mean().item(), rel=1e-5)  # the model is its reference: KL 0
    reference = _perturbed(model)
    log_q = F.log_softmax(reference(input_ids=batch.ids, attention_mask=batch.mask)
                          .logits[:, :-1].float(), -1)
    log_p = F.log_softmax(out.logits, -1)
    scored = batch.labels[:, 1:] != -100
    scored[:2] = False  # retain rows' output tokens only
    # KL(reference ‖ model) = Σ q (log q − log p) per token, averaged over tokens
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)[scored].mean().item()
    assert kl > 0.01
    loss = method.loss(model, batch, Reference(frozen=reference)).item()
    assert loss == pytest.approx(-out.nll[:2].mean().item() + kl, rel=1e-4)


@torch.no_grad()
def test_with_a_teacher_forget_rows_are_drawn_to_its_predictions_and_nlls_over_their_text(
        tiny_target, synth_dir):
    model, batch = _batch(tiny_target, synth_dir)
    out = forward(model, batch)
    method = get_method("gd")(get_method("gd").Config())
    ref = Reference(("teacher",))
    ref.teacher = model  # a model is its own teacher: nothing to draw, only the retain term
    retain = out.nll[2:].mean().item()
    assert method.loss(model, batch, ref).item() == pytest.approx(retain, abs=1e-5)
    # sharper: likelier than the model where the model's best guess is right, less elsewhere
    ref.teacher = _perturbed(model, 1.5)
    log_t = F.log_softmax(ref.teacher(input_ids=batch.ids, attention_mask=batch.mask)
                          .logits[:, :-1].float(), -1)
    log_p = F.log_softmax(out.logits, -1)
    real = batch.mask[:, 1:].bool()  # every token, the prompt's too: what a loss-MIA reads
    # KL(teacher ‖ model) = Σ t (log t − log p) per token, averaged over each row's tokens
    kl = (log_t.exp() * (log_t - log_p)).sum(-1)
    # the floor: how far each token's NLL lies below the teacher's, 0 where it does not
    tokens = batch.ids[:, 1:, None]
    below = (log_p.gather(-1, tokens) - log_t.gather(-1, tokens)).squeeze(-1)
    floor = below.clamp(min=0)
    assert (below[:2][real[:2]] < 0).any() and (floor[:2][real[:2]] > 0.1).any()

    def row_means(per_token):
        return sum(per_token[i][real[i]].mean().item() for i in range(2)) / 2

    assert row_means(kl) > 0.01
    assert method.loss(model, batch, ref).item() == pytest.approx(
        row_means(kl + floor) + retain, rel=1e-4)
    ref.teacher_floor = False  # the KL alone
    assert method.loss(model, batch, ref).item() == pytest.approx(row_means(kl) + retain,
                                                                  rel=1e-4)


@torch.no_grad()
def test_rmu_steers_forget_activations_to_c_u_and_holds_retain_ones(tiny_target, synth_dir):
    model, batch = _batch(tiny_target, synth_dir)
    config = get_method("rmu").Config(layer=1, steering_coeff=6.0)
    method = get_method("rmu")(config)
    hidden_size = model.config.hidden_size
    control = method.control(hidden_size, "cpu")
    assert torch.equal(control, method.control(hidden_size, "cpu"))  # fixed for the run
    assert control.norm().item() == pytest.approx(6.0, rel=1e-5)  # c·u, u a unit vector
    assert torch.equal(control, get_method("rmu")(config).control(hidden_size, "cpu"))

    def states(net):  # after layer 1
        return net(input_ids=batch.ids, attention_mask=batch.mask,
                   output_hidden_states=True).hidden_states[2].float()

    reference = _perturbed(model)
    for layer in reference.model.layers[:2]:  # the reference must differ before layer 2
        layer.mlp.down_proj.weight.mul_(0.5)
    hidden, frozen = states(model), states(reference)
    scored = batch.labels != -100
    forget_tokens, retain_tokens = scored.clone(), scored.clone()
    forget_tokens[2:], retain_tokens[:2] = False, False
    expected = ((hidden[forget_tokens] - control).square().mean()
                + (hidden[retain_tokens] - frozen[retain_tokens]).square().mean())
    assert (hidden[retain_tokens] - frozen[retain_tokens]).abs().max() > 0.01
    loss = method.loss(model, batch, Reference(frozen=reference))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _row_ce(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy over its output tokens, mean and sum, worked out here from the
    logits."""
    logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    scored = labels != -100
    return (ce * scored).sum(1) / scored.sum(1), (ce * scored).sum(1)  # mean and sum


@torch.no_grad()
def test_ga_and_gd_losses_are_their_formulas(tiny_target, synth_dir):
    model, batch = _batch(tiny_target, synth_dir)
    ce, _ = _row_ce(model, batch)
    # the memorised rows' CE is about 0.02 nats, so float rounding (which differs between CPUs'
    # kernels) is a larger share of it: 1e-5 nats absolute, far below any term left out
    ga = get_method("ga")(get_method("ga").Config())
    assert ga.loss(model, batch, Reference()).item() == pytest.approx(
        -ce[:2].mean().item(), rel=1e-4, abs=1e-5)  # ascent on the forget rows only
    gd = get_method("gd")(get_method("gd").Config(retain_weight=2.0))
    assert gd.loss(model, batch, Reference()).item() == pytest.approx(
        -ce[:2].mean().item() + 2.0 * ce[2:].mean().item(), rel=1e-4, abs=1e-5)


@torch.no_grad()
def test_npo_kl_loss_is_its_weighted_formula(tiny_target, synth_dir):
    """ZJUKLAB: w_npo·NPO(forget) + w_kl·KL(reference ‖ model on retain outputs) +
    w_ce·CE(retain), each term worked out here."""
    model, batch = _batch(tiny_target, synth_dir)
    ce, ce_sum = _row_ce(model, batch)
    reference = _perturbed(model)
    ref, gap, beta = Reference(frozen=reference), [1.5, -0.5], 0.1
    ref.source_nll_sum = {(True, batch.rows[i]): ce_sum[i].item() + gap[i] for i in range(2)}
    npo = sum(-(2 / beta) * _log_sigmoid(-beta * g) for g in gap) / 2
    log_q = F.log_softmax(reference(input_ids=batch.ids, attention_mask=batch.mask)
                          .logits[:, :-1].float(), -1)
    log_p = F.log_softmax(model(input_ids=batch.ids, attention_mask=batch.mask)
                          .logits[:, :-1].float(), -1)
    scored = batch.labels[:, 1:] != -100
    scored[:2] = False
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)[scored].mean().item()
    assert kl > 0.01
    config = get_method("npo_kl").Config(beta=beta, w_npo=0.5, w_kl=0.3, w_ce=0.2)
    loss = get_method("npo_kl")(config).loss(model, batch, ref).item()
    assert loss == pytest.approx(0.5 * npo + 0.3 * kl + 0.2 * ce[2:].mean().item(), rel=1e-4)
