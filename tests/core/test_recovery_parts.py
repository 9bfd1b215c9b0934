"""The parts that make recovery work on exported programs (issue 9): batch norms trained in training mode and
recalibrated after pruning, distillation losses and held-out metrics chosen per output kind, knowledge
distillation beside class labels, architecture defaults, warm-up and clipping, flat-loss warnings, and
multi-input datasets through the recipe. Small models, synthetic data, CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunery.core import PruneConfig, prune
from prunery.core.data import Dataset
from prunery.core.distill import output_kinds
from prunery.core.losses import make_loss
from prunery.core.recipe import Recipe, has_attention, run_recipe, training_defaults
from prunery.core.recovery import loss_trend, recalibrate_batchnorm
from prunery.core.trainable import trainable_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _export(model: nn.Module, *args: torch.Tensor, kwargs: dict | None = None, dynamic=None):
    return torch.export.export(model.eval(), args, kwargs, dynamic_shapes=dynamic)


class ConvBN(nn.Module):
    def __init__(self, width: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _bn_program(seed: int = 0):
    torch.manual_seed(seed)
    model = ConvBN()
    batch = torch.export.Dim("batch", min=1, max=4096)
    return model, _export(model, torch.randn(4, 3, 8, 8), dynamic=({0: batch},))


def _running(module: nn.Module, name: str) -> torch.Tensor:
    return dict(module.named_buffers())[name]


# --- batch norm -------------------------------------------------------------------------------------------------


def test_batchnorm_trains_in_training_mode_and_the_program_keeps_eval_behaviour() -> None:
    model, ep = _bn_program()
    x = torch.randn(32, 3, 8, 8) * 3 + 1
    module = trainable_module(ep, "cpu")
    before = _running(module, "bn1.running_mean").clone()
    out = module(x)
    # batch statistics and running statistics as nn.BatchNorm2d in training mode (on a copy: the program
    # shares its tensors with the module it was exported from)
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        reference = model(x)
    model.eval()
    assert torch.allclose(out, reference, atol=1e-4)
    assert not torch.allclose(_running(module, "bn1.running_mean"), before)  # running statistics updated
    assert torch.allclose(_running(module, "bn1.running_mean"), model.bn1.running_mean, atol=1e-5)
    module.eval()  # evaluation uses the running statistics again
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-4)
    frozen = trainable_module(ep, "cpu", batchnorm="frozen")
    with torch.no_grad():
        assert torch.allclose(frozen(x), ep.module()(x), atol=1e-5)
    assert torch.equal(_running(frozen, "bn1.running_mean"), before)


def test_recalibration_sets_running_statistics_to_the_data_average() -> None:
    model, ep = _bn_program()
    x = torch.randn(64, 3, 8, 8) * 2 - 0.5
    batches = [(x[i: i + 16], None) for i in range(0, 64, 16)]
    recal = recalibrate_batchnorm(ep, batches, device="cpu")
    with torch.no_grad():
        h = model.conv1(x)
    # the mean of four equal-size batch means is the mean over all rows
    assert torch.allclose(recal.state_dict["bn1.running_mean"], h.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(ep.state_dict["bn1.running_mean"], h.mean((0, 2, 3)), atol=1e-2)
    # the program given is left alone; a program without batch norm comes back as it is
    assert torch.equal(ep.state_dict["bn1.running_mean"], model.bn1.running_mean)
    mlp = _export(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4))
    assert recalibrate_batchnorm(mlp, [(torch.randn(4, 4), None)]) is mlp


class DigitsCNN(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.mark.slow
def test_recovery_with_the_defaults_brings_a_pruned_bn_cnn_back() -> None:
    """Issue 9's first defect: a digits CNN with batch norm pruned to half its channels (its batch statistics
    stale: ~10% held-out) stayed at chance through recovery (SGD on frozen batch norm, loss at ln 10)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype("float32")).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(digits.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(300):
        idx = torch.randint(0, 1500, (64,), generator=torch.Generator().manual_seed(i))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ep = _export(model, x[:2], dynamic=({0: torch.export.Dim("batch", min=1, max=4096)},))
    result = run_recipe(ep, PruneConfig(ratio=0.5), Recipe(dataset=Dataset(x[:1500], y[:1500]), finetune_steps=150,
                                                            device="cpu"))
    ev = result.report["evaluation"]
    assert ev["before"]["accuracy"] > 0.95 and ev["after_pruning"]["accuracy"] < 0.5
    assert ev["after"]["accuracy"] > 0.95
    assert result.report["training"]["finetune"]["trend"]["improved"]
    with torch.no_grad():  # on rows it never saw
        test = (result.program.module()(x[1500:]).argmax(1) == y[1500:]).float().mean()
    assert test > 0.93


# --- distillation per output kind ----------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Token ids + mask in, a mean-pooled L2-normalised embedding out (a sentence encoder's shape)."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class Heads(nn.Module):
    """Several outputs of several kinds: logits, a hidden state, a scalar score."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.cls = nn.Linear(8, 3)
        self.score = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.norm(torch.relu(self.body(x)))
        return self.cls(h), h, self.score(h)


def _encoder_program():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    b, s = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=64)
    return _export(Encoder(), ids, mask, dynamic=({0: b, 1: s}, {0: b, 1: s}))


def test_output_kinds_read_off_the_graph() -> None:
    assert output_kinds(_encoder_program()) == ["embedding"]
    assert output_kinds(_export(Heads(), torch.randn(2, 6))) == ["logits", "hidden", "values"]
    _, cnn = _bn_program()
    assert output_kinds(cnn) == ["logits"]
    pooled = _export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), torch.randn(2, 3, 8, 8))
    assert output_kinds(pooled) == ["embedding"]


def test_distillation_loss_and_metric_fit_the_output() -> None:
    enc = make_loss(False, True, kinds=output_kinds(_encoder_program()))
    assert (enc.kind, enc.metric) == ("cosine", "cosine")
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    assert float(enc(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(enc(a, b)) == pytest.approx(float(1 - F.cosine_similarity(a, b).mean()), rel=1e-5)
    heads = make_loss(False, True, kinds=["logits", "hidden", "values"])
    assert heads.kind == "kl+mse" and heads.metric == "agreement"
    out = (torch.randn(4, 3), torch.randn(4, 8), torch.randn(4, 1))
    assert float(heads(out, out)) == pytest.approx(0.0, abs=1e-6)
    other = (out[0], out[1] + 1.0, out[2])  # only the hidden state differs: its MSE (1.0) over 3 outputs
    assert float(heads(other, out)) == pytest.approx(1.0 / 3, rel=1e-4)
    forced = make_loss(False, True, kinds=["embedding"], distill_loss="mse")
    assert forced.kind == "mse" and float(forced(a, b)) == pytest.approx(float(F.mse_loss(a, b)), rel=1e-5)
    with_labels = make_loss(True, False, "logits", teacher_weight=0.5)
    logits, labels, teacher = torch.randn(6, 3), torch.randint(0, 3, (6,)), torch.randn(6, 3)
    expected = 0.5 * F.cross_entropy(logits, labels) + 0.5 * 4 * F.kl_div(
        F.log_softmax(logits / 2, -1), F.log_softmax(teacher / 2, -1), reduction="batchmean", log_target=True)
    assert float(with_labels(logits, (labels, teacher))) == pytest.approx(float(expected), rel=1e-5)
    assert make_loss(True, False, "logits", teacher_weight=0.0).kind == "ce"


# --- defaults, trend ----------------------------------------------------------------------------------------------


def test_training_defaults_follow_the_architecture() -> None:
    _, cnn = _bn_program()
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    attn = _export(layer, torch.randn(2, 5, 16))
    assert not has_attention(cnn) and training_defaults(cnn) == ("adam", 1e-3)
    assert has_attention(attn) and training_defaults(attn) == ("adamw", 6e-4)


def test_loss_trend() -> None:
    assert loss_trend([2.3] * 50)["improved"] is False
    assert loss_trend([2.3 - 0.04 * i for i in range(50)])["improved"] is True
    assert loss_trend([])["improved"] is False


# --- the recipe ---------------------------------------------------------------------------------------------------


def test_recipe_recovers_a_two_input_encoder_by_cosine_and_warns_on_a_flat_loss() -> None:
    ep = _encoder_program()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (256, 12), generator=g)
    mask = (torch.arange(12) < torch.randint(4, 13, (256, 1), generator=g)).long()
    data = Dataset({"input_ids": ids, "attention_mask": mask})
    result = run_recipe(ep, PruneConfig(ratio=0.5), Recipe(dataset=data, finetune_steps=60, batch_size=32,
                                                            device="cpu"))
    report = result.report
    ev = report["evaluation"]
    assert report["dataset"]["loss"] == "cosine" and report["dataset"]["metric"] == "cosine"
    assert report["training"]["finetune"]["optimizer"] == "adam" and report["training"]["finetune"]["lr"] == 1e-3
    assert report["training"]["finetune"]["curve"][0]["metric"] == "cosine"
    assert ev["after"]["cosine"] > ev["after_pruning"]["cosine"] + 0.01
    assert report["training"]["finetune"]["trend"]["improved"]
    assert not any("did not go down" in w for w in report.get("warnings", []))  # (latency on a busy box may warn)
    assert set(report["latency_ms"]) >= {"before", "after", "speedup", "threads"}
    out = result.program.module()(ids[:3], mask[:3])  # the pruned program keeps both inputs
    assert out.shape == (3, 16)

    flat = run_recipe(ep, PruneConfig(ratio=0.5), Recipe(dataset=data, finetune_steps=20, finetune_lr=0.0,
                                                          batch_size=32, device="cpu"))
    assert flat.report["training"]["finetune"]["trend"]["improved"] is False
    assert any("finetune loss did not go down" in w for w in flat.report["warnings"])


def test_hidden_states_distilled_at_the_layer_outputs_both_programs_share() -> None:
    from prunery.core.distill import HiddenDistillation, layer_outputs, shared_layer_outputs

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    ep = _export(enc, x)
    pruned = prune(ep, PruneConfig(ratio=0.5)).program  # MLP widths and heads; the residual stream stays
    names = shared_layer_outputs(ep, pruned)
    assert names == layer_outputs(ep) and len(names) == 2  # the end of each of the two blocks
    student, teacher = trainable_module(pruned, "cpu"), trainable_module(ep, "cpu")
    hidden = HiddenDistillation(student, teacher, names, weight=1.0)
    with torch.no_grad():
        t_out = teacher(x)
    s_out = student(x)
    penalty = hidden.penalty()
    assert penalty.requires_grad and float(penalty.detach()) > 0
    assert not student.tapped and not teacher.tapped  # read once, then released
    teacher(x)
    student_same = trainable_module(ep, "cpu")
    same = HiddenDistillation(student_same, teacher, names, weight=1.0)
    student_same(x)
    teacher(x)
    assert float(same.penalty().detach()) == pytest.approx(0.0, abs=1e-10)
    assert s_out.shape == t_out.shape
    # a CNN whose every width is pruned shares no layer output of the same shape: nothing to distil
    _, cnn = _bn_program()
    small = prune(cnn, PruneConfig(ratio=0.5)).program
    s_mod, t_mod = trainable_module(small, "cpu"), trainable_module(cnn, "cpu")
    h = HiddenDistillation(s_mod, t_mod, shared_layer_outputs(cnn, small), weight=1.0)
    images = torch.randn(4, 3, 8, 8)
    s_mod(images)
    t_mod(images)
    assert float(h.penalty()) == 0.0


def test_batchnorm_built_with_cumulative_momentum_still_updates_its_statistics() -> None:
    """`nn.BatchNorm2d(momentum=None)` exports with momentum 0: trained as is, its statistics would never move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(144, 2))
    ep = _export(model, torch.randn(2, 3, 8, 8))
    module = trainable_module(ep, "cpu")
    before = _running(module, "1.running_mean").clone()
    module(torch.randn(2, 3, 8, 8) + 3.0)
    assert not torch.allclose(_running(module, "1.running_mean"), before, atol=1e-3)


