"""Training on exported programs (core/trainable.py, losses.py, regulariser.py, recovery.py, evaluation.py,
data_scores.py): the group regulariser's gradient, sparse training, recovery
by distillation after pruning, Taylor/Fisher importance, best-checkpoint fine-tuning, evaluation, latency.
Tiny models and synthetic data: a few seconds in all."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from prunery.core import DependencyGraph, PruneConfig, prune
from prunery.core.data_scores import fisher_scores, taylor_scores
from prunery.core.evaluation import evaluate
from prunery.core.importance import group_scores
from prunery.core.losses import loss_fn, make_loss
from prunery.core.recovery import finetune
from prunery.core.regulariser import GroupRegulariser, sparse_train
from prunery.core.tensors import program_tensors
from prunery.core.trainable import TrainError, trainable_module, updated_program

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (4, 6, 3)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def _export(model: nn.Module, n_in: int) -> torch.export.ExportedProgram:
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (torch.randn(8, n_in),), dynamic_shapes=({0: batch},))


def _data(n: int, n_in: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from a fixed random two-layer teacher: learnable, not linearly trivial."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(n_in, 32, generator=torch.Generator().manual_seed(1234))
    w2 = torch.randn(32, n_classes, generator=torch.Generator().manual_seed(4321))
    x = torch.randn(n, n_in, generator=g)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def _batches(x: torch.Tensor, y: torch.Tensor | None, size: int) -> list:
    return [(x[i: i + size], None if y is None else y[i: i + size]) for i in range(0, len(x), size)]


def _hidden_group(graph: DependencyGraph, name: str):
    return next(g for g in graph.groups if any(m.name == name and m.dim == 0 for m in g.members))


def _position(graph: DependencyGraph, group, name: str, dim: int, index: int) -> int:
    """Where index `index` of (name, dim) sits in group.components."""
    slot = graph.params[name].slots[dim]
    return int(np.flatnonzero(group.components == graph.slot_labels(slot)[index])[0])


def _trained_teacher(sizes: tuple[int, ...], x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(sizes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_regulariser_gradient_matches_its_formula() -> None:
    torch.manual_seed(0)
    ep = _export(MLP((4, 6, 3)), 4)
    graph = DependencyGraph(ep)
    group = _hidden_group(graph, "layers.0.weight")
    assert {(m.name, m.dim) for m in group.members} == {
        ("layers.0.weight", 0), ("layers.0.bias", 0), ("layers.1.weight", 1)}
    module = trainable_module(ep, "cpu")
    reg, alpha, eps = 0.3, 4.0, 1e-8
    r = GroupRegulariser(graph, module, reg, alpha, groups=[group], eps=eps)

    w1, b1, w2 = (module.get_parameter(n) for n in ("layers.0.weight", "layers.0.bias", "layers.1.weight"))
    order = [_position(graph, group, "layers.0.weight", 0, k) for k in range(6)]  # hidden unit -> position
    with torch.no_grad():
        s = w1.pow(2).sum(1) + b1.pow(2) + w2.pow(2).sum(0)  # per hidden unit
        imp = s / 3  # three members carry every unit
        gamma = 2 ** (alpha * (imp.max() - imp) / (imp.max() - imp.min() + 1e-12))
    np.testing.assert_allclose(r.gammas()[group.id][order], gamma.numpy(), rtol=1e-5)
    assert r.gammas()[group.id].max() == pytest.approx(2**alpha) and r.gammas()[group.id].min() == pytest.approx(1)
    # importance is importance.py's l2
    np.testing.assert_allclose(r.importance()[group.id], group_scores(graph, program_tensors(ep), "l2")[group.id],
                               rtol=1e-6)

    penalty = r.penalty()
    assert penalty.item() == pytest.approx(float(reg * (gamma * torch.sqrt(s + eps)).sum()), rel=1e-5)
    g1, gb, g2 = torch.autograd.grad(penalty, [w1, b1, w2])
    scale = (reg * gamma / torch.sqrt(s + eps)).detach()
    torch.testing.assert_close(g1, scale[:, None] * w1.detach())
    torch.testing.assert_close(gb, scale * b1.detach())
    torch.testing.assert_close(g2, scale[None, :] * w2.detach())


def test_sparse_training_drives_the_weakest_indices_toward_zero() -> None:
    x, y = _data(256, 8, 4, seed=0)
    ep = _export(_trained_teacher((8, 16, 4), x, y, steps=200), 8)  # from a trained model, as the paper does
    graph = DependencyGraph(ep)
    group = _hidden_group(graph, "layers.0.weight")
    before = GroupRegulariser(graph, trainable_module(ep, "cpu"), 1.0)
    gamma, norms0 = before.gammas()[group.id], before.norms()[group.id]
    weak, strong = np.argsort(-gamma)[:4], np.argsort(gamma)[:4]

    seen: list[tuple[int, float]] = []
    trained, losses = sparse_train(ep, graph, _batches(x, y, 64), steps=200, lr=0.02, reg=0.02, loss="ce",
                                   on_step=lambda s, v: seen.append((s, v)), device="cpu")
    assert len(losses) == 200 and all(math.isfinite(v) for v in losses)
    assert [s for s, _ in seen] == list(range(1, 201))
    norms1 = GroupRegulariser(graph, trainable_module(trained, "cpu"), 1.0).norms()[group.id]
    ratio0 = norms0[weak].mean() / norms0[strong].mean()
    ratio1 = norms1[weak].mean() / norms1[strong].mean()
    assert ratio1 < ratio0 / 10, (ratio0, ratio1)
    assert norms1[weak].max() < 0.05 * norms1[strong].mean()
    # the original program is untouched
    torch.testing.assert_close(program_tensors(ep)["layers.0.weight"], before.layout.terms[0][1].detach())


def test_distillation_without_labels_recovers_agreement_after_pruning() -> None:
    x, y = _data(1024, 16, 5, seed=1)
    teacher = _export(_trained_teacher((16, 64, 64, 5), x, y, steps=300), 16)
    pruned = prune(teacher, PruneConfig(ratio=0.5)).program
    x_held, _ = _data(512, 16, 5, seed=2)
    held = _batches(x_held, None, 256)  # no labels anywhere
    before = evaluate(pruned, held, teacher=teacher, device="cpu")
    loss = make_loss(False, True, "logits")
    assert loss.kind == "kl" and loss.distill
    tuned, curve = finetune(pruned, _batches(x, None, 128), held, steps=150, lr=0.05, loss=loss, teacher=teacher,
                            eval_every=25, device="cpu")
    after = evaluate(tuned, held, teacher=teacher, device="cpu")
    assert curve[0]["metric"] == "agreement" and curve[0]["held_out"] == pytest.approx(before["agreement"])
    assert after["agreement"] > before["agreement"] + 0.05, (before, after)
    assert after["cosine"] > before["cosine"]
    assert "accuracy" not in after  # no class-id targets


def test_taylor_and_fisher_scores_rank_a_dead_unit_last() -> None:
    torch.manual_seed(0)
    model = MLP((4, 6, 3))
    with torch.no_grad():
        model.layers[0].bias.fill_(1.0)  # every hidden unit active
        model.layers[1].weight[:, 2] = 0.0  # unit 2 feeds nothing
    ep = _export(model, 4)
    graph = DependencyGraph(ep)
    group = _hidden_group(graph, "layers.0.weight")
    dead = _position(graph, group, "layers.0.weight", 0, 2)
    x, y = _data(96, 4, 3, seed=3)
    batches = _batches(x, y, 32)
    for scorer in (taylor_scores, fisher_scores):
        scores = scorer(graph, trainable_module(ep, "cpu"), batches, "ce")
        assert set(scores) == {g.id for g in graph.groups}
        for g in graph.groups:
            assert scores[g.id].shape == (g.size,) and (scores[g.id] >= 0).all()
        s = scores[group.id]
        assert s[dead] == 0.0 and int(np.argmin(s)) == dead
        assert (np.delete(s, dead) > 0).all()
    # the program itself is accepted as the module
    np.testing.assert_allclose(taylor_scores(graph, ep, batches, "ce")[group.id],
                               taylor_scores(graph, trainable_module(ep, "cpu"), batches, "ce")[group.id])


def test_finetune_returns_the_best_checkpoint() -> None:
    torch.manual_seed(0)
    ep = _export(MLP((8, 16, 4)), 8)
    x, y = _data(256, 8, 4, seed=4)
    x_held, y_held = _data(256, 8, 4, seed=5)
    held = _batches(x_held, y_held, 128)
    # a large, constant learning rate: the held-out accuracy moves up and down
    tuned, curve = finetune(ep, _batches(x, y, 32), held, steps=60, lr=0.5, loss="ce", schedule="constant",
                            eval_every=7, device="cpu")
    assert [c["step"] for c in curve] == [0, 7, 14, 21, 28, 35, 42, 49, 56, 60]
    assert all(c["metric"] == "accuracy" for c in curve) and curve[0]["loss"] is None
    best = max(c["held_out"] for c in curve)
    assert curve[-1]["held_out"] < best  # the last step is not the best here: the checkpoint matters
    assert evaluate(tuned, held, device="cpu")["accuracy"] == pytest.approx(best)
    # cosine schedule with warm-up: lr rises, then decays to near zero
    _, curve = finetune(ep, _batches(x, y, 32), held, steps=40, lr=0.1, loss="ce", warmup=10, eval_every=5,
                        device="cpu")
    lrs = [c["lr"] for c in curve]
    assert lrs[1] < lrs[2] and lrs[-1] < 0.01


def test_updated_program_saves_loads_and_leaves_the_original_alone(tmp_path) -> None:
    torch.manual_seed(0)
    ep = _export(MLP((4, 6, 3)), 4)
    x = torch.randn(5, 4)
    ref = ep.module()(x).detach()
    module = trainable_module(ep, "cpu")
    assert all(p.requires_grad for p in module.parameters())
    with torch.no_grad():
        module.get_parameter("layers.0.weight").mul_(2.0)
    new = updated_program(ep, module)
    torch.testing.assert_close(ep.module()(x), ref)  # the program given is not modified
    torch.testing.assert_close(new.module()(x), module(x))
    path = tmp_path / "p.pt2"
    torch.export.save(new, path)
    torch.testing.assert_close(torch.export.load(path).module()(x), module(x))
    buf = io.BytesIO()
    torch.export.save(new, buf)


def test_losses_and_their_choice() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    ce = loss_fn("ce")
    torch.testing.assert_close(ce(logits, targets), nn.functional.cross_entropy(logits.reshape(10, 7),
                                                                              targets.reshape(10)))
    kl = loss_fn("kl")
    assert kl.distill and kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    p_t = torch.softmax(logits[0] / 2, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(logits[1] / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(kl(logits[1], logits[0]), expected)
    assert make_loss(True, False, "logits").kind == "ce"
    assert make_loss(True, True, "logits").kind == "kl"
    assert make_loss(False, False, "logits").kind == "kl"
    assert make_loss(True, False, "regression").kind == "mse" and not make_loss(True, False, "regression").distill
    assert make_loss(False, True, "regression").kind == "mse" and make_loss(False, True, "regression").distill
    with pytest.raises(TrainError):
        loss_fn("hinge")
    ep = _export(MLP((4, 6, 3)), 4)
    with pytest.raises(TrainError, match="teacher"):
        sparse_train(ep, DependencyGraph(ep), [(torch.randn(4, 4), None)], steps=1, lr=0.1, reg=0.1, loss="kl")
    with pytest.raises(TrainError, match="targets"):
        sparse_train(ep, DependencyGraph(ep), [(torch.randn(4, 4), None)], steps=1, lr=0.1, reg=0.1, loss="ce")


def test_evaluate() -> None:
    torch.manual_seed(0)
    ep = _export(MLP((4, 6, 3)), 4)
    x, y = _data(64, 4, 3, seed=6)
    res = evaluate(ep, _batches(x, y, 16), teacher=ep, device="cpu")
    assert res["agreement"] == 1.0 and res["cosine"] == pytest.approx(1.0)
    with torch.no_grad():
        out = ep.module()(x)
    assert res["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert res["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
