"""Small models that reuse or share modules, trace single channels, or call layers functionally: the structure
cases of issue 9. Shared by the exactness property tests and the bad-input tests (not a test module itself)."""
import torch
import torch.nn.functional as F
from torch import nn


class SharedBatchNorm(nn.Module):
    "One BatchNorm2d applied after two different convs: its statistics tie the two convs' channels into one group"
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 5, padding=2)
        self.bn, self.head = nn.BatchNorm2d(8), nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        y = torch.cat([torch.relu(self.bn(self.a(x))), torch.relu(self.bn(self.b(x)))], 1)
        return self.fc(self.head(y).mean((2, 3)))


class NormalisesInside(nn.Module):
    "An MNIST-style net that normalises its 1-channel input inside forward"
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 8, 3), nn.Linear(8 * 4 * 4, 5)
    def forward(self, x):
        x = (x - 0.1307) / 0.3081
        x = F.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 2)
        return self.fc(x.flatten(1))


class TiedWeights(nn.Module):
    "Two convs that share one weight Parameter (each with its own bias)"
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(12, 4, 1)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x * 0.5))], 1)).mean((2, 3)))


class ReusedConv(nn.Module):
    "One conv module called twice in a row (reached by two attribute names), so its input and output channels are one"
    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.again, self.bn, self.head = self.block, nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.bn(self.again(torch.relu(self.block(y)))))
        return self.fc(self.head(y).mean((2, 3)))


class OneChannelScaled(nn.Module):
    "A conv with a single output channel that is scaled and read by the next conv"
    def __init__(self):
        super().__init__()
        self.a, self.squeeze, self.b, self.fc = nn.Conv2d(3, 5, 3), nn.Conv2d(5, 1, 1), nn.Conv2d(1, 4, 3), nn.Linear(4, 2)
    def forward(self, x):
        y = self.squeeze(torch.relu(self.a(x))) * 2.0 - 0.5
        return self.fc(torch.relu(self.b(y)).mean((2, 3)))


class FunctionalConv(nn.Module):
    "A module that calls F.conv2d with its own Parameters instead of holding an nn.Conv2d"
    def __init__(self):
        super().__init__()
        self.w, self.bias = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(6) * 0.1)
        self.bn, self.conv, self.fc = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3), nn.Linear(4, 2)
    def forward(self, x):
        y = torch.relu(self.bn(F.conv2d(x, self.w, self.bias, padding=1)))
        return self.fc(self.conv(y).mean((2, 3)))


class Conv1dNet(nn.Module):
    "A 1-D signal model"
    def __init__(self):
        super().__init__()
        self.c1, self.bn1, self.c2, self.fc = nn.Conv1d(2, 8, 5), nn.BatchNorm1d(8), nn.Conv1d(8, 6, 3), nn.Linear(6 * 8, 3)
    def forward(self, x):
        return self.fc(F.max_pool1d(torch.relu(self.c2(torch.relu(self.bn1(self.c1(x))))), 2).flatten(1))


class UnusedLayer(nn.Module):
    "A model with a conv that forward never calls"
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.spare, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.Conv2d(4, 4, 1), nn.Linear(6, 2)
    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


class GroupedConv(nn.Module):
    "A grouped (not depthwise) convolution between two ordinary ones"
    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1)
    def forward(self, x): return self.b(torch.relu(self.g(torch.relu(self.a(x)))))


# name: (constructor, example input shape (without batch))
STRUCTURE_MODELS = {
    "shared_batchnorm": (SharedBatchNorm, (3, 10, 10)),
    "normalises_inside": (NormalisesInside, (1, 12, 12)),
    "tied_weights": (TiedWeights, (3, 8, 8)),
    "reused_conv": (ReusedConv, (3, 8, 8)),
    "one_channel_scaled": (OneChannelScaled, (3, 10, 10)),
    "functional_conv": (FunctionalConv, (3, 8, 8)),
    "conv1d": (Conv1dNet, (2, 22)),
    "unused_layer": (UnusedLayer, (3, 8, 8)),
    "grouped_conv": (GroupedConv, (3, 8, 8)),
}