def test_a_convolutions_dense_output_is_a_map_not_logits() -> None:
    seg = _export(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1)), torch.randn(2, 3, 8, 8))
    assert output_kinds(seg) == ["hidden"]  # (B, 5, H, W): classes in dim 1, so not KL over the last (width) dim
    head = _export(nn.Sequential(nn.Conv2d(3, 5, 8), nn.Flatten()), torch.randn(2, 3, 8, 8))
    assert output_kinds(head) == ["logits"]


def test_a_cnn_with_an_attention_like_product_trains_as_a_cnn() -> None:
    class AttentiveCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn(self.conv(x))).flatten(2)  # (B, C, HW)
            attn = torch.softmax(h.transpose(1, 2) @ h, dim=-1)  # (B, HW, HW)
            return self.fc((h @ attn).mean(-1))

    ep = _export(AttentiveCNN(), torch.randn(2, 3, 4, 4))
    assert has_attention(ep) and training_defaults(ep) == ("adam", 1e-3)


def test_recalibration_is_not_kept_when_it_scores_worse() -> None:
    """A teacher whose running statistics do not describe the dataset: recomputing them on the dataset moves
    the pruned program away from its teacher, so the recipe keeps the statistics it had."""
    model, ep = _bn_program()
    with torch.no_grad():
        ep.state_dict["bn1.running_mean"].fill_(4.0)  # unlike anything in the data below
        ep.state_dict["bn1.running_var"].fill_(0.05)
    data = Dataset(torch.randn(128, 3, 8, 8))
    result = run_recipe(ep, PruneConfig(ratio=0.25), Recipe(dataset=data, batch_size=32, device="cpu"))
    ev = result.report["evaluation"]
    assert ev["after_recalibration"]["kept"] is False
    assert ev["after_recalibration"]["cosine"] < ev["after_pruning"]["cosine"]
    assert torch.all(result.program.state_dict["bn1.running_mean"] == 4.0)


def test_a_program_exported_with_a_static_batch_trains_on_batches_of_that_size() -> None:
    torch.manual_seed(0)
    ep = _export(ConvBN(), torch.randn(8, 3, 8, 8))  # no dynamic dims: every call takes 8 rows
    data = Dataset(torch.randn(100, 3, 8, 8))
    result = run_recipe(ep, PruneConfig(ratio=0.5), Recipe(dataset=data, held_out=0.2, finetune_steps=6,
                                                            batch_size=32, device="cpu"))
    assert result.report["evaluation"]["after"]["cosine"] > 0
    assert set(result.report["latency_ms"]["speedup"]) == {"8"}
    with pytest.raises(ValueError, match="fixed batch of 8"):
        run_recipe(ep, PruneConfig(ratio=0.5), Recipe(dataset=Dataset(torch.randn(12, 3, 8, 8)), held_out=0.2,
                                                      finetune_steps=2, device="cpu"))
