"Wrong answers to assignment 1 (filter correlation and redundant pairs)."
import torch

from . import wrong

A1 = "01_filter_correlation"


def _lenet():
    from corrprune_edu.models import lenet5
    torch.manual_seed(0)
    return dict(model=lenet5())


# Task 1.1 -------------------------------------------------------------------------------------------------------
@wrong("1.1", "not centred: your correlation of two filters that differ by a scale and a constant offset is", e2e=A1)
def filter_pearson__not_centred(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))

@wrong("1.1", "not normalised: you returned the covariance")
def filter_pearson__covariance(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(((a - a.mean()) * (b - b.mean())).mean())

@wrong("1.1", "you returned |ρ|: keep the sign")
def filter_pearson__absolute(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b / (a.norm() * b.norm())).abs())


# Task 1.2 -------------------------------------------------------------------------------------------------------
@wrong("1.2", "your function changed the layer's weights")
def correlation_matrix__in_place(w):
    x = w.detach().flatten(1)
    x -= x.mean(1, keepdim=True)             # a view of w: this writes into the network
    x = x / x.norm(dim=1, keepdim=True)
    return x @ x.T

@wrong("1.2", "you correlated the weight positions (the columns of w.flatten(1)), not the filters")
def correlation_matrix__columns(w):
    return torch.corrcoef(w.detach().flatten(1).T)

@wrong("1.2", "not centred: your correlation of filters 0 and 1")
def correlation_matrix__not_centred(w):
    x = w.detach().flatten(1).double()
    x = x / x.norm(dim=1, keepdim=True)
    return x @ x.T


# Task 1.3 -------------------------------------------------------------------------------------------------------
@wrong("1.3", "averaged signed correlations: take |r| at each tap", e2e=A1)
def cop_correlation__signed(w_next):
    v = w_next.detach().double().flatten(2).permute(2, 1, 0)
    v = v - v.mean(2, keepdim=True)
    v = v / v.norm(dim=2, keepdim=True)
    return (v @ v.transpose(1, 2)).mean(0)

@wrong("1.3", "correlated all taps at once")
def cop_correlation__all_taps(w_next):
    return torch.corrcoef(w_next.detach().double().transpose(0, 1).flatten(1)).abs()

@wrong("1.3", "you correlated the next layer's filters (the rows of w_next)")
def cop_correlation__rows(w_next):
    return torch.corrcoef(w_next.detach().double().flatten(1)).abs()


# Task 1.4 -------------------------------------------------------------------------------------------------------
@wrong("1.4", "filter 3 appears in two pairs, (0, 3) and (3, 5)")
def greedy_pairs__overlapping(corr, n):
    i, j = torch.triu_indices(len(corr), len(corr), 1)
    order = torch.argsort(corr[i, j].abs(), descending=True)[:n]
    return [(int(i[k]), int(j[k])) for k in order]

@wrong("1.4", "pair (1, 2) is missing although its |ρ| = 0.94 is among the strongest: rank by |ρ|")
def greedy_pairs__signed(corr, n):
    i, j = torch.triu_indices(len(corr), len(corr), 1)
    used, pairs = set(), []
    for k in torch.argsort(corr[i, j], descending=True).tolist():
        a, b = int(i[k]), int(j[k])
        if len(pairs) < n and a not in used and b not in used: used |= {a, b}; pairs.append((a, b))
    return pairs

@wrong("1.4", "pairs a filter with itself: leave out the diagonal")
def greedy_pairs__diagonal(corr, n):
    c = corr.abs().flatten()
    used, pairs = set(), []
    for k in torch.argsort(c, descending=True).tolist():
        a, b = divmod(k, len(corr))
        if len(pairs) < n and a <= b and a not in used and b not in used: used |= {a, b}; pairs.append((a, b))
    return pairs


# Task 1.5 -------------------------------------------------------------------------------------------------------
def _pairs(w, n):
    x = w.detach().flatten(1).double(); x = x - x.mean(1, keepdim=True); x = x / x.norm(dim=1, keepdim=True)
    c = (x @ x.T).abs(); i, j = torch.triu_indices(len(c), len(c), 1)
    used, pairs = set(), []
    for k in torch.argsort(c[i, j], descending=True, stable=True).tolist():
        a, b = int(i[k]), int(j[k])
        if len(pairs) < n and a not in used and b not in used: used |= {a, b}; pairs.append((a, b))
    return pairs

@wrong("1.5", "you dropped the filter with the larger L1 norm", inputs=_lenet)
def redundant_plan__larger(model, n_pairs=3):
    w = model.conv2.weight.detach()
    x = w.flatten(1).double(); x = x - x.mean(1, keepdim=True); x = x / x.norm(dim=1, keepdim=True)
    c = (x @ x.T).abs(); i, j = torch.triu_indices(len(c), len(c), 1)
    used, drop = set(), []
    for k in torch.argsort(c[i, j], descending=True, stable=True).tolist():
        a, b = int(i[k]), int(j[k])
        if len(drop) < n_pairs and a not in used and b not in used:
            used |= {a, b}; drop.append(a if w[a].abs().sum() > w[b].abs().sum() else b)
    return {"conv2": sorted(drop)}

@wrong("1.5", "this task selects pairs in conv2 only", inputs=_lenet)
def redundant_plan__conv1(model, n_pairs=3):
    w = model.conv1.weight.detach()
    return {"conv1": sorted(i if w[i].abs().sum() <= w[j].abs().sum() else j for i, j in _pairs(w, n_pairs))}
