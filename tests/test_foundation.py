"Bad input gets a clear error that names the argument and says what to do; the cost figures are exact."
import pytest
import torch
from torch import nn

from corrprune_edu.data import dataset_path, get_dls, image_dls, mnist_dls
from corrprune_edu.flops import count_macs, count_params, layer_costs, torch_flops
from corrprune_edu.models import get_model, lenet5, resnet_cifar, vgg16_cifar


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown dataset name 'svhn'.*cifar10.*mnist"):
        get_dls("svhn")
    with pytest.raises(ValueError, match="Unknown dataset name"):
        image_dls("imagenet")


def test_missing_data_folder_says_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        mnist_dls(10, path=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "untar_data" in msg and "mnist_png.tgz" in msg


def test_missing_data_without_download_does_not_touch_the_network(tmp_path, monkeypatch):
    import corrprune_edu.data as data
    monkeypatch.setattr(data, "fastai_path", lambda folder: tmp_path/folder)
    with pytest.raises(FileNotFoundError, match="not found"):
        dataset_path("cifar10", download=False)


@pytest.mark.parametrize("shape", [(3, 28, 28), (1, 8, 8), (28, 28), (1, 1, 1, 28, 28)])
def test_wrong_input_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(lenet5(), shape)


def test_wrong_input_shape_names_the_failing_layer():
    with pytest.raises(ValueError, match="conv1"):
        count_macs(resnet_cifar(20), (1, 32, 32))


def test_model_without_conv_or_linear_is_a_clear_error():
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        layer_costs(nn.Sequential(nn.ReLU(), nn.Flatten()), (1, 4, 4))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="Unknown model name 'resnet18'"):
        get_model("resnet18")


def test_exact_cost_figures():
    assert count_macs(lenet5(), (1, 28, 28)) == 2_293_000
    assert count_params(lenet5()) == 431_080
    assert abs(count_macs(vgg16_cifar(), (3, 32, 32)) / 3.13e8 - 1) < 0.02
    assert abs(count_macs(resnet_cifar(56), (3, 32, 32)) / 1.25e8 - 1) < 0.02


@pytest.mark.parametrize("name", ["lenet5", "vgg16_cifar", "resnet20", "resnet56"])
def test_macs_agree_with_flop_counter_mode(name):
    model = get_model(name) if name != "lenet5" else lenet5()
    shape = (1, 28, 28) if name == "lenet5" else (3, 32, 32)
    assert torch_flops(model, shape) == 2 * count_macs(model, shape)


def test_counting_leaves_the_model_untouched():
    m = vgg16_cifar().train()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    count_macs(m, (3, 32, 32))
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
