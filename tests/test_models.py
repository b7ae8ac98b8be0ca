import torch

from music.models import SimpleNN


def test_simple_nn_has_the_papers_parameter_count():
    assert sum(p.numel() for p in SimpleNN().parameters()) == 109_386


def test_simple_nn_sizes_are_arguments():
    model = SimpleNN(in_features=3 * 32 * 32, num_classes=100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_simple_nn_flattens_image_batches():
    assert SimpleNN()(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
