"Surgery inside real fastai Learners: frozen learners, optimiser state, export/load_learner round trips."
import torch
from fastai.learner import load_learner
from fastai.optimizer import OptimWrapper
from functools import partial

from corrprune_edu.data import mnist_dls
from corrprune_edu.models import lenet5, resnet_cifar
from corrprune_edu.surgery import prune_channels
from corrprune_edu.checkpoint import prune_learner, save_pruned, load_pruned
from corrprune_edu.train import evaluate, fit, make_learner
from corrprune_edu.core import filter_counts


def small_dls():
    return mnist_dls(20, n_test_per_class=10, source="embedded", bs=32)


def two_groups(m):
    "conv layers as one parameter group, the classifier as another (so `freeze` freezes the convs)"
    return [list(m.conv1.parameters()) + list(m.conv2.parameters()), list(m.fc1.parameters()) + list(m.fc2.parameters())]


def test_frozen_learner_is_pruned_stays_frozen_and_trains_after_unfreeze():
    learn = make_learner(lenet5(), small_dls(), splitter=two_groups)
    learn.freeze()
    fit(learn, 1)
    before = sum(p.numel() for p in learn.model.parameters())
    summary = prune_learner(learn, {"conv2": [0, 1, 2]})
    assert summary["params_after"] < before == summary["params_before"]
    assert learn.model.conv2.out_channels == 47 and learn.opt.frozen_idx == 1
    assert not learn.model.conv2.weight.requires_grad          # still frozen
    w = learn.model.conv2.weight.detach().clone()
    fit(learn, 1)
    assert torch.equal(w, learn.model.conv2.weight)            # frozen layers do not move
    learn.unfreeze()
    fit(learn, 1)
    assert not torch.equal(w, learn.model.conv2.weight)        # and train once unfrozen


def test_torch_optimiser_state_is_carried():
    learn = make_learner(lenet5(), small_dls(), opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9))
    fit(learn, 1)
    old = learn.opt.opt.state[learn.model.conv1.weight]["momentum_buffer"].clone()
    prune_learner(learn, {"conv1": [5]})
    new = learn.opt.opt.state[learn.model.conv1.weight]["momentum_buffer"]
    assert torch.equal(new, old[[i for i in range(20) if i != 5]])
    fit(learn, 1)   # and training goes on
    assert learn.model.conv1.out_channels == 19


def test_export_and_load_learner_round_trip(tmp_path):
    learn = make_learner(lenet5(), small_dls())
    fit(learn, 1)
    prune_learner(learn, {"conv1": [0, 1], "fc1": list(range(250))})
    acc = evaluate(learn, "test")
    learn.export(tmp_path/"pruned.pkl")
    loaded = load_learner(tmp_path/"pruned.pkl")
    assert filter_counts(loaded.model) == filter_counts(learn.model)
    assert loaded.model.pruning_history == learn.model.pruning_history
    x = learn.dls.test.one_batch()[0]
    learn.model.eval(); loaded.model.eval()
    assert torch.equal(loaded.model(x), learn.model(x))
    assert acc > 0.3


def test_save_and_load_pruned_resnet(tmp_path):
    model = resnet_cifar(20).eval()
    pruned = prune_channels(model, {"layer1.0.conv2": [1, 2], "layer3.1.conv1": list(range(30))}, (3, 32, 32))
    pruned = prune_channels(pruned, {"layer2.0.conv1": [0]}, (3, 32, 32))
    save_pruned(pruned, tmp_path/"r.pt")
    back = load_pruned(tmp_path/"r.pt", resnet_cifar(20)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), pruned(x))
    sd = torch.load(tmp_path/"r.pt", weights_only=True)   # plain tensors and lists: safe to load
    assert len(sd["pruning_history"]) == 2


def test_load_pruned_into_the_wrong_family_is_a_clear_error(tmp_path):
    import pytest
    from corrprune_edu.channels import PruningError
    pruned = prune_channels(lenet5(), {"conv1": [0]}, (1, 28, 28))
    save_pruned(pruned, tmp_path/"l.pt")
    with pytest.raises(PruningError):
        load_pruned(tmp_path/"l.pt", resnet_cifar(20))
