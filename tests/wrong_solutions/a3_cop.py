"Wrong answers to assignment 3 (COP: smaller or faster)."
import torch
from torch import nn

from . import wrong

A3 = "03_cop"


def _lenet():
    from corrprune_edu.models import lenet5
    torch.manual_seed(0)
    return dict(model=lenet5())


# Task 3.1 -------------------------------------------------------------------------------------------------------
@wrong("3.1", "your max included the diagonal")
def normalize_layer__with_diagonal(R):
    return R / R.abs().max()

@wrong("3.1", "you divided by the sum of the entries")
def normalize_layer__sum(R):
    return R / R.sum()


# Task 3.2 -------------------------------------------------------------------------------------------------------
@wrong("3.2", "you included each channel's correlation with itself")
def redundancy__self_included(R, k=3):
    return R.double().topk(k, dim=0).values.mean(0)

@wrong("3.2", "you averaged the k *smallest* correlations")
def redundancy__smallest(R, k=3):
    x = R.clone().double()
    x.fill_diagonal_(float("inf"))
    return (-x).topk(k, dim=0).values.neg().mean(0)


# Task 3.3 -------------------------------------------------------------------------------------------------------
@wrong("3.3", "normalised per layer, not across layers: every p_hat came out 1.0", e2e=A3)
def cost_terms__per_layer(P, F):
    lp, lf = torch.log2(P.double()), torch.log2(F.double())
    return lp / lp, lf / lf

@wrong("3.3", "without log2")
def cost_terms__no_log(P, F):
    return P.double() / P.max(), F.double() / F.max()


# Task 3.4 -------------------------------------------------------------------------------------------------------
@wrong("3.4", "β weights computation (FLOPs, f̂) and γ weights parameters (p̂): you swapped them", e2e=A3)
def importance__swapped(s, f_hat, p_hat, alpha, beta, gamma):
    return alpha * (1 - s) + beta * (1 - p_hat) + gamma * (1 - f_hat)

@wrong("3.4", "a redundant filter (high s) must be *less* important: use 1 − s")
def importance__redundancy_sign(s, f_hat, p_hat, alpha, beta, gamma):
    return alpha * s + beta * (1 - f_hat) + gamma * (1 - p_hat)


# Task 3.5 -------------------------------------------------------------------------------------------------------
def _table(model, amount, layer_types, order=lambda b, g: (b, g), value=lambda pr, fr: (pr, fr)):
    "The trade-off table with one mistake plugged in: the (beta, gamma) order given to COP, or what is reported"
    import pandas as pd
    from corrprune_edu.cop import cop_plan
    from corrprune_edu.flops import count_macs, count_params
    from corrprune_edu.surgery import prune_channels
    shape, rows = (1, 28, 28), []
    p0, m0 = count_params(model), count_macs(model, shape)
    for beta, gamma in [(0, 0), (3, 0), (0, 3), (1, 1)]:
        b, g = order(beta, gamma)
        pruned = prune_channels(model, cop_plan(model, amount, 1.0, b, g, example_input=shape, layer_types=layer_types), shape)
        prr, frr = value(1 - count_params(pruned) / p0, 1 - count_macs(pruned, shape) / m0)
        rows.append(dict(beta=beta, gamma=gamma, Prr=prr, Frr=frr))
    return pd.DataFrame(rows)

@wrong("3.5", "your columns are swapped", inputs=_lenet)
def tradeoff__swapped_columns(model, amount=0.5, layer_types=(nn.Conv2d,)):
    return _table(model, amount, layer_types, value=lambda pr, fr: (100 * fr, 100 * pr))

@wrong("3.5", "Prr and Frr are percentages: multiply the fractions by 100", inputs=_lenet)
def tradeoff__fractions(model, amount=0.5, layer_types=(nn.Conv2d,)):
    return _table(model, amount, layer_types)

@wrong("3.5", "you reported what is left", inputs=_lenet)
def tradeoff__kept(model, amount=0.5, layer_types=(nn.Conv2d,)):
    return _table(model, amount, layer_types, value=lambda pr, fr: (100 * (1 - pr), 100 * (1 - fr)))

@wrong("3.5", "β and γ are swapped in your call to COP", inputs=_lenet)
def tradeoff__beta_gamma_swapped(model, amount=0.5, layer_types=(nn.Conv2d,)):
    return _table(model, amount, layer_types, order=lambda b, g: (g, b), value=lambda pr, fr: (100 * pr, 100 * fr))
